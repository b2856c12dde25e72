//! The contiguous-ack watermark: which source position may be confirmed.
//!
//! Every committed transaction (logical mode) or batch of rows (polling mode) becomes a *unit*
//! that ends at a source position and holds a count of records not yet acknowledged by Kafka.
//! Kafka acknowledges records out of order across partitions; this module does not care. A
//! position may be confirmed to the source only when the unit ending there, and every unit
//! before it, has no record left unacknowledged. Confirming further would lose events on a
//! crash (the source never resends what it was told is safe); confirming less only duplicates
//! them after a restart.
//!
//! Units are numbered in arrival order. Records carry their unit's number as the librdkafka
//! delivery opaque, so an acknowledgement costs one lookup in a ring buffer.
//!
//! A unit sealed with no records (a transaction of ignored changes, or of foreign logical
//! messages) behind one still waiting is merged into that one: it only moves the position the
//! waiting unit confirms. So during a Kafka outage a busy database's empty transactions cost
//! nothing, instead of one queued unit each.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

/// A unit's number, handed to the producer with each record and returned with its ack.
pub type UnitId = u64;

/// A source position as the progress record of exactly-once delivery writes it (text, so an
/// operator can read the record), and back.
pub trait Progress: Sized {
    fn to_progress(&self) -> String;
    fn from_progress(text: &str) -> Option<Self>;
}

/// An LSN, written as Postgres writes it (`16/B374D848`).
impl Progress for u64 {
    fn to_progress(&self) -> String {
        format!("{:X}/{:X}", self >> 32, self & 0xFFFF_FFFF)
    }

    fn from_progress(text: &str) -> Option<Self> {
        let (hi, lo) = text.split_once('/')?;
        let hi = u32::from_str_radix(hi, 16).ok()?;
        let lo = u32::from_str_radix(lo, 16).ok()?;
        Some((u64::from(hi) << 32) | u64::from(lo))
    }
}

/// The one watermark of a pipeline session, shared by the pipeline (which opens and seals
/// units and takes confirmable positions) and the sink's delivery reports (which acknowledge).
#[derive(Debug)]
pub struct Watermark<P> {
    checkpoint: Mutex<Checkpoint<P>>,
}

impl<P: Copy + Ord> Default for Watermark<P> {
    fn default() -> Self {
        Self::new()
    }
}

impl<P: Copy + Ord> Watermark<P> {
    pub fn new() -> Self {
        Self {
            checkpoint: Mutex::new(Checkpoint::new()),
        }
    }

    /// The watermark, locked. A panic while holding the lock can't leave the counters
    /// half-updated in a way that matters more than stopping would; keep going with the data.
    pub fn lock(&self) -> MutexGuard<'_, Checkpoint<P>> {
        self.checkpoint
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[derive(Debug)]
struct Unit<P> {
    /// Records produced for this unit and not yet acknowledged.
    pending: u32,
    /// The position that may be confirmed once this unit and all before it are done; `None`
    /// while the unit is still being read (a transaction before its `Commit`).
    end: Option<P>,
    /// When the unit's data was committed at the source, for latency measurements.
    committed_at: Option<Instant>,
}

/// The watermark. `P` is the source position: an LSN in logical mode, a `(txid, seq)` cursor
/// in polling mode.
#[derive(Debug)]
pub struct Checkpoint<P> {
    units: VecDeque<Unit<P>>,
    /// The id of `units[0]`.
    first: UnitId,
    /// Records produced and not yet acknowledged, across all units.
    inflight: u64,
    /// The newest position that became confirmable and has not been taken yet.
    confirmable: Option<P>,
    /// Exactly once: positions become confirmable only when a Kafka transaction covering them
    /// committed ([`Self::release`]), not when their records are acknowledged.
    held: bool,
    /// The newest end sealed, or seen while idle: what a Kafka transaction committed now
    /// covers.
    covered: Option<P>,
    /// Inside a source transaction: the transaction (its key) and how many of its events
    /// have been published so far; cleared when a unit is sealed.
    partial: Option<(P, u64)>,
}

impl<P: Copy + Ord> Default for Checkpoint<P> {
    fn default() -> Self {
        Self::new()
    }
}

impl<P: Copy + Ord> Checkpoint<P> {
    pub fn new() -> Self {
        Self {
            units: VecDeque::new(),
            first: 0,
            inflight: 0,
            confirmable: None,
            held: false,
            covered: None,
            partial: None,
        }
    }

    /// Inside the source transaction `key`: its first `events` events are published.
    pub fn within(&mut self, key: P, events: u64) {
        self.partial = Some((key, events));
    }

    /// Where the open source transaction stands, if one is open and has published events.
    pub fn partial(&self) -> Option<(P, u64)> {
        self.partial
    }

    /// Exactly once: from now on a position is confirmable only once [`Self::release`]d.
    pub fn hold(&mut self) {
        self.held = true;
        self.confirmable = None;
    }

    /// Exactly once: the session starts at `position` (everything before it is in Kafka), so
    /// even its first transaction, inside a large source transaction, records a position.
    pub fn start_at(&mut self, position: P) {
        self.covered = self.covered.max(Some(position));
    }

    /// Exactly once: a Kafka transaction covering everything up to `position` committed.
    pub fn release(&mut self, position: P) {
        self.confirmable = self.confirmable.max(Some(position));
    }

    /// The newest position sealed or seen idle: at a boundary with nothing in flight, a
    /// transaction committed now covers everything up to it.
    pub fn covered(&self) -> Option<P> {
        self.covered
    }

    /// True when a unit is still being read (its transaction's end is not known yet).
    pub fn has_open_unit(&self) -> bool {
        self.units.iter().any(|u| u.end.is_none())
    }

    /// Everything up to `position` has been read and no transaction is open: returns what may
    /// be confirmed now. When no unit is pending that includes `position` itself (an idle
    /// outbox on a busy database must not pin WAL), except when held: then `position` waits
    /// for a transaction recording it.
    pub fn idle_at(&mut self, position: P) -> Option<P> {
        let mut to = self.take_confirmable();
        if self.is_idle() {
            if self.held {
                self.covered = self.covered.max(Some(position));
            } else {
                to = to.max(Some(position));
            }
        }
        to
    }

    /// Starts a unit (a transaction's `Begin`). Records are added with [`Self::add`] and the
    /// unit is closed with [`Self::seal`].
    pub fn open(&mut self, committed_at: Option<Instant>) -> UnitId {
        self.units.push_back(Unit {
            pending: 0,
            end: None,
            committed_at,
        });
        self.first + self.units.len() as u64 - 1
    }

    /// Counts one more record of `unit` as produced and awaiting its ack.
    pub fn add(&mut self, unit: UnitId) {
        if let Some(u) = self.unit_mut(unit) {
            u.pending += 1;
            self.inflight += 1;
        }
    }

    /// Closes `unit` at `end`: once its records are acknowledged, `end` may be confirmed.
    pub fn seal(&mut self, unit: UnitId, end: P) {
        if let Some(u) = self.unit_mut(unit) {
            u.end = Some(end);
        }
        self.covered = self.covered.max(Some(end));
        self.partial = None;
        self.merge_empty_tail(unit, end);
        self.advance();
    }

    /// Folds `unit`, just sealed at `end`, into the unit before it when it has no records, is
    /// the newest, and that one is sealed too: confirming the earlier unit's end then would
    /// confirm this one's as well, since nothing lies between. Its id is free again: no record
    /// carries it.
    fn merge_empty_tail(&mut self, unit: UnitId, end: P) {
        let len = self.units.len();
        if len < 2 || unit != self.first + len as u64 - 1 || self.units[len - 1].pending != 0 {
            return;
        }
        let previous = &mut self.units[len - 2];
        match previous.end {
            Some(prev_end) if prev_end <= end => previous.end = Some(end),
            _ => return,
        }
        self.units.pop_back();
    }

    /// Records one Kafka acknowledgement for `unit`. Returns when the unit was committed, for
    /// latency measurement. An ack for an unknown unit (already retired) is ignored.
    pub fn ack(&mut self, unit: UnitId) -> Option<Instant> {
        let u = self.unit_mut(unit)?;
        if u.pending == 0 {
            return None;
        }
        u.pending -= 1;
        let committed_at = u.committed_at;
        self.inflight -= 1;
        if unit == self.first {
            self.advance();
        }
        committed_at
    }

    /// The newest confirmable position not returned before, if any.
    pub fn take_confirmable(&mut self) -> Option<P> {
        self.confirmable.take()
    }

    /// Records produced and not yet acknowledged.
    pub fn inflight(&self) -> u64 {
        self.inflight
    }

    /// When the oldest unit still waiting was committed: the age of the oldest event not yet
    /// confirmable.
    pub fn oldest_committed_at(&self) -> Option<Instant> {
        self.units.front().and_then(|u| u.committed_at)
    }

    /// True when no unit is open or waiting for acks: everything read has been confirmed
    /// or is confirmable.
    pub fn is_idle(&self) -> bool {
        self.units.is_empty()
    }

    /// Units held: open, or waiting for acks of their own or of an earlier unit.
    pub fn units(&self) -> usize {
        self.units.len()
    }

    fn unit_mut(&mut self, unit: UnitId) -> Option<&mut Unit<P>> {
        let index = usize::try_from(unit.checked_sub(self.first)?).ok()?;
        self.units.get_mut(index)
    }

    /// Retires finished units from the front, remembering the newest end among them.
    fn advance(&mut self) {
        while let Some(front) = self.units.front() {
            match front.end {
                Some(end) if front.pending == 0 => {
                    if !self.held {
                        self.confirmable = Some(match self.confirmable {
                            Some(prev) if prev > end => prev,
                            _ => end,
                        });
                    }
                    self.units.pop_front();
                    self.first += 1;
                }
                _ => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn empty_transaction_is_confirmable_at_once() {
        let mut c = Checkpoint::<u64>::new();
        let u = c.open(None);
        assert_eq!(c.take_confirmable(), None);
        c.seal(u, 100);
        assert_eq!(c.take_confirmable(), Some(100));
        assert!(c.is_idle());
    }

    #[test]
    fn never_confirms_inside_an_open_transaction() {
        let mut c = Checkpoint::<u64>::new();
        let u = c.open(None);
        c.add(u);
        c.ack(u);
        // All acked, but the Commit has not been read yet.
        assert_eq!(c.take_confirmable(), None);
        assert!(!c.is_idle());
        c.seal(u, 7);
        assert_eq!(c.take_confirmable(), Some(7));
    }

    #[test]
    fn out_of_order_acks_wait_for_the_oldest_unit() {
        let mut c = Checkpoint::<u64>::new();
        let a = c.open(None);
        c.add(a);
        c.add(a);
        c.seal(a, 10);
        let b = c.open(None);
        c.add(b);
        c.seal(b, 20);
        let d = c.open(None);
        c.seal(d, 30);

        c.ack(b);
        assert_eq!(c.take_confirmable(), None, "a is still pending");
        c.ack(a);
        assert_eq!(c.take_confirmable(), None, "a has one more record");
        assert_eq!(c.inflight(), 1);
        c.ack(a);
        assert_eq!(
            c.take_confirmable(),
            Some(30),
            "a, b and the empty d are done"
        );
        assert_eq!(c.inflight(), 0);
        assert!(c.is_idle());
    }

    #[test]
    fn stray_and_duplicate_acks_are_ignored() {
        let mut c = Checkpoint::<u64>::new();
        let a = c.open(None);
        c.add(a);
        c.seal(a, 5);
        let b = c.open(None);
        c.add(b);
        c.seal(b, 6);
        c.ack(a);
        assert_eq!(c.take_confirmable(), Some(5));
        assert_eq!(c.ack(a), None, "a is retired");
        assert_eq!(c.ack(999), None);
        assert_eq!(c.take_confirmable(), None, "b still pending");
        c.ack(b);
        assert_eq!(c.take_confirmable(), Some(6));
    }

    #[test]
    fn reports_commit_time_with_each_ack() {
        let mut c = Checkpoint::<u64>::new();
        let t = Instant::now();
        let a = c.open(Some(t));
        c.add(a);
        assert_eq!(c.oldest_committed_at(), Some(t));
        assert_eq!(c.ack(a), Some(t));
        c.seal(a, 1);
        assert_eq!(c.oldest_committed_at(), None);
    }

    #[test]
    fn empty_units_behind_a_waiting_one_cost_nothing() {
        let mut c = Checkpoint::<u64>::new();
        let a = c.open(None);
        c.add(a);
        c.seal(a, 1);
        for i in 0..1_000_000u64 {
            let u = c.open(None);
            c.seal(u, 2 + i);
            assert!(c.units() <= 2, "unit {i} was kept");
        }
        assert_eq!(c.units(), 1, "every empty unit merged into the waiting one");
        assert_eq!(c.take_confirmable(), None, "a's record is still out");
        // A unit with records still gets its own place, and ids stay usable.
        let b = c.open(None);
        c.add(b);
        let after = c.open(None);
        c.seal(b, 2_000_000);
        c.seal(after, 2_000_001);
        assert_eq!(c.units(), 2);
        c.ack(a);
        assert_eq!(
            c.take_confirmable(),
            Some(1_000_001),
            "a and the empty ones"
        );
        c.ack(b);
        assert_eq!(c.take_confirmable(), Some(2_000_001));
        assert!(c.is_idle());
        assert_eq!(c.inflight(), 0);
    }

    #[test]
    fn an_empty_unit_behind_an_open_one_is_kept() {
        let mut c = Checkpoint::<u64>::new();
        let open = c.open(None);
        c.add(open);
        let empty = c.open(None);
        c.seal(empty, 50);
        assert_eq!(c.units(), 2, "the open unit's end is not known yet");
        c.ack(open);
        c.seal(open, 40);
        assert_eq!(c.take_confirmable(), Some(50));
    }

    #[test]
    fn held_positions_wait_for_their_transaction() {
        let mut c = Checkpoint::<u64>::new();
        c.hold();
        let a = c.open(None);
        c.add(a);
        c.seal(a, 10);
        c.ack(a);
        assert_eq!(c.take_confirmable(), None, "acknowledged, not committed");
        assert_eq!(c.covered(), Some(10));
        assert_eq!(
            c.idle_at(20),
            None,
            "an idle position waits for a transaction too"
        );
        assert_eq!(c.covered(), Some(20));
        c.release(20);
        assert_eq!(c.take_confirmable(), Some(20));
        let mut free = Checkpoint::<u64>::new();
        assert_eq!(
            free.idle_at(5),
            Some(5),
            "not held: idle positions go at once"
        );
    }

    #[test]
    fn a_partial_transaction_is_known_until_sealed() {
        let mut c = Checkpoint::<u64>::new();
        let a = c.open(None);
        assert_eq!(c.partial(), None);
        c.within(40, 1);
        c.within(40, 2);
        assert_eq!(c.partial(), Some((40, 2)));
        c.seal(a, 48);
        assert_eq!(c.partial(), None, "a sealed transaction is whole");
        assert_eq!(c.covered(), Some(48));
    }

    #[test]
    fn an_open_unit_is_seen() {
        let mut c = Checkpoint::<u64>::new();
        let a = c.open(None);
        assert!(c.has_open_unit());
        c.seal(a, 1);
        assert!(!c.has_open_unit());
    }

    #[test]
    fn lsn_progress_reads_back() {
        for lsn in [0u64, 1, 0x16_B374_D848, u64::MAX] {
            assert_eq!(u64::from_progress(&lsn.to_progress()), Some(lsn));
        }
        assert_eq!(0x16_B374_D848u64.to_progress(), "16/B374D848");
        assert_eq!(u64::from_progress("x/1"), None);
        assert_eq!(u64::from_progress("12"), None);
    }

    proptest! {
        /// Whatever the ack order, the confirmed position never passes a unit with an
        /// unacknowledged record, and ends at the last unit's end once all are acked.
        #[test]
        fn confirms_only_contiguous_acks(
            sizes in proptest::collection::vec(0u32..4, 1..30),
            order_seed in proptest::collection::vec(any::<u32>(), 0..200),
        ) {
            let mut c = Checkpoint::<u64>::new();
            let mut records = Vec::new();
            for (i, &n) in sizes.iter().enumerate() {
                let u = c.open(None);
                for _ in 0..n {
                    c.add(u);
                    records.push((u, i));
                }
                c.seal(u, (i as u64 + 1) * 10);
            }
            // Shuffle the acks deterministically from the seed.
            let mut acks = records.clone();
            for (i, s) in order_seed.iter().enumerate() {
                if acks.len() > 1 {
                    let j = i % acks.len();
                    let k = (*s as usize) % acks.len();
                    acks.swap(j, k);
                }
            }
            let mut acked = vec![0u32; sizes.len()];
            let mut confirmed = 0u64;
            if let Some(p) = c.take_confirmable() { confirmed = p; }
            for (u, i) in acks {
                c.ack(u);
                acked[i] += 1;
                if let Some(p) = c.take_confirmable() {
                    prop_assert!(p >= confirmed);
                    confirmed = p;
                }
                // Every unit at or before the confirmed position is fully acked.
                for (i, &n) in sizes.iter().enumerate() {
                    if (i as u64 + 1) * 10 <= confirmed {
                        prop_assert_eq!(acked[i], n);
                    }
                }
            }
            prop_assert_eq!(confirmed, sizes.len() as u64 * 10);
            prop_assert!(c.is_idle());
            prop_assert_eq!(c.inflight(), 0);
        }
    }
}
