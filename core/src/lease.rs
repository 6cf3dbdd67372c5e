//! The daemon-name lease and the heartbeat that keeps it and every consumer alive.
//!
//! Two daemons with one `daemon.name` (two units on one host both defaulting to the host
//! name, a copied config) would share consumers: the second would forget or move the
//! first one's cursors, and both would ack "successfully" while changes went missing.
//! So a name is held by one live daemon at a time, through a lease row in the database
//! that the backend grants, renews and releases atomically by the database's clock
//! (never a daemon's, so clock skew between hosts cannot matter).
//!
//! At start a daemon claims its name. When another instance holds it, the daemon takes
//! it over at once if that instance is provably dead (same host, process gone); otherwise
//! it waits for the lease to expire, and refuses to start as soon as it sees the holder
//! renew it (a live twin). The heartbeat thread renews the lease and touches every
//! consumer on a connection of its own, so a handler that is slow or retrying for a long
//! time is never evicted; a daemon that finds its lease taken over (it was cut off from
//! the database for longer than the lease) stops rather than share the name.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use epidemic_plugin_sdk::host::HostBackend;
use epidemic_plugin_sdk::{BackendError, Consumer, LeaseRequest, LeaseState};
use tracing::{debug, error, info, warn};

/// How often the lease is polled while waiting for a holder's lease to expire.
const WAIT_POLL: Duration = Duration::from_millis(200);

/// This process's claim on a daemon name.
#[derive(Debug, Clone)]
pub struct DaemonLease {
    pub daemon: String,
    pub instance: String,
    pub holder: String,
    pub ttl: Duration,
}

/// Who holds a lease, written so that [`Holder::parse`] can read it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: i32,
    pub host: String,
}

impl Holder {
    pub fn this_process() -> Holder {
        Holder {
            pid: std::process::id() as i32,
            host: hostname::get()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }
    }

    pub fn parse(s: &str) -> Option<Holder> {
        let rest = s.strip_prefix("pid ")?;
        let (pid, host) = rest.split_once(" on host ")?;
        Some(Holder {
            pid: pid.parse().ok()?,
            host: host.to_owned(),
        })
    }

    /// Provably not a live daemon: a process on this host that no longer exists, or
    /// this very process id (a container restarted with the same host name and pid 1).
    fn is_dead_here(&self, me: &Holder) -> bool {
        if self.host.is_empty() || self.host != me.host {
            return false;
        }
        self.pid == me.pid || !process_alive(self.pid)
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} on host {}", self.pid, self.host)
    }
}

fn process_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // A zombie is dead although signal 0 still reaches it.
    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        if stat.rsplit_once(") ").and_then(|(_, r)| r.chars().next()) == Some('Z') {
            return false;
        }
    }
    // SAFETY: signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn new_instance() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

impl DaemonLease {
    pub fn new(daemon: &str, ttl: Duration) -> DaemonLease {
        DaemonLease {
            daemon: daemon.to_owned(),
            instance: new_instance(),
            holder: Holder::this_process().to_string(),
            ttl,
        }
    }

    fn claim_request(&self, take_over: Option<String>) -> LeaseRequest {
        LeaseRequest::Claim {
            daemon: self.daemon.clone(),
            instance: self.instance.clone(),
            holder: self.holder.clone(),
            ttl_ms: self.ttl.as_millis().min(u64::MAX as u128) as u64,
            take_over,
        }
    }

    /// Renew the lease; `Ok(Some(holder))` when another instance has taken it.
    pub fn renew(&self, conn: &mut HostBackend) -> Result<Option<String>, BackendError> {
        match conn.lease(&self.claim_request(None))? {
            LeaseState::Granted => Ok(None),
            LeaseState::Held { holder, .. } => Ok(Some(holder)),
            LeaseState::Released | LeaseState::Holders(_) => {
                Ok(Some("nobody (the lease was released)".into()))
            }
        }
    }

    pub fn release(&self, conn: &mut HostBackend) -> Result<(), BackendError> {
        conn.lease(&LeaseRequest::Release {
            daemon: self.daemon.clone(),
            instance: self.instance.clone(),
        })
        .map(|_| ())
    }

    /// Take the daemon name, waiting for a dead holder's lease to run out; an error when
    /// a live daemon holds it. `call` retries connection errors (see the daemon).
    pub fn acquire(
        &self,
        stop: &AtomicBool,
        mut call: impl FnMut(&LeaseRequest) -> Result<LeaseState>,
    ) -> Result<()> {
        let me = Holder::this_process();
        let mut take_over: Option<String> = None;
        // The holder we are waiting on, and its renewal count when we first saw it.
        let mut waiting: Option<(String, i64)> = None;
        loop {
            if stop.load(Ordering::Relaxed) {
                bail!(
                    "stopped while waiting for the daemon name {:?}",
                    self.daemon
                );
            }
            match call(&self.claim_request(take_over.clone()))? {
                LeaseState::Granted => {
                    if waiting.is_some() || take_over.is_some() {
                        info!(daemon = %self.daemon, "took over the daemon name from an instance that is gone");
                    }
                    return Ok(());
                }
                LeaseState::Released | LeaseState::Holders(_) => {
                    bail!("backend answered a claim with something else")
                }
                LeaseState::Held {
                    instance,
                    holder,
                    expires_in_ms,
                    renewals,
                } => {
                    if take_over.as_deref() != Some(instance.as_str())
                        && Holder::parse(&holder).is_some_and(|h| h.is_dead_here(&me))
                    {
                        debug!(daemon = %self.daemon, %holder, "the lease holder's process is gone; taking over");
                        take_over = Some(instance);
                        continue;
                    }
                    match &waiting {
                        Some((i, seen)) if *i == instance && *seen != renewals => bail!(
                            "daemon name {:?} is in use by a live daemon ({holder}): give each daemon its own \
                             name (config key daemon.name, or EPIDEMIC_DAEMON__NAME)",
                            self.daemon
                        ),
                        Some((i, _)) if *i == instance => {}
                        _ => {
                            warn!(
                                daemon = %self.daemon, %holder,
                                expires_in = ?Duration::from_millis(expires_in_ms),
                                "daemon name is held by another instance; waiting for its lease to expire \
                                 (if that daemon is alive it will renew the lease and this one will refuse to start)"
                            );
                            waiting = Some((instance, renewals));
                        }
                    }
                    std::thread::sleep(Duration::from_millis(expires_in_ms.max(1)).min(WAIT_POLL));
                }
            }
        }
    }
}

/// The heartbeat thread: renews the lease and touches the consumers, on its own
/// connection, every `every`, whatever the handlers are doing.
pub struct Heartbeat {
    handle: JoinHandle<()>,
    /// Set when another instance took the lease: the daemon must stop.
    pub lost: Arc<Mutex<Option<String>>>,
}

impl Heartbeat {
    pub fn start(
        mut conn: HostBackend,
        lease: DaemonLease,
        consumers: Vec<(Consumer, Arc<AtomicBool>)>,
        every: Duration,
        stop: Arc<AtomicBool>,
    ) -> Result<Heartbeat> {
        let lost = Arc::new(Mutex::new(None));
        let lost_in = Arc::clone(&lost);
        let mut consumers: Vec<(Consumer, Arc<AtomicBool>, bool)> = consumers
            .into_iter()
            .map(|(c, flag)| (c, flag, false))
            .collect();
        let handle = std::thread::Builder::new()
            .name("heartbeat".into())
            .spawn(move || {
                let mut next = Instant::now() + every;
                let mut failing = false;
                while !stop.load(Ordering::Relaxed) {
                    if Instant::now() < next {
                        std::thread::sleep((next - Instant::now()).min(Duration::from_millis(50)));
                        continue;
                    }
                    next = Instant::now() + every;
                    match beat(&mut conn, &lease, &mut consumers) {
                        Ok(None) => failing = false,
                        Ok(Some(holder)) => {
                            error!(
                                daemon = %lease.daemon, %holder,
                                "another daemon took over this daemon's name (this one was cut off from the \
                                 database for longer than daemon.lease_ttl); stopping rather than share it"
                            );
                            if let Ok(mut l) = lost_in.lock() {
                                *l = Some(holder);
                            }
                            stop.store(true, Ordering::Relaxed);
                        }
                        Err(e) => {
                            // The consumer threads report outages; this one stays quiet.
                            if !failing {
                                debug!(error = %e, "heartbeat failed");
                                failing = true;
                            }
                            if e.is_connection() {
                                let _ = conn.reconnect();
                            }
                        }
                    }
                }
            })
            .context("cannot start the heartbeat thread")?;
        Ok(Heartbeat { handle, lost })
    }

    pub fn join(self) -> Option<String> {
        let _ = self.handle.join();
        self.lost.lock().ok().and_then(|l| l.clone())
    }
}

fn beat(
    conn: &mut HostBackend,
    lease: &DaemonLease,
    consumers: &mut [(Consumer, Arc<AtomicBool>, bool)],
) -> Result<Option<String>, BackendError> {
    if let Some(holder) = lease.renew(conn)? {
        return Ok(Some(holder));
    }
    for (c, flag, lost) in consumers.iter_mut() {
        match conn.touch(c) {
            Ok(()) => *lost = false,
            // Say it now, once, so that a quiet table does not hide it, and have the
            // consumer thread register again at once.
            Err(e) if e.is_evicted() => {
                if !*lost {
                    error!(consumer = %c, error = %e, "heartbeat updated no cursor");
                    *lost = true;
                }
                flag.store(true, Ordering::Relaxed);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::Holder;

    #[test]
    fn holder_round_trips_and_dead_local_process_is_detected() {
        let me = Holder::this_process();
        let parsed = Holder::parse(&me.to_string()).expect("parse");
        assert_eq!(parsed, me);
        // Our own pid on our host: a previous incarnation (container restart).
        assert!(parsed.is_dead_here(&me));
        // A live process on this host that is not us: pid 1 always exists.
        let init = Holder {
            pid: 1,
            host: me.host.clone(),
        };
        if me.pid != 1 {
            assert!(!init.is_dead_here(&me));
        }
        // Another host: never provably dead.
        let remote = Holder {
            pid: i32::MAX,
            host: format!("{}-elsewhere", me.host),
        };
        assert!(!remote.is_dead_here(&me));
        // A pid that cannot exist on this host.
        let gone = Holder {
            pid: i32::MAX,
            host: me.host.clone(),
        };
        assert!(gone.is_dead_here(&me));
        assert_eq!(Holder::parse("garbage"), None);
    }
}
