//! Builds pgoutput wire bytes, for the crate's unit tests (the decoder's and the logical
//! source's); compiled only under `cfg(test)`.
//!
//! Strings must not contain NUL (PostgreSQL names cannot). So that building never panics, tuples
//! longer than `u16::MAX` columns and values longer than `i32::MAX` bytes are clipped, keeping
//! the written count equal to what follows; PostgreSQL never gets near either limit.

use super::{Relation, Value};

/// `B`: Begin.
pub fn begin(final_lsn: u64, commit_time_micros: i64, xid: u32) -> Vec<u8> {
    let mut out = vec![b'B'];
    out.extend_from_slice(&final_lsn.to_be_bytes());
    out.extend_from_slice(&commit_time_micros.to_be_bytes());
    out.extend_from_slice(&xid.to_be_bytes());
    out
}

/// `C`: Commit.
pub fn commit(flags: u8, commit_lsn: u64, end_lsn: u64, commit_time_micros: i64) -> Vec<u8> {
    let mut out = vec![b'C', flags];
    out.extend_from_slice(&commit_lsn.to_be_bytes());
    out.extend_from_slice(&end_lsn.to_be_bytes());
    out.extend_from_slice(&commit_time_micros.to_be_bytes());
    out
}

/// `O`: Origin.
pub fn origin(commit_lsn: u64, name: &str) -> Vec<u8> {
    let mut out = vec![b'O'];
    out.extend_from_slice(&commit_lsn.to_be_bytes());
    put_cstr(&mut out, name.as_bytes());
    out
}

/// `R`: Relation.
pub fn relation(rel: &Relation) -> Vec<u8> {
    let mut out = vec![b'R'];
    out.extend_from_slice(&rel.id.to_be_bytes());
    put_cstr(&mut out, rel.namespace.as_bytes());
    put_cstr(&mut out, rel.name.as_bytes());
    out.push(rel.replica_identity);
    let count = u16::try_from(rel.columns.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&count.to_be_bytes());
    for column in rel.columns.iter().take(usize::from(count)) {
        out.push(column.flags);
        put_cstr(&mut out, column.name.as_bytes());
        out.extend_from_slice(&column.type_oid.to_be_bytes());
        out.extend_from_slice(&column.type_modifier.to_be_bytes());
    }
    out
}

/// `Y`: Type.
pub fn type_(id: u32, namespace: &str, name: &str) -> Vec<u8> {
    let mut out = vec![b'Y'];
    out.extend_from_slice(&id.to_be_bytes());
    put_cstr(&mut out, namespace.as_bytes());
    put_cstr(&mut out, name.as_bytes());
    out
}

/// `I`: Insert of text values, `None` being NULL.
pub fn insert(relation_id: u32, new: &[Option<&[u8]>]) -> Vec<u8> {
    insert_values(relation_id, &text(new))
}

/// `U`: Update of text values, `None` being NULL. An old tuple is sent as `K` (key), as
/// PostgreSQL does with the default replica identity when the key changes.
pub fn update(relation_id: u32, old: Option<&[Option<&[u8]>]>, new: &[Option<&[u8]>]) -> Vec<u8> {
    let old = old.map(text);
    update_values(
        relation_id,
        old.as_deref().map(|values| (b'K', values)),
        &text(new),
    )
}

/// `D`: Delete with the old key (`K`) as text values, `None` being NULL.
pub fn delete(relation_id: u32, old: &[Option<&[u8]>]) -> Vec<u8> {
    delete_values(relation_id, b'K', &text(old))
}

/// `I` with any column kinds.
pub fn insert_values(relation_id: u32, new: &[Value<'_>]) -> Vec<u8> {
    let mut out = vec![b'I'];
    out.extend_from_slice(&relation_id.to_be_bytes());
    out.push(b'N');
    tuple(&mut out, new);
    out
}

/// `U` with any column kinds; `old` is the submessage byte (`K` or `O`, anything else to
/// build invalid input) and the old values.
pub fn update_values(
    relation_id: u32,
    old: Option<(u8, &[Value<'_>])>,
    new: &[Value<'_>],
) -> Vec<u8> {
    let mut out = vec![b'U'];
    out.extend_from_slice(&relation_id.to_be_bytes());
    if let Some((kind, values)) = old {
        out.push(kind);
        tuple(&mut out, values);
    }
    out.push(b'N');
    tuple(&mut out, new);
    out
}

/// `D` with any column kinds; `kind` is the submessage byte (`K` or `O`).
pub fn delete_values(relation_id: u32, kind: u8, old: &[Value<'_>]) -> Vec<u8> {
    let mut out = vec![b'D'];
    out.extend_from_slice(&relation_id.to_be_bytes());
    out.push(kind);
    tuple(&mut out, old);
    out
}

/// `T`: Truncate; `options` as in [`super::TRUNCATE_CASCADE`].
pub fn truncate(options: u8, relation_ids: &[u32]) -> Vec<u8> {
    let count = i32::try_from(relation_ids.len()).unwrap_or(i32::MAX);
    let mut out = vec![b'T'];
    out.extend_from_slice(&count.to_be_bytes());
    out.push(options);
    for id in relation_ids.iter().take(clip(count)) {
        out.extend_from_slice(&id.to_be_bytes());
    }
    out
}

/// `M`: logical decoding message.
pub fn message(transactional: bool, lsn: u64, prefix: &[u8], content: &[u8]) -> Vec<u8> {
    let mut out = vec![b'M', u8::from(transactional)];
    out.extend_from_slice(&lsn.to_be_bytes());
    put_cstr(&mut out, prefix);
    put_counted(&mut out, content);
    out
}

/// Appends a TupleData.
pub fn tuple(out: &mut Vec<u8>, values: &[Value<'_>]) {
    let count = u16::try_from(values.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&count.to_be_bytes());
    for value in values.iter().take(usize::from(count)) {
        match *value {
            Value::Null => out.push(b'n'),
            Value::Unchanged => out.push(b'u'),
            Value::Text(bytes) => {
                out.push(b't');
                put_counted(out, bytes);
            }
            Value::Binary(bytes) => {
                out.push(b'b');
                put_counted(out, bytes);
            }
        }
    }
}

fn text<'a>(values: &[Option<&'a [u8]>]) -> Vec<Value<'a>> {
    values
        .iter()
        .map(|v| v.map_or(Value::Null, Value::Text))
        .collect()
}

fn put_cstr(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(s);
    out.push(0);
}

/// Appends an Int32 length and the bytes, clipped to `i32::MAX`.
fn put_counted(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = i32::try_from(bytes.len()).unwrap_or(i32::MAX);
    let bytes = bytes.get(..clip(len)).unwrap_or(bytes);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
}

/// A non-negative `i32` as `usize`.
fn clip(n: i32) -> usize {
    usize::try_from(n).unwrap_or(0)
}
