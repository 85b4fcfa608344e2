//! Collapses a batch of logged changes to what a merge target must do: per table, per key,
//! the last state (upsert of a row, or delete), and whether the table was truncated first.
//! Pure: no I/O, so it is tested on its own.
//!
//! Rules: an insert or update makes the key's state an upsert of the new row; a delete makes
//! it a delete; an update that moves a row to another key deletes the old key and upserts
//! the new one; a truncate forgets every earlier change of the table in the batch and
//! truncates the target before the changes that follow it. An unchanged TOAST value is taken
//! from an earlier state of the same row in the batch when there is one; otherwise it stays
//! `UnchangedToast` and the target keeps the value it holds.
//!
//! Rows an initial snapshot read may be kept as the COPY text the source sent
//! ([`Collapse::add_copied`]): they are new keys, inserted before the plan's states are
//! applied, so the target takes them as they are, without decoding them.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::event::{ChangeEvent, Op, Relation, RelationId, Row, SnapshotRows, Value};

/// What the target must end up with for one key.
#[derive(Debug, Clone, PartialEq)]
pub enum KeyState {
    Upsert(Row),
    /// The deleted row: its last values when the batch saw them, else what the source sent
    /// (the key columns, the others null, under the default replica identity).
    Delete(Row),
    /// A row moved to a new key whose unchanged TOAST values the batch never saw: upsert
    /// `row`, taking those values from the target's row at `from`'s key (deleted after).
    Move {
        row: Row,
        from: Row,
    },
}

/// The collapsed changes of one table under one relation description.
#[derive(Debug, Clone)]
pub struct TablePlan {
    pub relation_id: RelationId,
    pub relation: Arc<Relation>,
    /// Truncate the target before applying `states`.
    pub truncate: bool,
    /// Key bytes → state, in the order each key was first touched.
    keys: HashMap<Vec<u8>, usize>,
    states: Vec<KeyState>,
    /// Per state: the key's first change in the batch inserted it, so the target does not
    /// hold it (unless the batch is a replay).
    created: Vec<bool>,
    /// Rows of the initial snapshot in the source's COPY text format, inserted before
    /// `states` are applied (every one of them precedes every state in the log).
    copied: Vec<Bytes>,
}

impl TablePlan {
    fn new(relation_id: RelationId, relation: Arc<Relation>, truncate: bool) -> TablePlan {
        TablePlan {
            relation_id,
            relation,
            truncate,
            keys: HashMap::new(),
            states: Vec::new(),
            created: Vec::new(),
            copied: Vec::new(),
        }
    }

    pub fn states(&self) -> &[KeyState] {
        &self.states
    }

    /// Snapshot rows kept as COPY text (see [`Collapse::add_copied`]).
    pub fn copied(&self) -> &[Bytes] {
        &self.copied
    }

    /// Whether state `index` is the complete row of a key the batch created: a row the
    /// target can take with a plain insert.
    pub fn is_new_row(&self, index: usize) -> bool {
        self.created[index]
            && matches!(&self.states[index], KeyState::Upsert(row) if !row.contains(&Value::UnchangedToast))
    }

    fn state_of(&self, key: &[u8]) -> Option<&KeyState> {
        self.keys.get(key).map(|&i| &self.states[i])
    }

    /// Sets the key's state; `inserted`: the change inserts the key (counts only for the
    /// key's first change in the batch).
    fn set(&mut self, key: Vec<u8>, state: KeyState, inserted: bool) {
        match self.keys.get(&key) {
            Some(&i) => self.states[i] = state,
            None => {
                self.keys.insert(key, self.states.len());
                self.states.push(state);
                self.created.push(inserted);
            }
        }
    }
}

/// A change the collapse cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CollapseError {
    #[error(
        "table {0} has no primary key; a merge sink needs one to upsert by: add a primary key \
         to the source table"
    )]
    NoPrimaryKey(String),
    #[error("a {op:?} change of {table} lacks its {what} row")]
    MissingRow {
        op: Op,
        table: String,
        what: &'static str,
    },
}

/// Collapses `changes` (in log order) into plans applied in order. A table gets a new plan
/// when its relation description changes or it is truncated.
#[derive(Debug, Default)]
pub struct Collapse {
    plans: Vec<TablePlan>,
    /// Source relation oid → index of its current plan.
    current: HashMap<u32, usize>,
}

impl Collapse {
    pub fn add(
        &mut self,
        relation_id: RelationId,
        relation: &Arc<Relation>,
        change: &ChangeEvent,
    ) -> Result<(), CollapseError> {
        let table = || relation.qualified_name();
        if change.op == Op::Truncate {
            for plan in &mut self.plans {
                if plan.relation.oid == relation.oid {
                    plan.keys.clear();
                    plan.states.clear();
                    plan.created.clear();
                    plan.copied.clear();
                    plan.truncate = false;
                }
            }
            self.plans
                .push(TablePlan::new(relation_id, Arc::clone(relation), true));
            self.current.insert(relation.oid, self.plans.len() - 1);
            return Ok(());
        }
        let pk: Vec<usize> = relation.primary_key_indexes().collect();
        if pk.is_empty() {
            return Err(CollapseError::NoPrimaryKey(table()));
        }
        let plan = self.plan_for(relation_id, relation);
        let missing = |what| CollapseError::MissingRow {
            op: change.op,
            table: table(),
            what,
        };
        match change.op {
            Op::Insert | Op::Read => {
                let after = change.after.as_ref().ok_or_else(|| missing("new"))?;
                plan.set(key_of(after, &pk), KeyState::Upsert(after.clone()), true);
            }
            // The target may hold the key already (changed before its chunk was read).
            Op::IncrementalRead => {
                let after = change.after.as_ref().ok_or_else(|| missing("new"))?;
                plan.set(key_of(after, &pk), KeyState::Upsert(after.clone()), false);
            }
            Op::Update => {
                let after = change.after.as_ref().ok_or_else(|| missing("new"))?;
                let new_key = key_of(after, &pk);
                let old_key = change
                    .before
                    .as_ref()
                    .map(|before| key_of(before, &pk))
                    .filter(|old| *old != new_key && !has_unchanged(before_key(change), &pk));
                let mut row = after.clone();
                let origin = match plan.state_of(old_key.as_ref().unwrap_or(&new_key)) {
                    Some(KeyState::Upsert(previous)) => {
                        fill_unchanged(&mut row, previous);
                        None
                    }
                    Some(KeyState::Move {
                        row: previous,
                        from,
                    }) => {
                        fill_unchanged(&mut row, previous);
                        Some(from.clone())
                    }
                    _ => None,
                };
                // Values still unchanged after a key move are in the target's old row.
                let from = origin.or_else(|| old_key.as_ref().and(change.before.clone()));
                if let (Some(old_key), Some(before)) = (old_key, change.before.as_ref()) {
                    plan.set(old_key, KeyState::Delete(before.clone()), false);
                }
                let state = match from {
                    Some(from) if row.contains(&Value::UnchangedToast) => {
                        KeyState::Move { row, from }
                    }
                    _ => KeyState::Upsert(row),
                };
                plan.set(new_key, state, false);
            }
            Op::Delete => {
                let before = change.before.as_ref().ok_or_else(|| missing("old"))?;
                let key = key_of(before, &pk);
                // The last values the batch saw, so a soft delete can keep them.
                let row = match plan.state_of(&key) {
                    Some(KeyState::Upsert(previous) | KeyState::Move { row: previous, .. }) => {
                        previous.clone()
                    }
                    _ => before.clone(),
                };
                plan.set(key, KeyState::Delete(row), false);
            }
            Op::Truncate => {}
        }
        Ok(())
    }

    /// Keeps snapshot rows of `relation` as their COPY text, for the target to take as they
    /// are. Returns false, keeping nothing, when the table's plan holds changes already: the
    /// rows must then be decoded and added one by one, so that they are applied in order.
    pub fn add_copied(
        &mut self,
        relation_id: RelationId,
        relation: &Arc<Relation>,
        rows: &SnapshotRows,
    ) -> Result<bool, CollapseError> {
        if relation.primary_key_indexes().next().is_none() {
            return Err(CollapseError::NoPrimaryKey(relation.qualified_name()));
        }
        let plan = self.plan_for(relation_id, relation);
        if !plan.states.is_empty() {
            return Ok(false);
        }
        plan.copied.push(rows.text.clone());
        Ok(true)
    }

    fn plan_for(&mut self, relation_id: RelationId, relation: &Arc<Relation>) -> &mut TablePlan {
        let index = match self.current.get(&relation.oid) {
            Some(&i) if self.plans[i].relation_id == relation_id => i,
            _ => {
                self.plans
                    .push(TablePlan::new(relation_id, Arc::clone(relation), false));
                self.current.insert(relation.oid, self.plans.len() - 1);
                self.plans.len() - 1
            }
        };
        &mut self.plans[index]
    }

    /// The plans in the order they must be applied; empty ones dropped.
    pub fn finish(self) -> Vec<TablePlan> {
        self.plans
            .into_iter()
            .filter(|p| p.truncate || !p.states.is_empty() || !p.copied.is_empty())
            .collect()
    }
}

fn before_key(change: &ChangeEvent) -> &[Value] {
    change.before.as_deref().unwrap_or_default()
}

fn has_unchanged(row: &[Value], pk: &[usize]) -> bool {
    pk.iter()
        .any(|&i| matches!(row.get(i), Some(Value::UnchangedToast)))
}

/// The primary key's values, encoded so equal keys are equal bytes.
pub(crate) fn key_of(row: &[Value], pk: &[usize]) -> Vec<u8> {
    let key: Vec<&Value> = pk.iter().filter_map(|&i| row.get(i)).collect();
    postcard::to_allocvec(&key).unwrap_or_default()
}

pub(crate) fn fill_unchanged(row: &mut Row, previous: &Row) {
    for (value, earlier) in row.iter_mut().zip(previous) {
        if *value == Value::UnchangedToast {
            *value = earlier.clone();
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::event::{Column, Position, ValueType};
    use proptest::prelude::*;

    /// A table `t{oid}` (id text primary key, body text).
    pub(crate) fn relation(oid: u32) -> Arc<Relation> {
        let column = |name: &str, pk: bool| Column {
            name: name.into(),
            type_oid: 25,
            type_modifier: -1,
            type_name: "text".into(),
            value_type: ValueType::Text,
            primary_key: pk,
            replica_identity: pk,
        };
        Arc::new(Relation {
            oid,
            schema: "public".into(),
            table: format!("t{oid}"),
            columns: vec![column("id", true), column("body", false)],
        })
    }

    /// A row of [`relation`]; a body of None is an unchanged TOAST value.
    pub(crate) fn row(id: i64, body: Option<&str>) -> Row {
        vec![
            Value::Int(id),
            body.map_or(Value::UnchangedToast, |b| Value::Text(b.into())),
        ]
    }

    pub(crate) fn change(op: Op, before: Option<Row>, after: Option<Row>) -> ChangeEvent {
        ChangeEvent {
            relation: RelationId(1),
            position: Position(0),
            op,
            before,
            after,
        }
    }

    fn collapse(changes: &[ChangeEvent]) -> Vec<TablePlan> {
        let rel = relation(1);
        let mut c = Collapse::default();
        for ch in changes {
            c.add(RelationId(1), &rel, ch).unwrap();
        }
        c.finish()
    }

    #[test]
    fn each_key_keeps_its_last_state() {
        let plans = collapse(&[
            change(Op::Insert, None, Some(row(1, Some("a")))),
            change(Op::Insert, None, Some(row(2, Some("b")))),
            change(Op::Update, None, Some(row(1, Some("a2")))),
            change(Op::Delete, Some(row(2, Some("b"))), None),
        ]);
        assert_eq!(plans.len(), 1);
        assert_eq!(
            plans[0].states(),
            &[
                KeyState::Upsert(row(1, Some("a2"))),
                KeyState::Delete(row(2, Some("b")))
            ]
        );
    }

    /// A snapshot read of the initial snapshot is a new row (copied straight in); one of an
    /// incremental snapshot may meet the row in the target already.
    #[test]
    fn only_initial_snapshot_reads_are_new_rows() {
        let plans = collapse(&[
            change(Op::Read, None, Some(row(1, Some("a")))),
            change(Op::IncrementalRead, None, Some(row(2, Some("b")))),
        ]);
        assert!(plans[0].is_new_row(0));
        assert!(!plans[0].is_new_row(1));
    }

    fn snapshot_rows(text: &str) -> SnapshotRows {
        SnapshotRows {
            relation: RelationId(1),
            position: Position(0),
            rows: text.matches('\n').count() as u32,
            text: Bytes::from(text.to_string()),
        }
    }

    /// Snapshot rows stay COPY text while the table's plan holds no change; once it does,
    /// they are refused, to be decoded and added in order. A truncate forgets them.
    #[test]
    fn snapshot_rows_stay_text_until_the_table_has_changes() {
        let rel = relation(1);
        let mut c = Collapse::default();
        assert_eq!(
            c.add_copied(RelationId(1), &rel, &snapshot_rows("1\ta\n2\tb\n")),
            Ok(true)
        );
        assert_eq!(
            c.add_copied(RelationId(1), &rel, &snapshot_rows("3\tc\n")),
            Ok(true)
        );
        c.add(
            RelationId(1),
            &rel,
            &change(Op::Update, None, Some(row(2, Some("b2")))),
        )
        .unwrap();
        assert_eq!(
            c.add_copied(RelationId(1), &rel, &snapshot_rows("4\td\n")),
            Ok(false)
        );
        let plans = c.finish();
        assert_eq!(
            plans[0].copied(),
            &[Bytes::from("1\ta\n2\tb\n"), Bytes::from("3\tc\n")]
        );
        // The update of a copied key is not a new row: the target holds the key by then.
        assert_eq!(plans[0].states(), &[KeyState::Upsert(row(2, Some("b2")))]);
        assert!(!plans[0].is_new_row(0));

        let mut c = Collapse::default();
        c.add_copied(RelationId(1), &rel, &snapshot_rows("1\ta\n"))
            .unwrap();
        c.add(RelationId(1), &rel, &change(Op::Truncate, None, None))
            .unwrap();
        let plans = c.finish();
        assert!(plans.iter().all(|p| p.copied().is_empty()), "{plans:?}");
    }

    #[test]
    fn snapshot_rows_of_a_table_without_a_primary_key_are_refused() {
        let mut rel = (*relation(1)).clone();
        rel.columns[0].primary_key = false;
        let mut c = Collapse::default();
        assert_eq!(
            c.add_copied(RelationId(1), &Arc::new(rel), &snapshot_rows("1\ta\n")),
            Err(CollapseError::NoPrimaryKey("public.t1".into()))
        );
    }

    #[test]
    fn key_update_deletes_the_old_key() {
        let plans = collapse(&[change(
            Op::Update,
            Some(vec![Value::Int(1), Value::Null]),
            Some(row(5, Some("x"))),
        )]);
        assert_eq!(
            plans[0].states(),
            &[
                KeyState::Delete(vec![Value::Int(1), Value::Null]),
                KeyState::Upsert(row(5, Some("x")))
            ]
        );
    }

    #[test]
    fn unchanged_toast_is_filled_from_the_batch_or_left_to_the_target() {
        let plans = collapse(&[
            change(Op::Insert, None, Some(row(1, Some("big")))),
            change(Op::Update, None, Some(row(1, None))),
            change(Op::Update, None, Some(row(2, None))),
        ]);
        assert_eq!(
            plans[0].states(),
            &[
                KeyState::Upsert(row(1, Some("big"))),
                KeyState::Upsert(row(2, None))
            ]
        );
    }

    #[test]
    fn a_key_move_with_unchanged_toast_reads_the_value_from_the_old_target_row() {
        let plans = collapse(&[
            change(Op::Update, None, Some(row(1, None))),
            change(
                Op::Update,
                Some(vec![Value::Int(1), Value::Null]),
                Some(row(2, None)),
            ),
        ]);
        assert_eq!(
            plans[0].states(),
            &[
                KeyState::Delete(vec![Value::Int(1), Value::Null]),
                KeyState::Move {
                    row: row(2, None),
                    from: vec![Value::Int(1), Value::Null]
                }
            ]
        );
    }

    #[test]
    fn truncate_forgets_earlier_changes_of_the_table() {
        let plans = collapse(&[
            change(Op::Insert, None, Some(row(1, Some("a")))),
            change(Op::Truncate, None, None),
            change(Op::Insert, None, Some(row(2, Some("b")))),
        ]);
        assert_eq!(plans.len(), 1);
        assert!(plans[0].truncate);
        assert_eq!(plans[0].states(), &[KeyState::Upsert(row(2, Some("b")))]);
    }

    #[test]
    fn a_new_relation_description_starts_a_new_plan() {
        let rel = relation(1);
        let mut c = Collapse::default();
        c.add(
            RelationId(1),
            &rel,
            &change(Op::Insert, None, Some(row(1, Some("a")))),
        )
        .unwrap();
        c.add(
            RelationId(2),
            &rel,
            &change(Op::Delete, Some(row(1, Some("a"))), None),
        )
        .unwrap();
        let plans = c.finish();
        assert_eq!(plans.len(), 2);
        assert_eq!(plans[1].states(), &[KeyState::Delete(row(1, Some("a")))]);
    }

    #[test]
    fn a_table_without_primary_key_is_refused() {
        let mut relation = (*relation(1)).clone();
        relation.columns[0].primary_key = false;
        let err = Collapse::default()
            .add(
                RelationId(1),
                &Arc::new(relation),
                &change(Op::Insert, None, Some(row(1, Some("a")))),
            )
            .unwrap_err();
        assert_eq!(err, CollapseError::NoPrimaryKey("public.t1".into()));
    }

    /// Applies changes one by one to a map: the meaning the collapse must preserve.
    fn apply_one_by_one(
        state: &mut std::collections::BTreeMap<i64, String>,
        changes: &[ChangeEvent],
    ) {
        for ch in changes {
            let id = |r: &Row| match r[0] {
                Value::Int(i) => i,
                _ => unreachable!(),
            };
            let body = |r: &Row, old: Option<&String>| match &r[1] {
                Value::Text(t) => t.clone(),
                _ => old.cloned().unwrap_or_default(),
            };
            match ch.op {
                Op::Insert | Op::Read | Op::IncrementalRead => {
                    let after = ch.after.as_ref().unwrap();
                    state.insert(id(after), body(after, None));
                }
                Op::Update => {
                    let after = ch.after.as_ref().unwrap();
                    let old_id = ch.before.as_ref().map_or(id(after), id);
                    let old = state.remove(&old_id);
                    state.insert(id(after), body(after, old.as_ref()));
                }
                Op::Delete => {
                    state.remove(&id(ch.before.as_ref().unwrap()));
                }
                Op::Truncate => state.clear(),
            }
        }
    }

    fn arb_changes() -> impl Strategy<Value = Vec<(u8, i64, i64, bool)>> {
        proptest::collection::vec((0u8..10, 0i64..6, 0i64..6, any::<bool>()), 0..40)
    }

    proptest! {
        #[test]
        fn collapsed_batch_has_the_effect_of_its_changes(
            start in proptest::collection::btree_map(0i64..6, "[a-z]{1,3}", 0..6),
            ops in arb_changes(),
        ) {
            // Build a valid change sequence against a model of the table.
            let mut model = start.clone();
            let mut changes = Vec::new();
            for (kind, id, other, toast) in ops {
                let ch = match (kind, model.contains_key(&id)) {
                    (0..=2, false) => change(Op::Insert, None, Some(row(id, Some(&format!("i{id}"))))),
                    (3..=5, true) => change(Op::Update, None, Some(row(id, if toast { None } else { Some("u") }))),
                    (6, true) if !model.contains_key(&other) => change(
                        Op::Update,
                        Some(vec![Value::Int(id), Value::Null]),
                        Some(row(other, if toast { None } else { Some("moved") })),
                    ),
                    (7..=8, true) => change(Op::Delete, Some(vec![Value::Int(id), Value::Null]), None),
                    (9, _) => change(Op::Truncate, None, None),
                    _ => continue,
                };
                apply_one_by_one(&mut model, std::slice::from_ref(&ch));
                changes.push(ch);
            }
            // Apply the collapsed plans to the starting state.
            let mut target = start.clone();
            for plan in collapse(&changes) {
                if plan.truncate {
                    target.clear();
                }
                // As the sink does: moves read the target first, deletes go last.
                let before = target.clone();
                let mut deletes = Vec::new();
                for state in plan.states() {
                    match state {
                        KeyState::Upsert(r) => {
                            let Value::Int(id) = r[0] else { unreachable!() };
                            let old = target.get(&id).cloned();
                            let body = match &r[1] {
                                Value::Text(t) => t.clone(),
                                _ => old.unwrap_or_default(),
                            };
                            target.insert(id, body);
                        }
                        KeyState::Delete(r) => {
                            let Value::Int(id) = r[0] else { unreachable!() };
                            deletes.push(id);
                        }
                        KeyState::Move { row: r, from } => {
                            let (Value::Int(id), Value::Int(from)) = (&r[0], &from[0]) else { unreachable!() };
                            let body = match &r[1] {
                                Value::Text(t) => t.clone(),
                                _ => before.get(from).cloned().unwrap_or_default(),
                            };
                            target.insert(*id, body);
                        }
                    }
                }
                for id in deletes {
                    target.remove(&id);
                }
            }
            prop_assert_eq!(target, model);
        }
    }
}
