//! [`BackendReader`]: the daemon's read loop (fetch, "handle", ack, wait) on a backend
//! connection in a thread of its own, recording every change it was given. Backend-level
//! tests use it to read while writers write, without the daemon binary.
//! [`read_backlog_beside_a_stream`]: a backend's reads of two tables at once, one
//! streaming and one with a backlog.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use epidemic_plugin_host::HostBackend;
use epidemic_plugin_sdk::backend::{BackendError, Consumer};
use epidemic_plugin_sdk::{Change, Value};

pub struct BackendReader {
    delivered: Arc<Mutex<Vec<Change>>>,
    /// Connection errors met (and recovered from by reconnecting), for outage tests.
    pub connection_errors: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

/// A value as text, `""` for a missing one: for comparing keys and values in tests.
pub fn text(v: Option<&Value>) -> String {
    match v {
        Some(Value::Text(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

impl BackendReader {
    /// Read as `consumer` on the connection `open` gives (called in the reader thread).
    /// Connection errors are retried with backoff after a reconnect; any other error
    /// fails the test.
    pub fn spawn(
        open: impl FnOnce() -> HostBackend + Send + 'static,
        consumer: &Consumer,
    ) -> BackendReader {
        let delivered = Arc::new(Mutex::new(Vec::new()));
        let connection_errors = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let c = consumer.clone();
        let (d, errors, halt) = (delivered.clone(), connection_errors.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            let mut b = open();
            let mut backoff = Duration::from_millis(10);
            while !halt.load(Ordering::Relaxed) {
                let step = (|| -> Result<(), BackendError> {
                    let batch = b.fetch(&c, 500)?;
                    let Some(last) = batch.changes.last().map(|c| c.id) else {
                        b.wait(Duration::from_millis(200))?;
                        return Ok(());
                    };
                    // "Handle" the batch, then acknowledge it, like the daemon.
                    d.lock().unwrap().extend(batch.changes);
                    b.ack(&c, &batch.token, last)
                })();
                match step {
                    Ok(()) => backoff = Duration::from_millis(10),
                    Err(e) if e.is_connection() => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_millis(500));
                        let _ = b.reconnect();
                    }
                    Err(e) => panic!("reader: {e}"),
                }
            }
        });
        BackendReader {
            delivered,
            connection_errors,
            stop,
            handle: Some(handle),
        }
    }

    pub fn delivered(&self) -> Vec<Change> {
        self.delivered.lock().unwrap().clone()
    }

    /// Whether a change whose column `key_col` is `key` was delivered.
    pub fn has(&self, key_col: &str, key: &str) -> bool {
        self.delivered
            .lock()
            .unwrap()
            .iter()
            .any(|c| text(c.value(key_col)) == key)
    }

    /// Stop reading; everything delivered.
    pub fn stop(mut self) -> Vec<Change> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.join().expect("reader thread panicked");
        }
        self.delivered()
    }
}

impl Drop for BackendReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Read and ack, 500 changes at most per read, until `backlog` changes of table `backlog_of`
/// came, calling `write_stream(first_id)` before every read to add a hundred rows (ids from
/// `first_id`) to the consumer's other table: reads of that stream are dense and not full,
/// while the backlog waits in the other table. Fails once 12 s have passed: a read that
/// lingered (`linger_ms`) before each read of the backlog, with the linger at a second,
/// waits its first step, a quarter second, each time (the backlog's full reads end the
/// streak), so 15 s or more for a backlog of 30,000 (60 reads of 500).
pub fn read_backlog_beside_a_stream(
    b: &mut HostBackend,
    c: &Consumer,
    backlog_of: &str,
    backlog: usize,
    mut write_stream: impl FnMut(i64),
) {
    let started = Instant::now();
    let (mut from_backlog, mut next) = (0, 0);
    while from_backlog < backlog {
        write_stream(next);
        next += 100;
        let batch = b.fetch(c, 500).expect("fetch");
        let Some(last) = batch.changes.last() else {
            panic!(
                "nothing read while table {backlog_of} has {} rows to go",
                backlog - from_backlog
            );
        };
        if batch.token == backlog_of {
            from_backlog += batch.changes.len();
        }
        b.ack(c, &batch.token, last.id).expect("ack");
        assert!(
            started.elapsed() < Duration::from_secs(12),
            "{from_backlog} of {backlog_of}'s {backlog} rows after {:?}: reads lingered while a backlog waited",
            started.elapsed()
        );
    }
}
