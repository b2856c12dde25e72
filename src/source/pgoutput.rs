//! Decoder for PostgreSQL's `pgoutput` logical replication protocol, version 1.
//!
//! # What it decodes
//!
//! The messages of "Logical Replication Message Formats" in the PostgreSQL protocol docs, as
//! sent with `proto_version '1'`: Begin, Commit, Origin, Relation, Type, Insert, Update, Delete,
//! Truncate and logical decoding Message (`pg_logical_emit_message`). The streaming (v2) and
//! two-phase (v3) messages are not requested by this service and are reported as
//! [`DecodeError::UnknownTag`]. All integers are big-endian, strings are NUL-terminated.
//!
//! # How it fits
//!
//! The replication stream hands each XLogData payload to [`decode`]. Insert, Update and Delete
//! carry only a relation id, so the logical source keeps a relation cache keyed by
//! [`Relation::id`], filled from [`Message::Relation`] (PostgreSQL sends one before the first
//! change to a relation in a session and again after its schema changes), and uses it to map
//! tuple positions to column names. Decoded messages borrow from the payload (tuple values,
//! names, logical message contents), so nothing is copied until the caller decides to keep it;
//! only `Relation` and `Truncate`, which are rare and kept, are owned.
//!
//! # Why it never panics
//!
//! The payload comes off the network. A panic would take the relay down mid-transaction, while an
//! error lets the caller stop cleanly without acknowledging the LSN, so nothing is lost and the
//! message is redelivered after a restart. So every read goes through a small cursor
//! (`Reader`) that uses checked slicing only; lengths from the wire are checked against the
//! bytes actually left before anything is sliced or reserved, so a forged count can neither read
//! out of bounds nor make us allocate gigabytes. The `deny` list below makes clippy enforce this
//! for the non-test code of this module.
//!
//! Tuples are validated completely at decode time and then decoded again lazily by
//! [`Tuple::iter`], which is why iteration cannot fail: most consumers look at one or two columns
//! (the outbox payload and key), and this keeps decoding free of per-column allocation.
//!
//! # Trailing bytes
//!
//! PostgreSQL never sends bytes after the end of a message, so [`decode`] rejects them with
//! [`DecodeError::TrailingBytes`]: they mean the server speaks a different protocol version (for
//! example a v2 stream carrying extra xid fields) or the framing is broken, and guessing would
//! risk relaying a misread row.

#![deny(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::unreachable,
    clippy::todo,
    clippy::unimplemented,
    clippy::arithmetic_side_effects
)]

use std::iter::FusedIterator;

use reader::Reader;

mod reader;

/// Why a pgoutput message could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The payload had no bytes at all, not even a tag.
    #[error("pgoutput message is empty")]
    Empty,
    /// The payload ended before the field named by `what` was complete.
    #[error("pgoutput message truncated while reading {what}")]
    Truncated {
        /// The field being read, e.g. `"Begin.xid"`.
        what: &'static str,
    },
    /// The first byte is not a protocol-v1 message tag.
    #[error("unknown pgoutput message tag {tag:#04x}")]
    UnknownTag {
        /// The tag byte.
        tag: u8,
    },
    /// A TupleData column kind was not one of `n`, `u`, `t`, `b`.
    #[error("unknown tuple column kind {kind:#04x}")]
    UnknownColumnKind {
        /// The kind byte.
        kind: u8,
    },
    /// A name (relation, namespace, column, type, origin) is not UTF-8. The service expects the
    /// replication connection to use `client_encoding` UTF8.
    #[error("string in pgoutput message is not valid UTF-8: {what}")]
    InvalidUtf8 {
        /// The field holding the string.
        what: &'static str,
    },
    /// Insert, Update or Delete had an unexpected byte where `K`, `O` or `N` belongs.
    #[error("unexpected submessage byte {byte:#04x} in pgoutput {message} message")]
    UnexpectedSubmessage {
        /// The message being decoded, e.g. `"Update"`.
        message: &'static str,
        /// The byte found.
        byte: u8,
    },
    /// A signed length or count on the wire was negative.
    #[error("negative length {len} in pgoutput message while reading {what}")]
    NegativeLength {
        /// The field holding the length.
        what: &'static str,
        /// The length as sent.
        len: i32,
    },
    /// The message was complete but bytes followed it (see the module docs for why this is an
    /// error).
    #[error("{count} trailing bytes after pgoutput message with tag {tag:#04x}")]
    TrailingBytes {
        /// The message's tag byte.
        tag: u8,
        /// How many bytes were left over.
        count: usize,
    },
}

/// One column of a [`Relation`], in tuple order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Column flags; bit 0 marks the column as part of the replica identity key.
    pub flags: u8,
    /// Column name.
    pub name: String,
    /// OID of the column's data type.
    pub type_oid: u32,
    /// Type modifier (`atttypmod`), -1 when the type has none.
    pub type_modifier: i32,
}

impl Column {
    /// Whether the column is part of the relation's replica identity key.
    pub fn is_key(&self) -> bool {
        self.flags & 1 != 0
    }
}

/// A relation (table) description, sent before the first change to it and after schema changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Relation OID; Insert/Update/Delete refer to the relation by this id.
    pub id: u32,
    /// Schema name as on the wire: the empty string means `pg_catalog` (the protocol sends it
    /// that way and we keep it unchanged, so re-encoding is lossless).
    pub namespace: String,
    /// Relation name.
    pub name: String,
    /// Replica identity setting, `relreplident` in `pg_class`: `d` default, `n` nothing,
    /// `f` full, `i` index.
    pub replica_identity: u8,
    /// Columns in the order tuples carry them (generated columns are not sent).
    pub columns: Vec<Column>,
}

impl Relation {
    /// Position of the column called `name`, which is also its index in a [`Tuple`] of this
    /// relation.
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }
}

/// One column value of a [`Tuple`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    /// SQL NULL (`n`).
    Null,
    /// An unchanged TOASTed value (`u`): PostgreSQL did not send it because the update did not
    /// touch it; the real value is only in the table.
    Unchanged,
    /// The value in the type's text format (`t`).
    Text(&'a [u8]),
    /// The value in the type's binary format (`b`), only with the `binary` option.
    Binary(&'a [u8]),
}

impl<'a> Value<'a> {
    /// The value's bytes if it is `Text` or `Binary`.
    pub fn as_bytes(&self) -> Option<&'a [u8]> {
        match *self {
            Value::Text(b) | Value::Binary(b) => Some(b),
            Value::Null | Value::Unchanged => None,
        }
    }
}

/// A tuple's columns, validated but decoded lazily.
///
/// Holds the raw TupleData column bytes borrowed from the message and the column count. Only
/// [`decode`] builds one, after checking every column, so [`Tuple::iter`] cannot fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuple<'a> {
    raw: &'a [u8],
    columns: u16,
}

impl<'a> Tuple<'a> {
    /// Number of columns.
    pub fn len(&self) -> usize {
        usize::from(self.columns)
    }

    /// Whether the tuple has no columns.
    pub fn is_empty(&self) -> bool {
        self.columns == 0
    }

    /// The column values in order.
    pub fn iter(&self) -> TupleIter<'a> {
        TupleIter {
            reader: Reader::new(self.raw),
            remaining: self.columns,
        }
    }

    /// The value of column `index`, `None` if out of range. Walks the preceding columns, so
    /// iterate instead when reading many.
    pub fn get(&self, index: usize) -> Option<Value<'a>> {
        self.iter().nth(index)
    }
}

impl<'a> IntoIterator for Tuple<'a> {
    type Item = Value<'a>;
    type IntoIter = TupleIter<'a>;

    fn into_iter(self) -> TupleIter<'a> {
        self.iter()
    }
}

impl<'a> IntoIterator for &Tuple<'a> {
    type Item = Value<'a>;
    type IntoIter = TupleIter<'a>;

    fn into_iter(self) -> TupleIter<'a> {
        self.iter()
    }
}

/// Iterator over a [`Tuple`]'s values, from [`Tuple::iter`].
#[derive(Debug, Clone)]
pub struct TupleIter<'a> {
    reader: Reader<'a>,
    remaining: u16,
}

impl<'a> Iterator for TupleIter<'a> {
    type Item = Value<'a>;

    fn next(&mut self) -> Option<Value<'a>> {
        let remaining = self.remaining.checked_sub(1)?;
        match read_value(&mut self.reader) {
            Ok(value) => {
                self.remaining = remaining;
                Some(value)
            }
            // Cannot happen: the bytes were validated when the Tuple was decoded. Ending the
            // iteration keeps the no-panic guarantee even if that invariant were ever broken.
            Err(_) => {
                self.remaining = 0;
                None
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = usize::from(self.remaining);
        (n, Some(n))
    }
}

impl ExactSizeIterator for TupleIter<'_> {}
impl FusedIterator for TupleIter<'_> {}

/// Bit of [`Message::Truncate`]'s `options`: `TRUNCATE ... CASCADE`.
pub const TRUNCATE_CASCADE: u8 = 1;
/// Bit of [`Message::Truncate`]'s `options`: `TRUNCATE ... RESTART IDENTITY`.
pub const TRUNCATE_RESTART_IDENTITY: u8 = 2;

/// One decoded pgoutput message. Timestamps are raw microseconds since 2000-01-01 (the
/// PostgreSQL epoch); LSNs are raw 64-bit WAL positions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    /// `B`: start of a transaction.
    Begin {
        /// LSN of the transaction's commit record.
        final_lsn: u64,
        /// Commit timestamp, microseconds since 2000-01-01.
        commit_time_micros: i64,
        /// Transaction id.
        xid: u32,
    },
    /// `C`: end of a transaction.
    Commit {
        /// Flags, currently always 0.
        flags: u8,
        /// LSN of the commit record.
        commit_lsn: u64,
        /// End LSN of the transaction: the position to acknowledge once it is relayed.
        end_lsn: u64,
        /// Commit timestamp, microseconds since 2000-01-01.
        commit_time_micros: i64,
    },
    /// `O`: the transaction was replicated from another node.
    Origin {
        /// Commit LSN on the origin server.
        commit_lsn: u64,
        /// Origin name.
        name: &'a str,
    },
    /// `R`: relation description, to be cached by id.
    Relation(Relation),
    /// `Y`: a non-builtin type used by a following relation.
    Type {
        /// Type OID.
        id: u32,
        /// Schema name (empty for `pg_catalog`).
        namespace: &'a str,
        /// Type name.
        name: &'a str,
    },
    /// `I`: a row was inserted.
    Insert {
        /// Relation id, see [`Relation::id`].
        relation_id: u32,
        /// The new row.
        new: Tuple<'a>,
    },
    /// `U`: a row was updated.
    Update {
        /// Relation id, see [`Relation::id`].
        relation_id: u32,
        /// The old key (`K`, when the key changed) or whole old row (`O`, with replica identity
        /// full), if sent.
        old: Option<Tuple<'a>>,
        /// The new row.
        new: Tuple<'a>,
    },
    /// `D`: a row was deleted.
    Delete {
        /// Relation id, see [`Relation::id`].
        relation_id: u32,
        /// The old key (`K`) or whole old row (`O`).
        old: Tuple<'a>,
    },
    /// `T`: relations were truncated.
    Truncate {
        /// Bits [`TRUNCATE_CASCADE`] and [`TRUNCATE_RESTART_IDENTITY`].
        options: u8,
        /// The truncated relations.
        relation_ids: Vec<u32>,
    },
    /// `M`: a logical decoding message from `pg_logical_emit_message`.
    Message {
        /// Whether it was emitted inside a transaction (between Begin and Commit).
        transactional: bool,
        /// LSN of the message.
        lsn: u64,
        /// The prefix, as raw bytes.
        prefix: &'a [u8],
        /// The content.
        content: &'a [u8],
    },
}

/// Decodes one pgoutput message (the payload of one XLogData message).
///
/// Never panics; see the module docs for what is rejected.
pub fn decode(buf: &[u8]) -> Result<Message<'_>, DecodeError> {
    let (&tag, body) = buf.split_first().ok_or(DecodeError::Empty)?;
    let mut r = Reader::new(body);
    // Struct expressions evaluate their fields in the order written, which is wire order.
    let message = match tag {
        b'B' => Message::Begin {
            final_lsn: r.u64("Begin.final_lsn")?,
            commit_time_micros: r.i64("Begin.commit_time")?,
            xid: r.u32("Begin.xid")?,
        },
        b'C' => Message::Commit {
            flags: r.u8("Commit.flags")?,
            commit_lsn: r.u64("Commit.commit_lsn")?,
            end_lsn: r.u64("Commit.end_lsn")?,
            commit_time_micros: r.i64("Commit.commit_time")?,
        },
        b'O' => Message::Origin {
            commit_lsn: r.u64("Origin.commit_lsn")?,
            name: r.str("Origin.name")?,
        },
        b'R' => Message::Relation(relation(&mut r)?),
        b'Y' => Message::Type {
            id: r.u32("Type.id")?,
            namespace: r.str("Type.namespace")?,
            name: r.str("Type.name")?,
        },
        b'I' => {
            let relation_id = r.u32("Insert.relation_id")?;
            expect_new(&mut r, "Insert")?;
            Message::Insert {
                relation_id,
                new: tuple(&mut r)?,
            }
        }
        b'U' => {
            let relation_id = r.u32("Update.relation_id")?;
            let old = match r.u8("Update.submessage")? {
                b'K' | b'O' => {
                    let old = tuple(&mut r)?;
                    expect_new(&mut r, "Update")?;
                    Some(old)
                }
                b'N' => None,
                byte => {
                    return Err(DecodeError::UnexpectedSubmessage {
                        message: "Update",
                        byte,
                    })
                }
            };
            Message::Update {
                relation_id,
                old,
                new: tuple(&mut r)?,
            }
        }
        b'D' => {
            let relation_id = r.u32("Delete.relation_id")?;
            match r.u8("Delete.submessage")? {
                b'K' | b'O' => {}
                byte => {
                    return Err(DecodeError::UnexpectedSubmessage {
                        message: "Delete",
                        byte,
                    })
                }
            }
            Message::Delete {
                relation_id,
                old: tuple(&mut r)?,
            }
        }
        b'T' => {
            let count = r.len("Truncate.relation_count")?;
            let options = r.u8("Truncate.options")?;
            // Reserve only what the remaining bytes could hold (4 per id), so a forged count
            // cannot make us allocate more than the message itself.
            let mut relation_ids = Vec::with_capacity(count.min(r.remaining() / 4));
            for _ in 0..count {
                relation_ids.push(r.u32("Truncate.relation_id")?);
            }
            Message::Truncate {
                options,
                relation_ids,
            }
        }
        b'M' => {
            let flags = r.u8("Message.flags")?;
            let lsn = r.u64("Message.lsn")?;
            let prefix = r.cstr("Message.prefix")?;
            let len = r.len("Message.content_length")?;
            Message::Message {
                transactional: flags & 1 != 0,
                lsn,
                prefix,
                content: r.bytes(len, "Message.content")?,
            }
        }
        tag => return Err(DecodeError::UnknownTag { tag }),
    };
    match r.remaining() {
        0 => Ok(message),
        count => Err(DecodeError::TrailingBytes { tag, count }),
    }
}

/// Smallest wire size of one Relation column: flags, empty name's NUL, type OID, type modifier.
const MIN_COLUMN_LEN: usize = 1 + 1 + 4 + 4;

fn relation(r: &mut Reader<'_>) -> Result<Relation, DecodeError> {
    let id = r.u32("Relation.id")?;
    let namespace = r.str("Relation.namespace")?.to_owned();
    let name = r.str("Relation.name")?.to_owned();
    let replica_identity = r.u8("Relation.replica_identity")?;
    let count = usize::from(r.u16("Relation.column_count")?);
    // Cap the reservation by what the rest of the buffer could describe (see MIN_COLUMN_LEN).
    let mut columns = Vec::with_capacity(count.min(r.remaining() / MIN_COLUMN_LEN));
    for _ in 0..count {
        columns.push(Column {
            flags: r.u8("Relation.column.flags")?,
            name: r.str("Relation.column.name")?.to_owned(),
            type_oid: r.u32("Relation.column.type_oid")?,
            type_modifier: r.i32("Relation.column.type_modifier")?,
        });
    }
    Ok(Relation {
        id,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

/// Reads the `N` that precedes a new tuple.
fn expect_new(r: &mut Reader<'_>, message: &'static str) -> Result<(), DecodeError> {
    match r.u8("new tuple marker")? {
        b'N' => Ok(()),
        byte => Err(DecodeError::UnexpectedSubmessage { message, byte }),
    }
}

/// Reads and validates a TupleData, returning it undecoded.
fn tuple<'a>(r: &mut Reader<'a>) -> Result<Tuple<'a>, DecodeError> {
    let columns = r.u16("TupleData.column_count")?;
    // Validate on a copy of the cursor to learn how many bytes the columns span, then take
    // exactly those bytes from the real cursor.
    let mut probe = *r;
    for _ in 0..columns {
        read_value(&mut probe)?;
    }
    let span = r.remaining().saturating_sub(probe.remaining());
    let raw = r.bytes(span, "TupleData")?;
    Ok(Tuple { raw, columns })
}

/// Reads one TupleData column; shared by validation and [`TupleIter`] so they cannot disagree.
fn read_value<'a>(r: &mut Reader<'a>) -> Result<Value<'a>, DecodeError> {
    match r.u8("TupleData.column_kind")? {
        b'n' => Ok(Value::Null),
        b'u' => Ok(Value::Unchanged),
        b't' => {
            let len = r.len("TupleData.text_length")?;
            Ok(Value::Text(r.bytes(len, "TupleData.text_value")?))
        }
        b'b' => {
            let len = r.len("TupleData.binary_length")?;
            Ok(Value::Binary(r.bytes(len, "TupleData.binary_value")?))
        }
        kind => Err(DecodeError::UnknownColumnKind { kind }),
    }
}

/// Builds pgoutput wire bytes for the unit tests.
#[cfg(test)]
pub(crate) mod encode;

#[cfg(test)]
#[allow(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects
)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn values<'a>(t: &Tuple<'a>) -> Vec<Value<'a>> {
        t.iter().collect()
    }

    fn sample_relation() -> Relation {
        Relation {
            id: 16_385,
            namespace: "public".into(),
            name: "outbox".into(),
            replica_identity: b'd',
            columns: vec![
                Column {
                    flags: 1,
                    name: "id".into(),
                    type_oid: 20,
                    type_modifier: -1,
                },
                Column {
                    flags: 0,
                    name: "payload".into(),
                    type_oid: 3802,
                    type_modifier: -1,
                },
                Column {
                    flags: 0,
                    name: "topic".into(),
                    type_oid: 1043,
                    type_modifier: 259,
                },
            ],
        }
    }

    /// One valid encoding of every message type, covering every column kind and submessage.
    fn samples() -> Vec<Vec<u8>> {
        vec![
            encode::begin(0x0123_4567_89ab_cdef, 1_000, 42),
            encode::commit(0, 10, 20, -5),
            encode::origin(77, "node-a"),
            encode::relation(&sample_relation()),
            encode::relation(&Relation {
                id: 1,
                namespace: String::new(),
                name: "t".into(),
                replica_identity: b'f',
                columns: vec![],
            }),
            encode::type_(600_000, "public", "mood"),
            encode::insert(7, &[Some(b"1"), None, Some(b"")]),
            encode::insert(7, &[]),
            encode::update(7, None, &[Some(b"x")]),
            encode::update(7, Some(&[Some(b"1"), None]), &[Some(b"2"), None]),
            encode::update_values(
                7,
                Some((b'O', &[Value::Binary(&[0, 1, 2]), Value::Null])),
                &[Value::Unchanged, Value::Text(b"v")],
            ),
            encode::delete(7, &[Some(b"1"), None]),
            encode::delete_values(7, b'O', &[Value::Text(b"1"), Value::Unchanged]),
            encode::truncate(TRUNCATE_CASCADE, &[1, 2, 3]),
            encode::truncate(0, &[]),
            encode::message(true, 99, b"outbox", b"{\"a\":1}"),
            encode::message(false, 99, b"", b""),
        ]
    }

    // ---- hand-written wire bytes, checked field by field ----

    #[test]
    fn begin_bytes() {
        let bytes = [
            b'B', //
            0x00, 0x00, 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, // final_lsn
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe, // commit time -2
            0x00, 0x00, 0x03, 0xe8, // xid 1000
        ];
        assert_eq!(
            decode(&bytes),
            Ok(Message::Begin {
                final_lsn: 0x01_0203_0405,
                commit_time_micros: -2,
                xid: 1000,
            })
        );
        assert_eq!(encode::begin(0x01_0203_0405, -2, 1000), bytes);
    }

    #[test]
    fn commit_bytes() {
        let bytes = [
            b'C', 0x00, // flags
            0, 0, 0, 0, 0, 0, 0x01, 0x00, // commit_lsn 256
            0, 0, 0, 0, 0, 0, 0x01, 0x10, // end_lsn 272
            0, 0, 0, 0x01, 0, 0, 0, 0, // commit time 2^32
        ];
        assert_eq!(
            decode(&bytes),
            Ok(Message::Commit {
                flags: 0,
                commit_lsn: 256,
                end_lsn: 272,
                commit_time_micros: 1 << 32,
            })
        );
        assert_eq!(encode::commit(0, 256, 272, 1 << 32), bytes);
    }

    #[test]
    fn origin_bytes() {
        let bytes = [b'O', 0, 0, 0, 0, 0, 0, 0, 9, b'p', b'g', 0];
        assert_eq!(
            decode(&bytes),
            Ok(Message::Origin {
                commit_lsn: 9,
                name: "pg"
            })
        );
        assert_eq!(encode::origin(9, "pg"), bytes);
    }

    #[test]
    fn relation_bytes() {
        let mut bytes = vec![b'R', 0, 0, 0x40, 0x01]; // id 16385
        bytes.extend_from_slice(b"\0"); // namespace "" = pg_catalog
        bytes.extend_from_slice(b"ob\0");
        bytes.push(b'i'); // replica identity: index
        bytes.extend_from_slice(&[0, 2]); // two columns
        bytes.extend_from_slice(&[1, b'k', 0, 0, 0, 0, 23, 0xff, 0xff, 0xff, 0xff]);
        bytes.extend_from_slice(&[0, b'v', 0, 0, 0, 0x04, 0x13, 0, 0, 0, 0x24]);
        let Ok(Message::Relation(rel)) = decode(&bytes) else {
            panic!("not a relation: {:?}", decode(&bytes));
        };
        assert_eq!(rel.id, 16385);
        assert_eq!(rel.namespace, "");
        assert_eq!(rel.name, "ob");
        assert_eq!(rel.replica_identity, b'i');
        assert_eq!(rel.columns.len(), 2);
        assert_eq!(rel.columns[0].name, "k");
        assert!(rel.columns[0].is_key());
        assert_eq!(rel.columns[0].type_oid, 23);
        assert_eq!(rel.columns[0].type_modifier, -1);
        assert_eq!(rel.columns[1].name, "v");
        assert!(!rel.columns[1].is_key());
        assert_eq!(rel.columns[1].type_oid, 1043);
        assert_eq!(rel.columns[1].type_modifier, 36);
        assert_eq!(rel.column_index("v"), Some(1));
        assert_eq!(rel.column_index("nope"), None);
        assert_eq!(encode::relation(&rel), bytes);
    }

    #[test]
    fn type_bytes() {
        let bytes = [b'Y', 0, 0, 0x01, 0x00, b's', 0, b't', b'y', 0];
        assert_eq!(
            decode(&bytes),
            Ok(Message::Type {
                id: 256,
                namespace: "s",
                name: "ty"
            })
        );
        assert_eq!(encode::type_(256, "s", "ty"), bytes);
    }

    #[test]
    fn insert_bytes() {
        let bytes = [
            b'I', 0, 0, 0, 5, b'N', 0, 4, // relation 5, 4 columns
            b't', 0, 0, 0, 2, b'h', b'i', // text "hi"
            b'n', // null
            b'b', 0, 0, 0, 1, 0xff, // binary [0xff]
            b'u', // unchanged toast
        ];
        let Ok(Message::Insert { relation_id, new }) = decode(&bytes) else {
            panic!("not an insert: {:?}", decode(&bytes));
        };
        assert_eq!(relation_id, 5);
        assert_eq!(new.len(), 4);
        assert!(!new.is_empty());
        assert_eq!(new.get(0), Some(Value::Text(b"hi")));
        assert_eq!(new.get(1), Some(Value::Null));
        assert_eq!(new.get(2), Some(Value::Binary(&[0xff])));
        assert_eq!(new.get(3), Some(Value::Unchanged));
        assert_eq!(new.get(4), None);
        assert_eq!(new.get(usize::MAX), None);
        assert_eq!(new.get(0).and_then(|v| v.as_bytes()), Some(&b"hi"[..]));
        assert_eq!(new.get(1).and_then(|v| v.as_bytes()), None);
        assert_eq!(new.iter().len(), 4);
        assert_eq!((&new).into_iter().count(), 4);
        let values = [
            Value::Text(b"hi"),
            Value::Null,
            Value::Binary(&[0xff]),
            Value::Unchanged,
        ];
        assert_eq!(encode::insert_values(5, &values), bytes);
    }

    #[test]
    fn update_bytes() {
        // Without old tuple.
        let bytes = [b'U', 0, 0, 0, 6, b'N', 0, 1, b't', 0, 0, 0, 1, b'z'];
        let Ok(Message::Update {
            relation_id,
            old,
            new,
        }) = decode(&bytes)
        else {
            panic!("not an update: {:?}", decode(&bytes));
        };
        assert_eq!(relation_id, 6);
        assert_eq!(old, None);
        assert_eq!(values(&new), [Value::Text(b"z")]);
        assert_eq!(encode::update(6, None, &[Some(b"z")]), bytes);

        // With old key then new tuple.
        let bytes = [
            b'U', 0, 0, 0, 6, //
            b'K', 0, 2, b't', 0, 0, 0, 1, b'a', b'n', //
            b'N', 0, 2, b't', 0, 0, 0, 1, b'b', b'u',
        ];
        let Ok(Message::Update {
            relation_id,
            old: Some(old),
            new,
        }) = decode(&bytes)
        else {
            panic!("not an update with old: {:?}", decode(&bytes));
        };
        assert_eq!(relation_id, 6);
        assert_eq!(values(&old), [Value::Text(b"a"), Value::Null]);
        assert_eq!(values(&new), [Value::Text(b"b"), Value::Unchanged]);

        // With old full row ('O').
        let mut full = bytes;
        full[5] = b'O';
        assert!(matches!(
            decode(&full),
            Ok(Message::Update { old: Some(_), .. })
        ));
    }

    #[test]
    fn delete_bytes() {
        let bytes = [b'D', 0, 0, 0, 8, b'K', 0, 1, b't', 0, 0, 0, 0];
        let Ok(Message::Delete { relation_id, old }) = decode(&bytes) else {
            panic!("not a delete: {:?}", decode(&bytes));
        };
        assert_eq!(relation_id, 8);
        assert_eq!(values(&old), [Value::Text(b"")]);
        assert_eq!(encode::delete(8, &[Some(b"")]), bytes);

        let mut full = bytes;
        full[5] = b'O';
        assert!(matches!(decode(&full), Ok(Message::Delete { .. })));
    }

    #[test]
    fn truncate_bytes() {
        let bytes = [
            b'T',
            0,
            0,
            0,
            2, // two relations
            TRUNCATE_CASCADE | TRUNCATE_RESTART_IDENTITY,
            0,
            0,
            0,
            10,
            0xff,
            0xff,
            0xff,
            0xff,
        ];
        assert_eq!(
            decode(&bytes),
            Ok(Message::Truncate {
                options: 3,
                relation_ids: vec![10, u32::MAX],
            })
        );
        assert_eq!(encode::truncate(3, &[10, u32::MAX]), bytes);
    }

    #[test]
    fn message_bytes() {
        let bytes = [
            b'M', 1, // transactional
            0, 0, 0, 0, 0, 0, 0, 3, // lsn
            b'p', 0, // prefix
            0, 0, 0, 2, 0, 0xfe, // content (not UTF-8, not NUL-free)
        ];
        assert_eq!(
            decode(&bytes),
            Ok(Message::Message {
                transactional: true,
                lsn: 3,
                prefix: b"p",
                content: &[0, 0xfe],
            })
        );
        assert_eq!(encode::message(true, 3, b"p", &[0, 0xfe]), bytes);
        let mut other = bytes;
        other[1] = 0;
        assert!(matches!(
            decode(&other),
            Ok(Message::Message {
                transactional: false,
                ..
            })
        ));
    }

    // ---- encode → decode round trips per type ----

    #[test]
    fn round_trips() {
        assert_eq!(
            decode(&encode::begin(1, 2, 3)),
            Ok(Message::Begin {
                final_lsn: 1,
                commit_time_micros: 2,
                xid: 3
            })
        );
        assert_eq!(
            decode(&encode::commit(0, u64::MAX, 5, i64::MIN)),
            Ok(Message::Commit {
                flags: 0,
                commit_lsn: u64::MAX,
                end_lsn: 5,
                commit_time_micros: i64::MIN
            })
        );
        assert_eq!(
            decode(&encode::origin(4, "ørigin")),
            Ok(Message::Origin {
                commit_lsn: 4,
                name: "ørigin"
            })
        );
        let rel = sample_relation();
        assert_eq!(decode(&encode::relation(&rel)), Ok(Message::Relation(rel)));
        assert_eq!(
            decode(&encode::type_(1, "", "int")),
            Ok(Message::Type {
                id: 1,
                namespace: "",
                name: "int"
            })
        );

        let insert = encode::insert(9, &[Some(b"a"), None]);
        let Ok(Message::Insert { relation_id, new }) = decode(&insert) else {
            panic!()
        };
        assert_eq!(relation_id, 9);
        assert_eq!(values(&new), [Value::Text(b"a"), Value::Null]);

        let empty = encode::insert(9, &[]);
        let Ok(Message::Insert { new, .. }) = decode(&empty) else {
            panic!()
        };
        assert!(new.is_empty());
        assert_eq!(new.iter().next(), None);

        let update = encode::update(9, Some(&[Some(b"k")]), &[Some(b"k2")]);
        let Ok(Message::Update {
            relation_id,
            old: Some(old),
            new,
        }) = decode(&update)
        else {
            panic!()
        };
        assert_eq!(relation_id, 9);
        assert_eq!(values(&old), [Value::Text(b"k")]);
        assert_eq!(values(&new), [Value::Text(b"k2")]);

        let delete = encode::delete_values(9, b'O', &[Value::Binary(b"\0"), Value::Unchanged]);
        let Ok(Message::Delete { old, .. }) = decode(&delete) else {
            panic!()
        };
        assert_eq!(values(&old), [Value::Binary(b"\0"), Value::Unchanged]);

        assert_eq!(
            decode(&encode::truncate(2, &[1, 2])),
            Ok(Message::Truncate {
                options: 2,
                relation_ids: vec![1, 2]
            })
        );
        assert_eq!(
            decode(&encode::message(false, 8, b"pre", b"body")),
            Ok(Message::Message {
                transactional: false,
                lsn: 8,
                prefix: b"pre",
                content: b"body"
            })
        );
    }

    #[test]
    fn all_samples_decode() {
        for sample in samples() {
            assert!(decode(&sample).is_ok(), "{sample:?}");
        }
    }

    // ---- errors ----

    #[test]
    fn empty() {
        assert_eq!(decode(&[]), Err(DecodeError::Empty));
    }

    #[test]
    fn every_truncation_is_an_error() {
        for sample in samples() {
            for len in 0..sample.len() {
                match decode(&sample[..len]) {
                    Err(DecodeError::Empty) => assert_eq!(len, 0),
                    Err(DecodeError::Truncated { .. }) => {}
                    other => panic!("{:?} cut to {len}: {other:?}", sample),
                }
            }
        }
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        for sample in samples() {
            let mut longer = sample.clone();
            longer.push(0);
            assert_eq!(
                decode(&longer),
                Err(DecodeError::TrailingBytes {
                    tag: sample[0],
                    count: 1
                })
            );
        }
    }

    #[test]
    fn unknown_tag() {
        for tag in [b'Z', b'S', b'E', b'c', b'A', 0, 0xff] {
            assert_eq!(decode(&[tag, 0, 0]), Err(DecodeError::UnknownTag { tag }));
        }
        assert_eq!(
            DecodeError::UnknownTag { tag: b'Z' }.to_string(),
            "unknown pgoutput message tag 0x5a"
        );
    }

    #[test]
    fn unknown_column_kind() {
        let bytes = [b'I', 0, 0, 0, 1, b'N', 0, 2, b'n', b'x'];
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::UnknownColumnKind { kind: b'x' })
        );
    }

    #[test]
    fn bad_utf8() {
        let mut rel = encode::relation(&sample_relation());
        // First byte of "public" (after the tag and the 4-byte id).
        rel[5] = 0xff;
        assert_eq!(
            decode(&rel),
            Err(DecodeError::InvalidUtf8 {
                what: "Relation.namespace"
            })
        );
        let rel = encode::relation(&Relation {
            columns: vec![Column {
                flags: 0,
                name: "\u{fffd}".into(),
                type_oid: 1,
                type_modifier: 1,
            }],
            ..sample_relation()
        });
        let mut bad = rel.clone();
        let pos = rel
            .windows(3)
            .position(|w| w == "\u{fffd}".as_bytes())
            .unwrap();
        bad[pos] = 0xc0;
        assert_eq!(
            decode(&bad),
            Err(DecodeError::InvalidUtf8 {
                what: "Relation.column.name"
            })
        );
        let mut origin = encode::origin(1, "ab");
        origin[9] = 0x80;
        assert_eq!(
            decode(&origin),
            Err(DecodeError::InvalidUtf8 {
                what: "Origin.name"
            })
        );
        let mut ty = encode::type_(1, "a", "b");
        ty[7] = 0xfe;
        assert_eq!(
            decode(&ty),
            Err(DecodeError::InvalidUtf8 { what: "Type.name" })
        );
        // The logical message prefix is raw bytes: no UTF-8 requirement.
        assert!(decode(&encode::message(true, 1, &[0xff], b"")).is_ok());
    }

    #[test]
    fn unexpected_submessages() {
        let tuple = [0u8, 1, b'n'];
        let with = |head: &[u8]| [head, &tuple[..]].concat();
        assert_eq!(
            decode(&with(&[b'I', 0, 0, 0, 1, b'K'])),
            Err(DecodeError::UnexpectedSubmessage {
                message: "Insert",
                byte: b'K'
            })
        );
        assert_eq!(
            decode(&with(&[b'U', 0, 0, 0, 1, b'X'])),
            Err(DecodeError::UnexpectedSubmessage {
                message: "Update",
                byte: b'X'
            })
        );
        assert_eq!(
            decode(&encode::update_values(1, Some((b'Q', &[])), &[])),
            Err(DecodeError::UnexpectedSubmessage {
                message: "Update",
                byte: b'Q'
            })
        );
        // Old tuple followed by something other than 'N'.
        let mut update = encode::update(1, Some(&[None]), &[None]);
        let n = update.iter().rposition(|&b| b == b'N').unwrap();
        update[n] = b'K';
        assert_eq!(
            decode(&update),
            Err(DecodeError::UnexpectedSubmessage {
                message: "Update",
                byte: b'K'
            })
        );
        assert_eq!(
            decode(&with(&[b'D', 0, 0, 0, 1, b'N'])),
            Err(DecodeError::UnexpectedSubmessage {
                message: "Delete",
                byte: b'N'
            })
        );
    }

    #[test]
    fn negative_lengths() {
        let bytes = [b'I', 0, 0, 0, 1, b'N', 0, 1, b't', 0xff, 0xff, 0xff, 0xff];
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::NegativeLength {
                what: "TupleData.text_length",
                len: -1
            })
        );
        let bytes = [b'T', 0x80, 0, 0, 0, 0];
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::NegativeLength {
                what: "Truncate.relation_count",
                len: i32::MIN
            })
        );
    }

    #[test]
    fn forged_counts_do_not_allocate_or_overread() {
        // Claims i32::MAX relation ids and 65535 columns with almost no bytes behind them.
        assert_eq!(
            decode(&[b'T', 0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 0, 1]),
            Err(DecodeError::Truncated {
                what: "Truncate.relation_id"
            })
        );
        assert_eq!(
            decode(&[b'R', 0, 0, 0, 1, 0, 0, b'd', 0xff, 0xff]),
            Err(DecodeError::Truncated {
                what: "Relation.column.flags"
            })
        );
        assert_eq!(
            decode(&[b'I', 0, 0, 0, 1, b'N', 0xff, 0xff, b'n']),
            Err(DecodeError::Truncated {
                what: "TupleData.column_kind"
            })
        );
        assert_eq!(
            decode(&[b'M', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x7f, 0xff, 0xff, 0xff]),
            Err(DecodeError::Truncated {
                what: "Message.content"
            })
        );
    }

    // ---- properties ----

    /// Decodes and, if that worked, touches every value, so lazy decoding is exercised too.
    fn decode_fully(bytes: &[u8]) {
        let Ok(message) = decode(bytes) else { return };
        let tuples = match &message {
            Message::Insert { new, .. } => vec![*new],
            Message::Update { old, new, .. } => old.iter().copied().chain([*new]).collect(),
            Message::Delete { old, .. } => vec![*old],
            _ => vec![],
        };
        for t in tuples {
            let all: Vec<_> = t.iter().collect();
            assert_eq!(all.len(), t.len());
            for (i, v) in all.iter().enumerate() {
                assert_eq!(t.get(i), Some(*v));
            }
            assert_eq!(t.get(t.len()), None);
        }
    }

    #[derive(Debug, Clone)]
    enum Mutation {
        Flip { at: usize, bit: u8 },
        Set { at: usize, byte: u8 },
        Insert { at: usize, byte: u8 },
        Remove { at: usize },
        Truncate { at: usize },
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
            (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Set { at, byte }),
            (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Insert { at, byte }),
            any::<usize>().prop_map(|at| Mutation::Remove { at }),
            any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        ]
    }

    fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
        let len = bytes.len();
        match *m {
            _ if len == 0 => {
                if let Mutation::Insert { byte, .. } = *m {
                    bytes.push(byte);
                }
            }
            Mutation::Flip { at, bit } => bytes[at % len] ^= 1 << bit,
            Mutation::Set { at, byte } => bytes[at % len] = byte,
            Mutation::Insert { at, byte } => bytes.insert(at % (len + 1), byte),
            Mutation::Remove { at } => {
                bytes.remove(at % len);
            }
            Mutation::Truncate { at } => bytes.truncate(at % len),
        }
    }

    #[derive(Debug, Clone)]
    enum OwnedValue {
        Null,
        Unchanged,
        Text(Vec<u8>),
        Binary(Vec<u8>),
    }

    impl OwnedValue {
        fn borrow(&self) -> Value<'_> {
            match self {
                OwnedValue::Null => Value::Null,
                OwnedValue::Unchanged => Value::Unchanged,
                OwnedValue::Text(b) => Value::Text(b),
                OwnedValue::Binary(b) => Value::Binary(b),
            }
        }
    }

    fn borrow(values: &[OwnedValue]) -> Vec<Value<'_>> {
        values.iter().map(OwnedValue::borrow).collect()
    }

    fn owned_value() -> impl Strategy<Value = OwnedValue> {
        prop_oneof![
            Just(OwnedValue::Null),
            Just(OwnedValue::Unchanged),
            proptest::collection::vec(any::<u8>(), 0..16).prop_map(OwnedValue::Text),
            proptest::collection::vec(any::<u8>(), 0..16).prop_map(OwnedValue::Binary),
        ]
    }

    fn name() -> impl Strategy<Value = String> {
        // PostgreSQL names never contain NUL, which terminates strings on the wire.
        "[^\u{0}]{0,12}"
    }

    fn relation_strategy() -> impl Strategy<Value = Relation> {
        let column = (any::<u8>(), name(), any::<u32>(), any::<i32>()).prop_map(
            |(flags, name, type_oid, type_modifier)| Column {
                flags,
                name,
                type_oid,
                type_modifier,
            },
        );
        (
            any::<u32>(),
            name(),
            name(),
            any::<u8>(),
            proptest::collection::vec(column, 0..8),
        )
            .prop_map(
                |(id, namespace, name, replica_identity, columns)| Relation {
                    id,
                    namespace,
                    name,
                    replica_identity,
                    columns,
                },
            )
    }

    fn values_strategy() -> impl Strategy<Value = Vec<OwnedValue>> {
        proptest::collection::vec(owned_value(), 0..8)
    }

    /// Valid encodings of every message type with arbitrary contents.
    fn valid_message() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            (any::<u64>(), any::<i64>(), any::<u32>()).prop_map(|(a, b, c)| encode::begin(a, b, c)),
            (any::<u8>(), any::<u64>(), any::<u64>(), any::<i64>())
                .prop_map(|(a, b, c, d)| encode::commit(a, b, c, d)),
            (any::<u64>(), name()).prop_map(|(lsn, n)| encode::origin(lsn, &n)),
            relation_strategy().prop_map(|r| encode::relation(&r)),
            (any::<u32>(), name(), name()).prop_map(|(id, ns, n)| encode::type_(id, &ns, &n)),
            (any::<u32>(), values_strategy())
                .prop_map(|(id, v)| encode::insert_values(id, &borrow(&v))),
            (
                any::<u32>(),
                proptest::option::of((prop_oneof![Just(b'K'), Just(b'O')], values_strategy())),
                values_strategy()
            )
                .prop_map(|(id, old, new)| {
                    let old = old.as_ref().map(|(k, v)| (*k, borrow(v)));
                    encode::update_values(
                        id,
                        old.as_ref().map(|(k, v)| (*k, v.as_slice())),
                        &borrow(&new),
                    )
                }),
            (
                any::<u32>(),
                prop_oneof![Just(b'K'), Just(b'O')],
                values_strategy()
            )
                .prop_map(|(id, k, v)| encode::delete_values(id, k, &borrow(&v))),
            (any::<u8>(), proptest::collection::vec(any::<u32>(), 0..8))
                .prop_map(|(o, ids)| encode::truncate(o, &ids)),
            (
                any::<bool>(),
                any::<u64>(),
                proptest::collection::vec(1u8..=255, 0..8),
                proptest::collection::vec(any::<u8>(), 0..32)
            )
                .prop_map(|(t, lsn, p, c)| encode::message(t, lsn, &p, &c)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            decode_fully(&bytes);
        }

        #[test]
        fn arbitrary_bytes_with_valid_tag_never_panic(
            tag in proptest::sample::select(b"BCORYIUDTM".to_vec()),
            body in proptest::collection::vec(any::<u8>(), 0..128),
        ) {
            let bytes = [&[tag][..], &body].concat();
            decode_fully(&bytes);
        }

        #[test]
        fn valid_messages_decode(bytes in valid_message()) {
            prop_assert!(decode(&bytes).is_ok());
            decode_fully(&bytes);
        }

        #[test]
        fn mutated_messages_never_panic(
            mut bytes in valid_message(),
            mutations in proptest::collection::vec(mutation(), 1..6),
        ) {
            for m in &mutations {
                apply(&mut bytes, m);
                decode_fully(&bytes);
            }
        }
    }

    proptest! {
        #[test]
        fn relation_round_trip(rel in relation_strategy()) {
            let bytes = encode::relation(&rel);
            prop_assert_eq!(decode(&bytes), Ok(Message::Relation(rel)));
        }

        #[test]
        fn insert_round_trip(id in any::<u32>(), new in proptest::collection::vec(owned_value(), 0..32)) {
            let expected: Vec<Value<'_>> = new.iter().map(OwnedValue::borrow).collect();
            let bytes = encode::insert_values(id, &expected);
            let Ok(Message::Insert { relation_id, new: tuple }) = decode(&bytes) else {
                panic!("did not decode: {:?}", decode(&bytes));
            };
            prop_assert_eq!(relation_id, id);
            prop_assert_eq!(tuple.len(), expected.len());
            prop_assert_eq!(values(&tuple), expected);
        }

        #[test]
        fn text_insert_round_trip(
            id in any::<u32>(),
            new in proptest::collection::vec(proptest::option::of(proptest::collection::vec(any::<u8>(), 0..16)), 0..16),
        ) {
            let cells: Vec<Option<&[u8]>> = new.iter().map(|c| c.as_deref()).collect();
            let bytes = encode::insert(id, &cells);
            let Ok(Message::Insert { new: tuple, .. }) = decode(&bytes) else {
                panic!("did not decode");
            };
            let decoded: Vec<Option<&[u8]>> = tuple
                .iter()
                .map(|v| match v {
                    Value::Null => None,
                    Value::Text(b) => Some(b),
                    other => panic!("unexpected {other:?}"),
                })
                .collect();
            prop_assert_eq!(decoded, cells);
        }
    }
}
