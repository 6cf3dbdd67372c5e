//! The dispatcher in process, without a library: a handler and a backend built here go
//! through the SDK's own boundary adapters (`HostHandler::in_process`,
//! `HostBackend::in_process`), exactly as a plugin library's would. The backend is a log
//! in memory, so every batch, ack and dead letter can be checked exactly.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use epidemic_plugin_host::{HostBackend, HostHandler};
use epidemic_plugin_sdk::backend::{
    Backend, BackendError, BackfillProgress, BackfillReply, BackfillRequest, BackfillState, Batch,
    Chunk, ChunkRequest, ColumnIn, Consumer, DeadLetter, DeadLetterQuery, DeadLetterUpdate,
    Registered, StartFrom, Watch,
};
use epidemic_plugin_sdk::{
    testing, BatchError, Change, Context, Handler, HandlerConfig, HandlerError, Op, Origin,
    SnapshotEvent, Subscription, Value,
};

use super::{DispatchSettings, Dispatcher, RetryPolicy};
use crate::config::OnFailure;
use crate::metrics::Metrics;

/// One in-memory log and what was done to it.
#[derive(Default)]
struct Log {
    changes: Vec<Change>,
    /// The consumer's cursor: the id of the last change acknowledged.
    acked: i64,
    acks: Vec<i64>,
    letters: Vec<DeadLetter>,
    /// Refuse the next dead letters with a connection error.
    refuse_letters: usize,
    /// The table `users` as it stands: key → name.
    rows: std::collections::BTreeMap<i64, String>,
    backfills: Vec<BackfillProgress>,
    /// Each chunk read: (after, watermark id).
    chunks: Vec<(Option<i64>, i64)>,
    /// Each chunk request's `only`.
    chunk_only: Vec<Vec<ColumnIn>>,
}

impl Log {
    fn next_id(&self) -> i64 {
        self.changes.last().map_or(1, |c| c.id + 1)
    }

    /// An application writes row `k` (None: deletes it); the log gets the change.
    fn write(&mut self, k: i64, name: Option<&str>) {
        let old = self.rows.get(&k).cloned();
        let c = match (&old, name) {
            (None, Some(n)) => testing::insert("users", &[("id", k.into()), ("name", n.into())]),
            (Some(o), Some(n)) => testing::update(
                "users",
                &[("id", k.into()), ("name", o.as_str().into())],
                &[("id", k.into()), ("name", n.into())],
            ),
            (Some(o), None) => {
                testing::delete("users", &[("id", k.into()), ("name", o.as_str().into())])
            }
            (None, None) => return,
        };
        match name {
            Some(n) => self.rows.insert(k, n.to_owned()),
            None => self.rows.remove(&k),
        };
        let mut c = testing::keyed(c, &["id"]);
        c.id = self.next_id();
        self.changes.push(c);
    }
}

/// Everything a test shares with the handler and backend it builds (found by name, as a
/// plugin built from config would).
#[derive(Default)]
struct World {
    log: Mutex<Log>,
    /// Each handler call: the `name` of every change in it, with its attempt number.
    calls: Mutex<Vec<Vec<(String, u32)>>>,
    /// Every change handed over, in order.
    seen: Mutex<Vec<Change>>,
    events: Mutex<Vec<SnapshotEvent>>,
    stop: Arc<AtomicBool>,
}

fn worlds() -> &'static Mutex<HashMap<String, Arc<World>>> {
    static W: OnceLock<Mutex<HashMap<String, Arc<World>>>> = OnceLock::new();
    W.get_or_init(Mutex::default)
}

fn world(name: &str) -> Arc<World> {
    worlds()
        .lock()
        .unwrap()
        .get(name)
        .cloned()
        .expect("a world of that name")
}

struct MemoryBackend(Arc<World>);

impl Backend for MemoryBackend {
    const NAME: &'static str = "memory";
    const URL_SCHEMES_JOINED: &'static str = "memory";

    fn open(url: &str, _: &serde_json::Value) -> Result<Self, BackendError> {
        Ok(MemoryBackend(world(url.trim_start_matches("memory://"))))
    }
    fn plan_install(&mut self, _: &[Watch]) -> Result<Vec<String>, BackendError> {
        Ok(vec![])
    }
    fn install(&mut self, _: &[Watch]) -> Result<Vec<String>, BackendError> {
        Ok(vec![])
    }
    fn plan_uninstall(&mut self) -> Result<Vec<String>, BackendError> {
        Ok(vec![])
    }
    fn uninstall(&mut self) -> Result<Vec<String>, BackendError> {
        Ok(vec![])
    }
    fn register(
        &mut self,
        _: &Consumer,
        _: &[String],
        _: StartFrom,
    ) -> Result<Registered, BackendError> {
        Ok(Registered::Existing)
    }
    fn fetch(&mut self, _: &Consumer, max: u32) -> Result<Batch, BackendError> {
        let log = self.0.log.lock().unwrap();
        let changes = log
            .changes
            .iter()
            .filter(|c| c.id > log.acked)
            .take(max as usize)
            .cloned()
            .collect();
        Ok(Batch {
            changes,
            token: "t".into(),
        })
    }
    fn ack(&mut self, _: &Consumer, _: &str, upto: i64) -> Result<(), BackendError> {
        let mut log = self.0.log.lock().unwrap();
        assert!(upto > log.acked, "an ack never goes back");
        log.acked = upto;
        log.acks.push(upto);
        Ok(())
    }
    fn wait(&mut self, timeout: Duration) -> Result<bool, BackendError> {
        std::thread::sleep(timeout.min(Duration::from_millis(2)));
        Ok(false)
    }
    fn prune(&mut self) -> Result<u64, BackendError> {
        Ok(0)
    }
    fn reconnect(&mut self) -> Result<(), BackendError> {
        Ok(())
    }
    fn add_dead_letter(&mut self, letter: &DeadLetter) -> Result<i64, BackendError> {
        let mut log = self.0.log.lock().unwrap();
        if log.refuse_letters > 0 {
            log.refuse_letters -= 1;
            return Err(BackendError::Connection("the database went away".into()));
        }
        let mut letter = letter.clone();
        letter.id = log.letters.len() as i64 + 1;
        log.letters.push(letter.clone());
        Ok(letter.id)
    }
    fn dead_letters(&mut self, q: &DeadLetterQuery) -> Result<Vec<DeadLetter>, BackendError> {
        let log = self.0.log.lock().unwrap();
        Ok(log
            .letters
            .iter()
            .filter(|l| match q {
                DeadLetterQuery::RetryRequested(_) => l.retry_requested,
                _ => true,
            })
            .cloned()
            .collect())
    }
    fn snapshot_chunk(&mut self, r: &ChunkRequest) -> Result<Chunk, BackendError> {
        let mut log = self.0.log.lock().unwrap();
        let after = r.after.as_ref().and_then(|k| k[0].as_i64());
        log.chunk_only.push(r.only.clone());
        // Honours `only` on `name` as a backend's SELECT would.
        let kept = |n: &String| {
            r.only
                .iter()
                .all(|c| c.column != "name" || c.values.contains(&Value::Text(n.clone())))
        };
        let rows: Vec<Change> = log
            .rows
            .iter()
            .filter(|(k, n)| after.is_none_or(|a| **k > a) && kept(n))
            .take(r.limit as usize)
            .map(|(k, n)| {
                let mut c = testing::keyed(
                    testing::insert("users", &[("id", (*k).into()), ("name", n.as_str().into())]),
                    &["id"],
                );
                c.id = 0;
                c.origin = Origin::Snapshot;
                c
            })
            .collect();
        let last = rows.len() < r.limit as usize;
        // The watermark goes into the log after the read.
        let watermark = log.next_id();
        log.changes.push(Change {
            id: watermark,
            table: "users".into(),
            origin: Origin::Watermark,
            ..Change::default()
        });
        log.chunks.push((after, watermark));
        Ok(Chunk {
            rows,
            watermark,
            last,
            rows_estimate: Some(log.rows.len() as u64),
        })
    }

    fn backfills(&mut self, r: &BackfillRequest) -> Result<BackfillReply, BackendError> {
        let mut log = self.0.log.lock().unwrap();
        let backfills = match r {
            BackfillRequest::Pending { .. } => log
                .backfills
                .iter()
                .filter(|b| b.state != BackfillState::Done)
                .cloned()
                .collect(),
            BackfillRequest::Save(p) => {
                let slot = log.backfills.iter_mut().find(|b| b.table == p.table);
                match slot {
                    Some(b) => {
                        *b = p.clone();
                        vec![p.clone()]
                    }
                    None => vec![],
                }
            }
            _ => log.backfills.clone(),
        };
        Ok(BackfillReply { backfills })
    }

    fn update_dead_letters(&mut self, u: &DeadLetterUpdate) -> Result<u64, BackendError> {
        let mut log = self.0.log.lock().unwrap();
        match u {
            DeadLetterUpdate::Delete(ids) => log.letters.retain(|l| !ids.contains(&l.id)),
            DeadLetterUpdate::RequestRetry(ids) => {
                for l in log.letters.iter_mut().filter(|l| ids.contains(&l.id)) {
                    l.retry_requested = true;
                }
            }
            DeadLetterUpdate::Failed {
                id,
                error,
                attempts,
                ..
            } => {
                for l in log.letters.iter_mut().filter(|l| l.id == *id) {
                    l.error = error.clone();
                    l.attempts = *attempts;
                    l.retry_requested = false;
                }
            }
        }
        Ok(1)
    }
}

/// Does what each change's `name` says: `ok`; `flaky` fails (retryably) on its first
/// attempt; `down` always fails retryably; `bad` fails permanently; `boom` panics;
/// `halt` fails and asks the dispatcher to stop.
struct Scripted(Arc<World>);

impl Handler for Scripted {
    const NAME: &'static str = "scripted";

    fn new(config: &HandlerConfig, _: &Context) -> Result<Self, HandlerError> {
        Ok(Scripted(world(config.json()["world"].as_str().unwrap())))
    }

    fn subscriptions(&self) -> Vec<Subscription> {
        vec![Subscription::new("users", ["name"])]
    }

    fn snapshot(&mut self, event: &SnapshotEvent) -> Result<(), HandlerError> {
        self.0.events.lock().unwrap().push(event.clone());
        Ok(())
    }

    fn handle_batch(&mut self, changes: &[Change]) -> Result<(), BatchError> {
        self.0.seen.lock().unwrap().extend(changes.iter().cloned());
        self.0
            .calls
            .lock()
            .unwrap()
            .push(changes.iter().map(|c| (name(c), c.attempt)).collect());
        for (i, c) in changes.iter().enumerate() {
            let fail = |e| Err(BatchError::new(i, e));
            match name(c).split('-').next().unwrap() {
                "flaky" if c.attempt == 1 => return fail(HandlerError::retryable("not yet")),
                "down" => return fail(HandlerError::retryable("service down")),
                "bad" => return fail(HandlerError::permanent("bad row")),
                "boom" => panic!("boom"),
                "halt" => {
                    self.0.stop.store(true, Ordering::Relaxed);
                    return fail(HandlerError::retryable("halted"));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

fn name(c: &Change) -> String {
    c.value("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// A dispatcher over a fresh in-memory log holding one change per name (on table
/// `users`, or `other` for names starting with `other`).
fn setup(test: &str, names: &[&str], retry: RetryPolicy) -> (Arc<World>, Dispatcher) {
    setup_filtered(test, names, retry, None)
}

fn setup_filtered(
    test: &str,
    names: &[&str],
    retry: RetryPolicy,
    filter: Option<Arc<dyn epidemic_plugin_sdk::routing::RowFilter>>,
) -> (Arc<World>, Dispatcher) {
    let w = Arc::new(World::default());
    {
        let mut log = w.log.lock().unwrap();
        for n in names {
            let table = if n.starts_with("other") {
                "other"
            } else {
                "users"
            };
            let mut c = testing::insert(table, &[("name", (*n).into())]);
            c.id = log.changes.len() as i64 + 1;
            log.changes.push(c);
        }
    }
    worlds()
        .lock()
        .unwrap()
        .insert(test.to_owned(), Arc::clone(&w));
    let backend = HostBackend::in_process::<MemoryBackend>(
        &format!("memory://{test}"),
        &serde_json::json!({}),
    )
    .expect("open");
    let handler =
        HostHandler::in_process::<Scripted>(&serde_json::json!({ "world": test }), "mx1", "h")
            .expect("handler");
    let settings = DispatchSettings {
        consumer: Consumer {
            daemon: "mx1".into(),
            handler: "h".into(),
        },
        subscriptions: handler.subscriptions().unwrap(),
        retry,
        batch_size: 100,
        handler_batch: 0,
        backfill_chunk: 3,
        resync_on_evicted: false,
        filter,
        snapshot_only: HashMap::new(),
        idle_check: Duration::from_millis(5),
    };
    let d = Dispatcher::new(
        settings,
        backend,
        handler,
        Metrics::new(false, "mx1", Duration::from_secs(300)),
        Arc::clone(&w.stop),
    );
    (w, d)
}

fn policy(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        retry_initial_ms: 1,
        retry_max_ms: 2,
        on_failure: OnFailure::DeadLetter,
    }
}

fn calls(w: &World) -> Vec<Vec<(String, u32)>> {
    w.calls.lock().unwrap().clone()
}

fn call(names: &[(&str, u32)]) -> Vec<(String, u32)> {
    names.iter().map(|(n, a)| (n.to_string(), *a)).collect()
}

#[test]
fn a_batch_goes_to_the_handler_in_one_call_and_is_acked_past_unwanted_changes() {
    let (w, mut d) = setup(
        "one_call",
        &["ok-1", "other-1", "ok-2", "other-2"],
        policy(3),
    );
    d.step().unwrap();
    assert_eq!(calls(&w), vec![call(&[("ok-1", 1), ("ok-2", 1)])]);
    assert_eq!(
        w.log.lock().unwrap().acks,
        vec![4],
        "one ack, past the unwanted tail"
    );
}

#[test]
fn handler_batch_caps_the_changes_per_call() {
    let (w, mut d) = setup(
        "capped",
        &["ok-1", "ok-2", "ok-3", "ok-4", "ok-5"],
        policy(3),
    );
    d.handler_batch = 2;
    d.step().unwrap();
    let sizes: Vec<usize> = calls(&w).iter().map(Vec::len).collect();
    assert_eq!(sizes, [2, 2, 1]);
    assert_eq!(
        w.log.lock().unwrap().acks,
        vec![5],
        "still one ack per fetched batch"
    );
}

#[test]
fn a_failure_mid_batch_acks_nothing_twice_retries_that_change_alone_and_goes_on() {
    let (w, mut d) = setup("mid_batch", &["ok-1", "flaky-2", "ok-3", "ok-4"], policy(3));
    d.step().unwrap();
    assert_eq!(
        calls(&w),
        vec![
            call(&[("ok-1", 1), ("flaky-2", 1), ("ok-3", 1), ("ok-4", 1)]),
            call(&[("flaky-2", 2)]),
            call(&[("ok-3", 1), ("ok-4", 1)]),
        ]
    );
    let log = w.log.lock().unwrap();
    assert_eq!(log.acks, vec![4]);
    assert!(log.letters.is_empty());
}

#[test]
fn a_permanent_failure_is_dead_lettered_at_once_and_the_batch_goes_on() {
    let (w, mut d) = setup("permanent", &["bad-1", "ok-2"], policy(5));
    d.step().unwrap();
    assert_eq!(
        calls(&w),
        vec![call(&[("bad-1", 1), ("ok-2", 1)]), call(&[("ok-2", 1)])]
    );
    let log = w.log.lock().unwrap();
    assert_eq!(log.acks, vec![2]);
    assert_eq!(log.letters.len(), 1);
    assert_eq!(log.letters[0].attempts, 1);
    assert_eq!(log.letters[0].change_id, 1);
    assert_eq!(log.letters[0].op, Op::Insert);
    assert!(log.letters[0].error.contains("bad row"));
    // The stored change is the one the handler was given, attempt included.
    assert_eq!(log.letters[0].change().unwrap().attempt, 1);
}

#[test]
fn retries_count_attempts_up_to_the_limit_then_dead_letter() {
    let (w, mut d) = setup("exhaust", &["down-1"], policy(3));
    d.step().unwrap();
    assert_eq!(
        calls(&w),
        vec![
            call(&[("down-1", 1)]),
            call(&[("down-1", 2)]),
            call(&[("down-1", 3)])
        ]
    );
    let log = w.log.lock().unwrap();
    assert_eq!(log.letters[0].attempts, 3);
    assert_eq!(log.acks, vec![1]);
}

#[test]
fn a_panic_in_a_batch_goes_on_one_change_at_a_time_and_loses_nothing() {
    let (w, mut d) = setup("panic", &["ok-1", "boom-2", "ok-3"], policy(1));
    d.step().unwrap();
    let calls = calls(&w);
    // The panicking call, then one change per call from the start of the batch.
    assert_eq!(calls[0].len(), 3);
    assert!(calls[1..].iter().all(|c| c.len() == 1), "{calls:?}");
    let handled: Vec<&str> = calls[1..].iter().map(|c| c[0].0.as_str()).collect();
    assert_eq!(handled, ["ok-1", "boom-2", "ok-3"]);
    let log = w.log.lock().unwrap();
    assert_eq!(
        log.letters.len(),
        1,
        "the panicking change is dead-lettered"
    );
    assert!(
        log.letters[0].error.contains("boom"),
        "{}",
        log.letters[0].error
    );
    assert_eq!(log.acks, vec![3]);
}

#[test]
fn shutdown_while_retrying_acks_only_what_came_before_and_the_rest_comes_again() {
    let (w, mut d) = setup("shutdown", &["ok-1", "halt-2", "ok-3"], policy(10));
    d.step().unwrap();
    assert_eq!(
        w.log.lock().unwrap().acks,
        vec![1],
        "the cursor stops before halt-2"
    );
    // A new dispatcher (the daemon restarted) starts with the change it did not finish.
    w.stop.store(false, Ordering::Relaxed);
    w.calls.lock().unwrap().clear();
    w.log.lock().unwrap().changes[1] = {
        let mut c = testing::insert("users", &[("name", "ok-2".into())]);
        c.id = 2;
        c
    };
    d.step().unwrap();
    assert_eq!(calls(&w), vec![call(&[("ok-2", 1), ("ok-3", 1)])]);
    assert_eq!(w.log.lock().unwrap().acks, vec![1, 3]);
}

#[test]
fn a_dead_letter_the_database_refuses_keeps_the_cursor_before_that_change() {
    let (w, mut d) = setup("refused", &["ok-1", "bad-2", "ok-3"], policy(1));
    w.log.lock().unwrap().refuse_letters = 1;
    let err = d.step().unwrap_err();
    assert!(err.is_connection(), "{err}");
    assert_eq!(w.log.lock().unwrap().acks, vec![1]);
    // Next time the change comes again and its dead letter is stored.
    d.step().unwrap();
    let log = w.log.lock().unwrap();
    assert_eq!(log.acks, vec![1, 3]);
    assert_eq!(log.letters.len(), 1);
    assert_eq!(log.letters[0].change_id, 2);
}

#[test]
fn a_dead_letter_marked_for_retry_is_delivered_again_with_the_next_attempt_number() {
    let (w, mut d) = setup("redeliver", &["flaky-1"], policy(1));
    d.step().unwrap();
    {
        let mut log = w.log.lock().unwrap();
        assert_eq!(log.letters.len(), 1);
        log.letters[0].retry_requested = true;
    }
    d.redeliver_requested().unwrap();
    // The letter had 1 failed attempt: its redelivery is attempt 2, and flaky-1 passes.
    assert_eq!(calls(&w).last().unwrap(), &call(&[("flaky-1", 2)]));
    assert!(w.log.lock().unwrap().letters.is_empty());
}

/// A dispatcher over an in-memory table `users` holding `rows` (key → name), whose log
/// holds nothing yet, with a backfill of it requested.
fn backfill_setup(test: &str, rows: &[(i64, &str)]) -> (Arc<World>, Dispatcher) {
    let (w, d) = setup(test, &[], policy(3));
    {
        let mut log = w.log.lock().unwrap();
        for (k, n) in rows {
            log.rows.insert(*k, (*n).to_owned());
        }
        log.backfills.push(BackfillProgress {
            daemon: "mx1".into(),
            handler: "h".into(),
            table: "users".into(),
            ..Default::default()
        });
    }
    (w, d)
}

/// What the handler holds after everything it was handed, replayed: key → name.
fn replay(w: &World) -> std::collections::BTreeMap<i64, String> {
    let mut state = std::collections::BTreeMap::new();
    for c in w.seen.lock().unwrap().iter() {
        let k = c.key[0].as_i64().unwrap();
        match c.op {
            Op::Delete => {
                state.remove(&k);
            }
            _ => {
                state.insert(k, name(c));
            }
        }
    }
    state
}

/// Steps until the backfill is done (or a hundred steps passed).
fn run_backfill(d: &mut Dispatcher) {
    d.check_backfills().unwrap();
    for _ in 0..100 {
        if d.backfill.is_none() {
            return;
        }
        d.step().unwrap();
    }
    panic!("the backfill did not finish");
}

#[test]
fn a_backfill_hands_every_row_over_as_snapshot_rows_between_begin_and_end() {
    let rows: Vec<(i64, &str)> = (1..=7).map(|k| (k, "ok")).collect();
    let (w, mut d) = backfill_setup("backfill_all", &rows);
    run_backfill(&mut d);
    let seen = w.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 7);
    assert!(seen
        .iter()
        .all(|c| c.origin == Origin::Snapshot && c.op == Op::Insert));
    assert_eq!(
        *w.events.lock().unwrap(),
        vec![
            SnapshotEvent::Began {
                table: "users".into(),
                resumed: false
            },
            SnapshotEvent::Ended {
                table: "users".into(),
                rows: 7,
                whole: true
            },
        ]
    );
    let log = w.log.lock().unwrap();
    assert_eq!(log.chunks.len(), 3, "chunks of 3: {:?}", log.chunks);
    assert_eq!(log.backfills[0].state, BackfillState::Done);
    assert_eq!(log.backfills[0].rows_done, 7);
    // The cursor went past every watermark.
    assert_eq!(log.acked, log.changes.last().unwrap().id);
}

#[test]
fn a_row_changed_between_the_read_and_the_watermark_comes_only_as_its_live_change() {
    let (w, mut d) = backfill_setup("backfill_window", &[(1, "ok-a"), (2, "ok-b"), (3, "ok-c")]);
    d.check_backfills().unwrap();
    // Read the first chunk (keys 1..=3; its watermark is in the log now), then the
    // application changes key 2 and deletes key 3, after the read, before the fetch.
    d.backfill_prepare().unwrap();
    {
        let mut log = w.log.lock().unwrap();
        // The writes land after the watermark in the log: newer than the chunk.
        log.write(2, Some("ok-b2"));
        log.write(3, None);
    }
    run_backfill(&mut d);
    // Live changes after the watermark come after the chunk's rows: the final state is
    // the table's, and no snapshot row came after a newer live change of its key.
    assert_eq!(
        replay(&w),
        w.log.lock().unwrap().rows.clone().into_iter().collect()
    );
    let seen = w.seen.lock().unwrap().clone();
    let order: Vec<(i64, Origin)> = seen
        .iter()
        .map(|c| (c.key[0].as_i64().unwrap(), c.origin))
        .collect();
    assert_eq!(
        order,
        [
            (1, Origin::Snapshot),
            (2, Origin::Snapshot),
            (3, Origin::Snapshot),
            (2, Origin::Live),
            (3, Origin::Live)
        ]
    );
}

#[test]
fn a_live_change_before_the_watermark_drops_the_chunk_row_of_its_key() {
    let (w, mut d) = backfill_setup("backfill_drop", &[(1, "ok-a"), (2, "ok-b")]);
    // A change to key 2 committed before the read, not yet delivered: it sits in the log
    // before the watermark, so the chunk's (equal) row for key 2 is dropped.
    w.log.lock().unwrap().write(2, Some("ok-b2"));
    run_backfill(&mut d);
    let seen = w.seen.lock().unwrap().clone();
    let order: Vec<(i64, Origin)> = seen
        .iter()
        .map(|c| (c.key[0].as_i64().unwrap(), c.origin))
        .collect();
    assert_eq!(order, [(2, Origin::Live), (1, Origin::Snapshot)]);
    assert_eq!(replay(&w).get(&2).map(String::as_str), Some("ok-b2"));
}

#[test]
fn a_restarted_dispatcher_resumes_after_the_last_finished_chunk() {
    let rows: Vec<(i64, &str)> = (1..=7).map(|k| (k, "ok")).collect();
    let (w, mut d) = backfill_setup("backfill_resume", &rows);
    d.check_backfills().unwrap();
    // One chunk read and handed over (its watermark fetched), then the daemon "dies".
    d.step().unwrap();
    assert_eq!(w.seen.lock().unwrap().len(), 3);
    let saved = w.log.lock().unwrap().backfills[0].clone();
    assert_eq!(saved.state, BackfillState::Running);
    assert_eq!(saved.last_key, Some(vec![Value::Int(3)]));
    drop(d);
    // A new dispatcher on the same world: it goes on from key 4.
    let backend = HostBackend::in_process::<MemoryBackend>(
        "memory://backfill_resume",
        &serde_json::json!({}),
    )
    .unwrap();
    let handler = HostHandler::in_process::<Scripted>(
        &serde_json::json!({ "world": "backfill_resume" }),
        "mx1",
        "h",
    )
    .unwrap();
    let mut d = Dispatcher::new(
        DispatchSettings {
            consumer: Consumer {
                daemon: "mx1".into(),
                handler: "h".into(),
            },
            subscriptions: handler.subscriptions().unwrap(),
            retry: policy(3),
            batch_size: 100,
            handler_batch: 0,
            backfill_chunk: 3,
            resync_on_evicted: false,
            filter: None,
            snapshot_only: HashMap::new(),
            idle_check: Duration::from_millis(5),
        },
        backend,
        handler,
        Metrics::new(false, "mx1", Duration::from_secs(300)),
        Arc::clone(&w.stop),
    );
    run_backfill(&mut d);
    let keys: Vec<i64> = w
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|c| c.key[0].as_i64().unwrap())
        .collect();
    assert_eq!(
        keys,
        (1..=7).collect::<Vec<_>>(),
        "no row twice, none missing"
    );
    let events = w.events.lock().unwrap().clone();
    assert_eq!(
        events[1..],
        [
            SnapshotEvent::Began {
                table: "users".into(),
                resumed: true
            },
            SnapshotEvent::Ended {
                table: "users".into(),
                rows: 4,
                whole: false
            },
        ]
    );
}

#[test]
fn a_row_the_filter_cannot_judge_is_dead_lettered_and_the_rest_is_delivered() {
    // The filter passes names starting with `ok` and cannot judge `weird` ones.
    let filter = |cols: &[String], vals: &[Value]| -> Result<bool, String> {
        let i = cols.iter().position(|c| c == "name").ok_or("no name")?;
        match vals[i].as_str() {
            Some(n) if n.starts_with("weird") => Err("no such overload".into()),
            Some(n) => Ok(n.starts_with("ok")),
            None => Ok(false),
        }
    };
    let (w, mut d) = setup_filtered(
        "filter_refused",
        &["ok-1", "skip-2", "weird-3", "ok-4"],
        policy(3),
        Some(Arc::new(filter)),
    );
    d.step().unwrap();
    assert_eq!(calls(&w), vec![call(&[("ok-1", 1), ("ok-4", 1)])]);
    let log = w.log.lock().unwrap();
    assert_eq!(
        log.acks,
        vec![4],
        "filtered-out and refused changes advance the cursor"
    );
    assert_eq!(log.letters.len(), 1);
    assert_eq!(log.letters[0].change_id, 3);
    assert!(log.letters[0]
        .error
        .contains("row filter: no such overload"));
}

#[test]
fn every_chunk_request_carries_the_pushed_part_of_the_filter_and_the_filter_still_judges() {
    // The filter passes `ok-*` names; the backend may keep only `ok-a` and `bad` rows (a
    // pushed condition looser than the filter: `bad` is read and must still be dropped).
    let filter = |cols: &[String], vals: &[Value]| -> Result<bool, String> {
        let i = cols.iter().position(|c| c == "name").ok_or("no name")?;
        Ok(vals[i].as_str().is_some_and(|n| n.starts_with("ok")))
    };
    let (w, mut d) = setup_filtered("backfill_only", &[], policy(3), Some(Arc::new(filter)));
    {
        let mut log = w.log.lock().unwrap();
        for (k, n) in [(1, "ok-a"), (2, "ok-b"), (3, "bad"), (4, "ok-a"), (5, "x")] {
            log.rows.insert(k, n.to_owned());
        }
        for k in 6..=12 {
            log.rows.insert(k, "x".to_owned());
        }
        log.rows.insert(13, "ok-a".to_owned());
        log.backfills.push(BackfillProgress {
            daemon: "mx1".into(),
            handler: "h".into(),
            table: "users".into(),
            ..Default::default()
        });
    }
    let only = vec![ColumnIn {
        column: "name".into(),
        values: vec!["ok-a".into(), "bad".into()],
    }];
    d.snapshot_only.insert("users".into(), only.clone());
    run_backfill(&mut d);
    let keys: Vec<i64> = w
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|c| c.key[0].as_i64().unwrap())
        .collect();
    assert_eq!(keys, [1, 4, 13], "`bad` was read but not passed");
    let log = w.log.lock().unwrap();
    assert!(log.chunk_only.len() >= 2, "{:?}", log.chunk_only);
    assert!(log.chunk_only.iter().all(|o| *o == only));
    assert_eq!(
        log.backfills[0].rows_done, 4,
        "the rows read, `bad` included"
    );
    assert_eq!(log.backfills[0].state, BackfillState::Done);
}
