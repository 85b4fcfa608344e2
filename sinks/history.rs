//! Turns a batch of whole logged transactions into what an SCD2 target must record: per
//! table, per key, one event for each transaction that touched the key — a new version of
//! the row as the transaction committed it, or the end of the key's current version — with
//! the chain between a key's events in the batch already worked out. Pure: no I/O, so it is
//! tested on its own.
//!
//! Rules: several changes to one key in one transaction are one event (the committed state);
//! a key created and removed inside one transaction leaves none. A delete ends the current
//! version, or with tombstones adds a version marked deleted that keeps the row's last
//! values. An update that moves a row to another key ends the old key and creates the new
//! one. A truncate ends every current version of the table. Each version's `valid_to` is the
//! commit time of the key's next event in the batch (None: still current when the batch
//! ends). An unchanged TOAST value is taken from the key's previous version in the batch;
//! when the batch does not know it, it stays `UnchangedToast` and the target's latest earlier
//! version (of the key, or of the key the row moved from: `carry_from`) supplies it.

use std::collections::HashMap;
use std::sync::Arc;

use super::collapse::{fill_unchanged, key_of, CollapseError};
use crate::event::{ChangeEvent, Op, Position, Relation, RelationId, Row, TxBegin, Value};

/// What one transaction did to one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A version of a key that did not exist before the transaction.
    Created,
    /// A version of a key that existed before the transaction.
    Updated,
    /// A version recording that the key was deleted (only with tombstones).
    Tombstone,
    /// The key's current version ends; nothing new is recorded.
    Closed,
    /// The first version of a key, as the initial snapshot read it.
    Read,
    /// A version as an incremental snapshot read it: it may end one the stream recorded.
    IncrementalRead,
}

impl EventKind {
    /// `_tidemark_op` of the version; `x` for an event that only closes.
    pub fn code(self) -> &'static str {
        match self {
            EventKind::Created => "c",
            EventKind::Updated => "u",
            EventKind::Tombstone => "d",
            EventKind::Closed => "x",
            EventKind::Read | EventKind::IncrementalRead => "r",
        }
    }

    pub fn is_version(self) -> bool {
        self != EventKind::Closed
    }
}

/// The version that holds a moved row's unchanged TOAST values: the latest version of the
/// key `from` (a row holding its key columns) committed before `before`, the move's commit.
#[derive(Debug, Clone, PartialEq)]
pub struct Carry {
    pub from: Row,
    pub before: Position,
}

/// One key's event in one committed transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyEvent {
    pub kind: EventKind,
    /// The row as committed (a tombstone: its last values; a close: its key).
    pub row: Row,
    /// Where the target finds the unchanged TOAST values of a row that moved from another
    /// key (None: the key's own latest version before this one).
    pub carry_from: Option<Carry>,
    /// Commit LSN and time of the transaction.
    pub lsn: Position,
    pub at: i64,
    /// Commit LSN of the key's previous event in the batch.
    pub previous: Option<Position>,
    /// Commit time of the key's next event in the batch (versions only).
    pub valid_to: Option<i64>,
    /// Commit LSN of that event (or of the truncate that ends the version).
    pub closed_by: Option<Position>,
}

impl KeyEvent {
    /// The event of a key in `begin`'s transaction, not yet chained.
    fn new(kind: EventKind, row: Row, carry_from: Option<Carry>, begin: &CommitPoint) -> KeyEvent {
        KeyEvent {
            kind,
            row,
            carry_from,
            lsn: begin.position,
            at: begin.at,
            previous: None,
            valid_to: None,
            closed_by: None,
        }
    }
}

/// The events of one table under one relation description, in commit order.
#[derive(Debug, Clone)]
pub struct HistoryPlan {
    pub relation_id: RelationId,
    pub relation: Arc<Relation>,
    /// A truncate before `events`: every version current before its commit LSN ends at its
    /// commit time.
    pub truncate: Option<(Position, i64)>,
    pub events: Vec<KeyEvent>,
}

/// The committed state of a key a transaction touched, while the transaction is read.
#[derive(Debug)]
struct Pending {
    relation_id: RelationId,
    relation: Arc<Relation>,
    existed_before: bool,
    present: bool,
    row: Row,
    carry_from: Option<Carry>,
}

/// Builds the plans of a batch of whole transactions, applied in order.
#[derive(Debug)]
pub struct History {
    tombstones: bool,
    plans: Vec<HistoryPlan>,
    /// Source relation oid → index of its current plan.
    current: HashMap<u32, usize>,
    /// (relation oid, key) → (plan, event) of the key's last event in the batch.
    last_event: HashMap<(u32, Vec<u8>), (usize, usize)>,
    /// The transaction being read: its begin and its keys in the order first touched.
    transaction: Option<CommitPoint>,
    pending: Vec<((u32, Vec<u8>), Pending)>,
    pending_index: HashMap<(u32, Vec<u8>), usize>,
}

/// Where and when the transaction being read committed: what its versions are stamped with.
#[derive(Debug, Clone, Copy)]
struct CommitPoint {
    position: Position,
    at: i64,
}

impl History {
    pub fn new(tombstones: bool) -> History {
        History {
            tombstones,
            plans: Vec::new(),
            current: HashMap::new(),
            last_event: HashMap::new(),
            transaction: None,
            pending: Vec::new(),
            pending_index: HashMap::new(),
        }
    }

    pub fn begin(&mut self, begin: &TxBegin) {
        self.transaction = Some(CommitPoint {
            position: begin.commit_position,
            at: begin.commit_ts,
        });
        self.pending.clear();
        self.pending_index.clear();
    }

    pub fn add(
        &mut self,
        relation_id: RelationId,
        relation: &Arc<Relation>,
        change: &ChangeEvent,
    ) -> Result<(), CollapseError> {
        let table = || relation.qualified_name();
        if change.op == Op::Truncate {
            self.truncate(relation_id, relation);
            return Ok(());
        }
        let pk: Vec<usize> = relation.primary_key_indexes().collect();
        if pk.is_empty() {
            return Err(CollapseError::NoPrimaryKey(table()));
        }
        let missing = |what| CollapseError::MissingRow {
            op: change.op,
            table: table(),
            what,
        };
        let oid = relation.oid;
        match change.op {
            Op::Insert => {
                let after = change.after.as_ref().ok_or_else(|| missing("new"))?;
                let key = (oid, key_of(after, &pk));
                let pending = self.touch(key, relation_id, relation, false);
                pending.present = true;
                pending.row = after.clone();
                pending.carry_from = None;
            }
            Op::Update => {
                let after = change.after.as_ref().ok_or_else(|| missing("new"))?;
                let new_key = (oid, key_of(after, &pk));
                let moved_from = change
                    .before
                    .as_ref()
                    .filter(|before| !pk.iter().any(|&i| before[i] == Value::UnchangedToast))
                    .map(|before| ((oid, key_of(before, &pk)), before))
                    .filter(|(old, _)| *old != new_key);
                let mut row = after.clone();
                let existed_before = moved_from.is_none();
                let origin = moved_from.as_ref().map_or(&new_key, |(old, _)| old);
                let (previous, mut carry_from) = self.previous_state(origin);
                if let Some(previous) = &previous {
                    fill_unchanged(&mut row, previous);
                }
                if let Some((old_key, before)) = moved_from {
                    // Values still unchanged are in the old key's version, not the new key's.
                    carry_from = carry_from.or_else(|| {
                        self.transaction.as_ref().map(|begin| Carry {
                            from: before.clone(),
                            before: begin.position,
                        })
                    });
                    let (last, last_carry) = self.last_values(&old_key, before, relation);
                    let old = self.touch(old_key, relation_id, relation, true);
                    old.present = false;
                    old.row = last;
                    old.carry_from = last_carry;
                }
                let pending = self.touch(new_key, relation_id, relation, existed_before);
                pending.present = true;
                pending.row = row;
                pending.carry_from = carry_from;
            }
            Op::Delete => {
                let before = change.before.as_ref().ok_or_else(|| missing("old"))?;
                let key = (oid, key_of(before, &pk));
                let (row, carry_from) = self.last_values(&key, before, relation);
                let pending = self.touch(key, relation_id, relation, true);
                pending.present = false;
                pending.row = row;
                pending.carry_from = carry_from;
            }
            // A snapshot reads each key once: its version is settled as it is read.
            Op::Read | Op::IncrementalRead => {
                let after = change.after.as_ref().ok_or_else(|| missing("new"))?;
                if let Some(begin) = &self.transaction {
                    let key = (oid, key_of(after, &pk));
                    let kind = if change.op == Op::Read {
                        EventKind::Read
                    } else {
                        EventKind::IncrementalRead
                    };
                    let event = KeyEvent::new(kind, after.clone(), None, begin);
                    self.push(key, relation_id, relation, event);
                }
            }
            Op::Truncate => {}
        }
        Ok(())
    }

    /// Ends the transaction: each key it touched gets its event.
    pub fn commit(&mut self) {
        let Some(begin) = self.transaction.take() else {
            return;
        };
        self.pending_index.clear();
        for (key, pending) in std::mem::take(&mut self.pending) {
            let kind = match (pending.existed_before, pending.present) {
                (false, false) => continue,
                (false, true) => EventKind::Created,
                (true, true) => EventKind::Updated,
                (true, false) if self.tombstones => EventKind::Tombstone,
                (true, false) => EventKind::Closed,
            };
            let carry_from = pending
                .carry_from
                .filter(|_| pending.row.contains(&Value::UnchangedToast));
            let event = KeyEvent::new(kind, pending.row, carry_from, &begin);
            self.push(key, pending.relation_id, &pending.relation, event);
        }
    }

    /// Records the key's event, chained to the key's previous one in the batch.
    fn push(
        &mut self,
        key: (u32, Vec<u8>),
        relation_id: RelationId,
        relation: &Arc<Relation>,
        mut event: KeyEvent,
    ) {
        event.previous = self.last_event.get(&key).map(|&(plan, index)| {
            let earlier = &mut self.plans[plan].events[index];
            if earlier.kind.is_version() {
                earlier.valid_to = Some(event.at);
                earlier.closed_by = Some(event.lsn);
            }
            earlier.lsn
        });
        let plan = self.plan_for(relation_id, relation);
        self.plans[plan].events.push(event);
        self.last_event
            .insert(key, (plan, self.plans[plan].events.len() - 1));
    }

    /// The plans in the order they must be applied; empty ones dropped. A transaction left
    /// open (its commit not in the batch) is not in them.
    pub fn finish(self) -> Vec<HistoryPlan> {
        self.plans
            .into_iter()
            .filter(|p| p.truncate.is_some() || !p.events.is_empty())
            .collect()
    }

    fn truncate(&mut self, relation_id: RelationId, relation: &Arc<Relation>) {
        let Some(begin) = &self.transaction else {
            return;
        };
        let oid = relation.oid;
        // Versions of the batch still open end here; changes earlier in this transaction were
        // never committed state.
        for (&(table, _), &(plan, event)) in &self.last_event {
            if table == oid {
                let event = &mut self.plans[plan].events[event];
                if event.kind.is_version() && event.valid_to.is_none() {
                    event.valid_to = Some(begin.at);
                    event.closed_by = Some(begin.position);
                }
            }
        }
        self.last_event.retain(|(table, _), _| *table != oid);
        self.pending.retain(|((table, _), _)| *table != oid);
        self.pending_index = self
            .pending
            .iter()
            .enumerate()
            .map(|(i, (key, _))| (key.clone(), i))
            .collect();
        self.plans.push(HistoryPlan {
            relation_id,
            relation: Arc::clone(relation),
            truncate: Some((begin.position, begin.at)),
            events: Vec::new(),
        });
        self.current.insert(oid, self.plans.len() - 1);
    }

    /// The key's state before the change being read: from this transaction, else from its
    /// last version in the batch. None when the batch does not know it.
    fn previous_state(&self, key: &(u32, Vec<u8>)) -> (Option<Row>, Option<Carry>) {
        if let Some(&i) = self.pending_index.get(key) {
            let pending = &self.pending[i].1;
            return (Some(pending.row.clone()), pending.carry_from.clone());
        }
        match self.last_event.get(key) {
            Some(&(plan, event)) => {
                let event = &self.plans[plan].events[event];
                match event.kind {
                    EventKind::Created
                    | EventKind::Updated
                    | EventKind::Read
                    | EventKind::IncrementalRead => {
                        (Some(event.row.clone()), event.carry_from.clone())
                    }
                    EventKind::Tombstone | EventKind::Closed => (None, None),
                }
            }
            None => (None, None),
        }
    }

    /// The last values of a key being removed, for a tombstone: what the batch knows, else
    /// what the source sent, with the columns outside the replica identity (which did not
    /// arrive) left for the target's current version to supply.
    fn last_values(
        &self,
        key: &(u32, Vec<u8>),
        before: &Row,
        relation: &Relation,
    ) -> (Row, Option<Carry>) {
        match self.previous_state(key) {
            (Some(row), carry_from) => (row, carry_from),
            (None, _) => (
                before
                    .iter()
                    .zip(&relation.columns)
                    .map(|(value, column)| {
                        if column.replica_identity {
                            value.clone()
                        } else {
                            Value::UnchangedToast
                        }
                    })
                    .collect(),
                None,
            ),
        }
    }

    fn touch(
        &mut self,
        key: (u32, Vec<u8>),
        relation_id: RelationId,
        relation: &Arc<Relation>,
        existed_before: bool,
    ) -> &mut Pending {
        let index = match self.pending_index.get(&key) {
            Some(&i) => i,
            None => {
                self.pending_index.insert(key.clone(), self.pending.len());
                self.pending.push((
                    key,
                    Pending {
                        relation_id,
                        relation: Arc::clone(relation),
                        existed_before,
                        present: existed_before,
                        row: Vec::new(),
                        carry_from: None,
                    },
                ));
                self.pending.len() - 1
            }
        };
        let pending = &mut self.pending[index].1;
        pending.relation_id = relation_id;
        pending.relation = Arc::clone(relation);
        pending
    }

    fn plan_for(&mut self, relation_id: RelationId, relation: &Arc<Relation>) -> usize {
        match self.current.get(&relation.oid) {
            Some(&i) if self.plans[i].relation_id == relation_id => i,
            _ => {
                self.plans.push(HistoryPlan {
                    relation_id,
                    relation: Arc::clone(relation),
                    truncate: None,
                    events: Vec::new(),
                });
                self.current.insert(relation.oid, self.plans.len() - 1);
                self.plans.len() - 1
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::TxOrigin;
    use crate::sinks::collapse::tests::{change, relation, row};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn begin(n: u64) -> TxBegin {
        TxBegin {
            origin: TxOrigin::Postgres { xid: n as u32 },
            commit_position: Position(n * 100),
            commit_ts: n as i64 * 1_000,
        }
    }

    /// Plans `transactions` (numbered from `first`) as one batch.
    fn plan(first: u64, transactions: &[Vec<ChangeEvent>], tombstones: bool) -> Vec<HistoryPlan> {
        let rel = relation(7);
        let mut history = History::new(tombstones);
        for (n, changes) in transactions.iter().enumerate() {
            history.begin(&begin(first + n as u64));
            for c in changes {
                history.add(c.relation, &rel, c).unwrap();
            }
            history.commit();
        }
        history.finish()
    }

    fn kinds(plans: &[HistoryPlan]) -> Vec<(EventKind, Row, Option<i64>)> {
        plans
            .iter()
            .flat_map(|p| &p.events)
            .map(|e| (e.kind, e.row.clone(), e.valid_to))
            .collect()
    }

    #[test]
    fn changes_in_one_transaction_are_one_version() {
        let plans = plan(
            1,
            &[
                vec![
                    change(Op::Insert, None, Some(row(1, Some("a")))),
                    change(Op::Update, None, Some(row(1, Some("b")))),
                    change(Op::Insert, None, Some(row(2, Some("x")))),
                    change(Op::Delete, Some(row(2, Some("x"))), None),
                ],
                vec![change(Op::Update, None, Some(row(1, None)))],
            ],
            false,
        );
        assert_eq!(
            kinds(&plans),
            vec![
                (EventKind::Created, row(1, Some("b")), Some(2_000)),
                (EventKind::Updated, row(1, Some("b")), None),
            ]
        );
        assert_eq!(plans[0].events[1].previous, Some(Position(100)));
        assert_eq!(plans[0].events[0].closed_by, Some(Position(200)));
    }

    /// An incremental snapshot's read may follow versions the stream recorded: it ends them
    /// (a staged version, not a first one copied straight in), with `_tidemark_op = 'r'`.
    #[test]
    fn an_incremental_read_ends_the_version_before_it() {
        let plans = plan(
            1,
            &[
                vec![change(Op::Update, None, Some(row(1, Some("a"))))],
                vec![change(Op::IncrementalRead, None, Some(row(1, Some("a"))))],
            ],
            false,
        );
        assert_eq!(
            kinds(&plans),
            vec![
                (EventKind::Updated, row(1, Some("a")), Some(2_000)),
                (EventKind::IncrementalRead, row(1, Some("a")), None),
            ]
        );
        assert_eq!(plans[0].events[1].previous, Some(Position(100)));
        assert_eq!(EventKind::IncrementalRead.code(), "r");
    }

    #[test]
    fn a_delete_closes_or_leaves_a_tombstone_with_the_last_values() {
        let transactions = [
            vec![change(Op::Insert, None, Some(row(1, Some("a"))))],
            vec![change(
                Op::Delete,
                Some(vec![Value::Int(1), Value::Null]),
                None,
            )],
        ];
        assert_eq!(
            kinds(&plan(1, &transactions, false))[1].0,
            EventKind::Closed
        );
        assert_eq!(
            kinds(&plan(1, &transactions, true))[1],
            (EventKind::Tombstone, row(1, Some("a")), None)
        );
        // Unknown to the batch: the target's current version supplies the values.
        let alone = plan(2, &transactions[1..], true);
        assert_eq!(kinds(&alone)[0].1, row(1, None));
    }

    #[test]
    fn a_key_move_closes_the_old_key_and_carries_its_toast() {
        let plans = plan(
            1,
            &[vec![change(
                Op::Update,
                Some(vec![Value::Int(1), Value::Null]),
                Some(row(9, None)),
            )]],
            false,
        );
        let events = &plans[0].events;
        assert_eq!(events[0].kind, EventKind::Closed);
        assert_eq!(events[1].kind, EventKind::Created);
        assert_eq!(
            events[1].carry_from,
            Some(Carry {
                from: vec![Value::Int(1), Value::Null],
                before: Position(100)
            })
        );
    }

    #[test]
    fn a_truncate_ends_the_open_versions_of_the_batch() {
        let plans = plan(
            1,
            &[
                vec![change(Op::Insert, None, Some(row(1, Some("a"))))],
                vec![
                    change(Op::Truncate, None, None),
                    change(Op::Insert, None, Some(row(1, Some("b")))),
                ],
            ],
            false,
        );
        assert_eq!(plans.len(), 2);
        assert_eq!(plans[0].events[0].valid_to, Some(2_000));
        assert_eq!(plans[0].events[0].closed_by, Some(Position(200)));
        assert_eq!(plans[1].truncate, Some((Position(200), 2_000)));
        assert_eq!(plans[1].events[0].kind, EventKind::Created);
        assert_eq!(plans[1].events[0].previous, None);
    }

    /// A version in the model of the target table.
    #[derive(Debug, Clone, PartialEq)]
    struct Version {
        body: Value,
        lsn: Position,
        from: i64,
        to: Option<i64>,
        op: &'static str,
    }

    /// The target as the SCD2 statements leave it: key → versions by commit LSN.
    type Target = BTreeMap<i64, BTreeMap<Position, Version>>;

    fn id(row: &Row) -> i64 {
        match row[0] {
            Value::Int(id) => id,
            _ => unreachable!(),
        }
    }

    /// What scd2.rs's statements do, statement by statement.
    fn apply(target: &mut Target, plans: &[HistoryPlan]) {
        for plan in plans {
            if let Some((lsn, at)) = plan.truncate {
                for version in target.values_mut().flat_map(|v| v.values_mut()) {
                    if version.to.is_none() && version.lsn < lsn {
                        version.to = Some(at);
                    }
                }
            }
            let versions: Vec<&KeyEvent> =
                plan.events.iter().filter(|e| e.kind.is_version()).collect();
            // The key's latest version before `before`.
            let latest = |target: &Target, key: i64, before: Position| {
                target.get(&key).and_then(|versions| {
                    versions
                        .range(..before)
                        .next_back()
                        .map(|(_, v)| v.body.clone())
                })
            };
            let mut inserts = Vec::new();
            for carried in [true, false] {
                for event in versions
                    .iter()
                    .filter(|e| e.row.contains(&Value::UnchangedToast) == carried)
                {
                    let (source, before) = event
                        .carry_from
                        .as_ref()
                        .map_or((id(&event.row), event.lsn), |c| (id(&c.from), c.before));
                    let body = match &event.row[1] {
                        Value::UnchangedToast => {
                            latest(target, source, before).unwrap_or(Value::Null)
                        }
                        body => body.clone(),
                    };
                    inserts.push((id(&event.row), event, body));
                }
                for (key, event, body) in inserts.drain(..) {
                    target
                        .entry(key)
                        .or_default()
                        .entry(event.lsn)
                        .or_insert(Version {
                            body,
                            lsn: event.lsn,
                            from: event.at,
                            to: event.valid_to,
                            op: event.kind.code(),
                        });
                }
            }
            for (key, versions) in target.iter_mut() {
                for version in versions.values_mut().filter(|v| v.to.is_none()) {
                    let next = plan.events.iter().find(|e| {
                        id(&e.row) == *key
                            && e.lsn > version.lsn
                            && e.previous.is_none_or(|p| p <= version.lsn)
                    });
                    if let Some(next) = next {
                        version.to = Some(next.at);
                    }
                }
            }
        }
    }

    /// A random workload on keys 0..6: each transaction a few intents, interpreted against
    /// the source's state so every change is one the source could send.
    fn workload() -> impl Strategy<Value = Vec<Vec<(u8, i64, i64, bool)>>> {
        prop::collection::vec(
            prop::collection::vec((0u8..5, 0i64..6, 0i64..6, any::<bool>()), 1..5),
            1..25,
        )
    }

    /// The changes of the workload, the source's final rows and, per key, how many
    /// transactions left it present after touching it.
    #[allow(clippy::type_complexity)]
    fn replay(
        workload: &[Vec<(u8, i64, i64, bool)>],
    ) -> (
        Vec<Vec<ChangeEvent>>,
        BTreeMap<i64, String>,
        BTreeMap<i64, usize>,
        bool,
    ) {
        let mut source: BTreeMap<i64, String> = BTreeMap::new();
        let mut expected: BTreeMap<i64, usize> = BTreeMap::new();
        let mut truncated = false;
        // The log gives a table a new description id after a restart or an ALTER.
        let mut description = 1;
        let mut transactions = Vec::new();
        for (n, intents) in workload.iter().enumerate() {
            let mut changes = Vec::new();
            let mut touched = std::collections::BTreeSet::new();
            for (i, &(op, key, other, flag)) in intents.iter().enumerate() {
                let body = format!("t{n}s{i}");
                let key_row = |k: i64| vec![Value::Int(k), Value::Null];
                match (op, source.contains_key(&key)) {
                    (0, false) => {
                        changes.push(change(Op::Insert, None, Some(row(key, Some(&body)))));
                        source.insert(key, body);
                    }
                    (1, true) => {
                        let sent = if flag { None } else { Some(body.as_str()) };
                        changes.push(change(Op::Update, None, Some(row(key, sent))));
                        if !flag {
                            source.insert(key, body);
                        }
                    }
                    (2, true) => {
                        changes.push(change(Op::Delete, Some(key_row(key)), None));
                        source.remove(&key);
                    }
                    (3, true) if !source.contains_key(&other) => {
                        let sent = if flag { None } else { Some(body.as_str()) };
                        changes.push(change(
                            Op::Update,
                            Some(key_row(key)),
                            Some(row(other, sent)),
                        ));
                        let old = source.remove(&key).unwrap_or_default();
                        source.insert(other, if flag { old } else { body });
                        touched.insert(other);
                    }
                    (4, _) if !flag => {
                        description += 1;
                        continue;
                    }
                    (4, _) if key == 0 => {
                        changes.push(change(Op::Truncate, None, None));
                        truncated = true;
                        touched.clear();
                        source.clear();
                        continue;
                    }
                    _ => continue,
                }
                touched.insert(key);
            }
            for key in touched {
                if source.contains_key(&key) {
                    *expected.entry(key).or_default() += 1;
                }
            }
            for c in &mut changes {
                c.relation = RelationId(description);
            }
            transactions.push(changes);
        }
        (transactions, source, expected, truncated)
    }

    proptest! {
        /// However the transactions are cut into batches, and when a suffix is applied twice,
        /// the target holds one version per transaction that left a key present, the
        /// intervals chain, and the current versions are the source's rows with TOAST values
        /// carried forward.
        #[test]
        fn versions_match_the_source_however_batched(
            workload in workload(),
            cuts in prop::collection::vec(0usize..25, 0..4),
            replayed in 0usize..25,
        ) {
            let (transactions, source, expected, truncated) = replay(&workload);
            let mut bounds: Vec<usize> = cuts.into_iter().map(|c| c % transactions.len()).collect();
            bounds.extend([0, transactions.len()]);
            bounds.sort_unstable();
            bounds.dedup();
            let mut target = Target::new();
            for pair in bounds.windows(2) {
                let plans = plan(pair[0] as u64 + 1, &transactions[pair[0]..pair[1]], false);
                apply(&mut target, &plans);
            }
            let once = target.clone();
            let from = replayed % transactions.len();
            apply(&mut target, &plan(from as u64 + 1, &transactions[from..], false));
            prop_assert_eq!(&target, &once);

            let current: BTreeMap<i64, String> = target
                .iter()
                .flat_map(|(k, versions)| versions.values().filter(|v| v.to.is_none()).map(move |v| (*k, v.body.clone())))
                .map(|(k, body)| match body { Value::Text(b) => (k, b), other => panic!("{other:?}") })
                .collect();
            prop_assert_eq!(current, source);
            if !truncated {
                let counts: BTreeMap<i64, usize> = target.iter().map(|(k, v)| (*k, v.len())).collect();
                prop_assert_eq!(counts, expected);
            }
            for versions in target.values() {
                let versions: Vec<&Version> = versions.values().collect();
                for pair in versions.windows(2) {
                    prop_assert!(pair[0].to.is_some_and(|to| to <= pair[1].from), "{:?}", versions);
                }
                prop_assert!(versions.iter().filter(|v| v.to.is_none()).count() <= 1);
            }
        }
    }
}
