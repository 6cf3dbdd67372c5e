//! What `epidemic status` shows for PostgreSQL: per consumer its cursor, backlog and dead
//! letters; per watched table its log, its capture triggers and any schema drift,
//! including a key column that is gone, and what would let a stable id repeat (a log
//! table dropped or re-created by hand, the id sequence set back) until install repairs
//! it.
//!
//! # Backlog
//!
//! A consumer's backlog is exact, as of the statement that counts it: the rows of its
//! log tables that are visible in the current snapshot and not in the consumer's `prev`
//! snapshot (committed since what it fully handled), minus the rows of the batch in
//! progress it has already acknowledged (visible in the batch's snapshot, id up to
//! `done_upto`). It is what the consumer's next fetches would return, pruning aside:
//! an evicted consumer's backlog counts only what is still in the log. The count uses the
//! `txid` index like the batch query does (transactions from `xmax(prev)` on, plus those
//! running at `prev`), so a caught-up consumer costs little however long its log is.

use epidemic_plugin_sdk::backend::{ConsumerStatus, Status, TableStatus};
use epidemic_plugin_sdk::ops::drift;
use epidemic_plugin_sdk::Op;
use postgres::Client;

use crate::capture::{find_triggers, Event};
use crate::catalog::inspect_table;
use crate::error::PgError;
use crate::ident::{quote_ident, Ident, TableName};
use crate::partition::partition_leaves;
use crate::registry::{
    check_cluster, check_logs, load_registry, schema_state, ClusterCheck, SchemaState,
};

/// The status report of one Epidemic schema; empty before install.
pub(crate) fn status(client: &mut Client, schema: &Ident) -> Result<Status, PgError> {
    let mut status = Status {
        backend: "postgres".into(),
        ..Status::default()
    };
    if schema_state(client, schema)? != SchemaState::Ours {
        return Ok(status);
    }
    let q = |name: &str| format!("{}.{}", schema.quoted(), quote_ident(name));
    let registry = load_registry(client, schema)?;
    if let ClusterCheck::Foreign { recorded, current } = check_cluster(client, schema)? {
        status.warnings.push(format!(
            "the cursors in schema {schema} were written by another PostgreSQL cluster (system identifier \
             {recorded}, this one is {current}): a dump restored here? Their transaction ids mean nothing \
             in this cluster, so nothing is read or pruned until `epidemic install` (which `epidemic run` \
             does at start) restarts every consumer from the oldest change in the log; changes handled \
             before the move are delivered again"
        ));
    }
    let two_phase: i32 = client
        .query_one(
            "SELECT current_setting('max_prepared_transactions')::int4",
            &[],
        )
        .map_err(PgError::sql("read max_prepared_transactions"))?
        .get(0);
    if two_phase > 0 {
        status.warnings.push(format!(
            "max_prepared_transactions is {two_phase}: the capture triggers send no NOTIFY (a transaction \
             that notified could not PREPARE), so daemons find new changes by polling the log every \
             fallback_poll_ms; set max_prepared_transactions = 0 if nothing here uses two-phase commit"
        ));
    }

    let logs = check_logs(client, schema, &registry)?;
    if let Some(used) = logs.sequence_behind {
        status.warnings.push(format!(
            "the change id sequence {schema}.change_id is behind id {used}, which a log already used \
             (restarted or set back by hand, or an older dump restored?): new changes get ids, and \
             stable ids, that were handed out before; run `epidemic install`, which moves the sequence \
             past them and gives every log a new identity"
        ));
    }

    for (name, reg) in &registry {
        let mut problems = Vec::new();
        let log_missing = logs.missing.contains(name);
        if log_missing {
            problems.push(format!(
                "log table {schema}.{} of {name} is missing (dropped by hand?): every write to {name} \
                 fails; run `epidemic install`, which creates it again",
                reg.log_table
            ));
        }
        if logs.recreated.contains(name) {
            problems.push(format!(
                "log table {schema}.{} of {name} is not the one Epidemic created (re-created by hand or \
                 restored from a dump?): stable ids may repeat ones handed out before; run \
                 `epidemic install`, which gives the log a new identity",
                reg.log_table
            ));
        }
        let table = match inspect_table(client, name) {
            Ok(t) => Some(t),
            Err(PgError::MissingTable(_)) => {
                problems.push(drift::table_gone(name));
                None
            }
            Err(e) => return Err(e),
        };
        let found = match &table {
            Some(t) => find_triggers(
                client,
                t.oid,
                schema,
                &reg.capture_function,
                &reg.trigger_name,
            )?,
            None => Vec::new(),
        };
        let mut triggers = Vec::new();
        let events = Event::for_table(table.as_ref().is_some_and(|t| t.partitioned));
        for &event in events {
            let trigger = event.trigger_name(&reg.trigger_name);
            let working = found.iter().find(|t| t.captures(event, &reg.trigger_name));
            let present = working.is_some();
            match working {
                None => {
                    let op = match event {
                        Event::Insert => Op::Insert,
                        // A move to another partition is delivered as an update.
                        Event::Update | Event::MoveRow | Event::MoveStart | Event::MoveEnd => {
                            Op::Update
                        }
                        // A TRUNCATE is delivered as deletes.
                        Event::Delete | Event::Truncate => Op::Delete,
                    };
                    problems.push(drift::trigger_missing(&trigger, name, op));
                }
                Some(t) if t.enabled == b'D' as i8 => problems.push(format!(
                    "trigger {trigger} on {name} is disabled: {} changes are not captured; \
                     run `epidemic install` to enable it",
                    event.sql()
                )),
                Some(t) if t.enabled != b'A' as i8 || !t.clones_always => problems.push(format!(
                    "trigger {trigger} on {name} (or its copy on a partition) does not fire under session_replication_role = replica \
                     (ENABLE TRIGGER ALL, as after pg_restore --disable-triggers, resets it): changes applied \
                     as a replica are not captured; run `epidemic install` to enable it always"
                )),
                Some(_) => {}
            }
            triggers.push((trigger.to_string(), present));
        }
        if let Some(t) = table.as_ref().filter(|t| t.partitioned) {
            let trigger = Event::Truncate.trigger_name(&reg.trigger_name);
            let leaves = partition_leaves(client, t.oid, schema, &reg.capture_function, &trigger)?;
            for leaf in leaves.iter().filter(|l| !l.is_current()) {
                problems.push(format!(
                    "partition {} of {name} has no working TRUNCATE trigger of Epidemic's (created after the \
                     last install?): a TRUNCATE of that partition alone is not captured; run `epidemic install`",
                    leaf.name
                ));
            }
        }
        if let Some(t) = &table {
            for c in &reg.columns {
                if t.columns.contains_key(c.name.as_str()) {
                    continue;
                }
                problems.push(if reg.key_columns.contains(&c.name) {
                    format!(
                        "key column {} of table {name} no longer exists (dropped or renamed): changes \
                         cannot name their row; restore the column or name another key \
                         ([table.{name}] key = [...]), then run `epidemic install`",
                        c.name
                    )
                } else {
                    drift::column_gone(
                        c.name.as_str(),
                        name,
                        "handlers that need it cannot get it",
                    )
                });
            }
        }
        let log_rows: i64 = if log_missing {
            0
        } else {
            client
                .query_one(
                    &format!("SELECT count(*) FROM {}", q(reg.log_table.as_str())),
                    &[],
                )
                .map_err(PgError::sql(format!("count the log of {name}")))?
                .get(0)
        };
        status.tables.push(TableStatus {
            table: name.to_string(),
            log_table: format!("{schema}.{}", reg.log_table),
            columns: reg.columns.iter().map(|c| c.name.to_string()).collect(),
            log_rows,
            triggers,
            problems,
        });
    }

    let rows = client
        .query(
            &format!(
                "SELECT c.daemon, c.handler, c.tables, c.prev_snapshot::text, c.batch_id, \
                        c.batch_snapshot::text, c.batch_done_upto, c.batch_last_id, \
                        (extract(epoch FROM c.last_seen) * 1000000)::int8, c.evicted_at IS NOT NULL, \
                        (SELECT count(*) FROM {} d WHERE d.daemon = c.daemon AND d.handler = c.handler) \
                 FROM {} c ORDER BY c.daemon, c.handler",
                q("dead_letter"),
                q("consumer")
            ),
            &[],
        )
        .map_err(PgError::sql("read consumers"))?;
    for r in rows {
        let tables: Vec<String> = r.get(2);
        let prev: String = r.get(3);
        let batch_id: i64 = r.get(4);
        let batch: Option<String> = r.get(5);
        let done_upto: Option<i64> = r.get(6);
        let last_id: Option<i64> = r.get(7);
        let position = match (&batch, done_upto, last_id) {
            (Some(snapshot), Some(done), Some(last)) => format!(
                "snapshot {prev}, batch {batch_id} to snapshot {snapshot} handled to id {done} of {last}"
            ),
            _ => format!("snapshot {prev}"),
        };
        let mut backlog = 0;
        let mut oldest: Option<f64> = None;
        let mut seen = Vec::new();
        for t in &tables {
            // `users` and `public.users` are one log; a table no longer watched has none.
            let Some((name, reg)) = TableName::parse(t)
                .ok()
                .and_then(|n| registry.get_key_value(&n))
            else {
                continue;
            };
            // A log dropped by hand is reported above and holds nothing.
            if seen.contains(&name) || logs.missing.contains(name) {
                continue;
            }
            seen.push(name);
            let pending = client
                .query_one(
                    &format!(
                        "WITH s AS MATERIALIZED (SELECT $1::text::pg_snapshot AS prev, pg_current_snapshot() AS cur, \
                                 $2::text::pg_snapshot AS batch, $3::int8 AS done_upto), \
                              pending AS ( \
                                 SELECT l.id, l.txid, l.changed_at FROM {log} l \
                                 WHERE l.txid >= (SELECT pg_snapshot_xmax(prev) FROM s) \
                                 UNION ALL \
                                 SELECT l.id, l.txid, l.changed_at FROM {log} l \
                                 WHERE l.txid = ANY (ARRAY(SELECT pg_snapshot_xip(prev) FROM s))) \
                         SELECT count(*), \
                                extract(epoch FROM clock_timestamp() - min(p.changed_at))::float8 \
                         FROM pending p, s \
                         WHERE pg_visible_in_snapshot(p.txid, s.cur) \
                           AND NOT (s.batch IS NOT NULL AND p.id <= s.done_upto \
                                    AND pg_visible_in_snapshot(p.txid, s.batch))",
                        log = q(reg.log_table.as_str())
                    ),
                    &[&prev, &batch, &done_upto],
                )
                .map_err(PgError::sql(format!("count the backlog in {name}")))?;
            backlog += pending.get::<_, i64>(0);
            // Never negative, should the clock step back between write and read.
            let age = pending.get::<_, Option<f64>>(1).map(|a| a.max(0.0));
            oldest = match (oldest, age) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
        }
        status.consumers.push(ConsumerStatus {
            daemon: r.get(0),
            handler: r.get(1),
            tables,
            position,
            backlog,
            oldest_pending_age_s: oldest,
            dead_letters: r.get(10),
            last_seen_us: r.get(8),
            evicted: r.get(9),
        });
    }
    Ok(status)
}
