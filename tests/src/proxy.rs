//! A TCP proxy that can freeze the connections going through it: what an expired NAT
//! entry, a dead path or a hung middlebox does to a client. [`TcpProxy::freeze_established`]
//! stops forwarding on every connection open at that moment, in both directions, without
//! closing anything: each side's kernel still accepts and acknowledges what is sent, and
//! nothing more ever arrives. Connections made afterwards are forwarded as usual, so a
//! client that gives up on a frozen connection and reconnects gets through.
//!
//! Threads: one accepting, two per connection (one per direction). Dropping the proxy
//! stops them all and closes every socket.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often a forwarding thread looks at the stop flag while its source is quiet.
const POLL: Duration = Duration::from_millis(50);

pub struct TcpProxy {
    port: u16,
    shared: Arc<Shared>,
    accepting: Option<JoinHandle<()>>,
}

struct Shared {
    target: SocketAddr,
    stop: AtomicBool,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    /// Connections accepted so far; each gets the next number.
    accepted: u64,
    /// Connections numbered below this are frozen.
    frozen_below: u64,
}

impl TcpProxy {
    /// A proxy on a free port of 127.0.0.1 forwarding to `127.0.0.1:target_port`.
    pub fn start(target_port: u16) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let shared = Arc::new(Shared {
            target: SocketAddr::from(([127, 0, 0, 1], target_port)),
            stop: AtomicBool::new(false),
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let accepting = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("proxy-accept".into())
                .spawn(move || accept_loop(listener, shared))
                .expect("start the proxy")
        };
        TcpProxy {
            port,
            shared,
            accepting: Some(accepting),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.lock().accepted
    }

    /// Stop forwarding on every connection open now, in both directions, leaving the
    /// sockets open; returns how many connections that froze. Later connections are
    /// forwarded.
    pub fn freeze_established(&self) -> u64 {
        let mut state = self.lock();
        let newly = state.accepted - state.frozen_below;
        state.frozen_below = state.accepted;
        self.shared.changed.notify_all();
        newly
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        // Wake the accepting thread with a connection of our own.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.accepting.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut pumps = Vec::new();
    for client in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(client) = client else { continue };
        let Ok(server) = TcpStream::connect(shared.target) else {
            continue;
        };
        let id = {
            let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            state.accepted += 1;
            state.accepted - 1
        };
        for (from, to) in [
            (client.try_clone(), server.try_clone()),
            (server.try_clone(), client.try_clone()),
        ] {
            let (Ok(from), Ok(to)) = (from, to) else {
                continue;
            };
            let shared = Arc::clone(&shared);
            if let Ok(t) = std::thread::Builder::new()
                .name(format!("proxy-{id}"))
                .spawn(move || forward(id, from, to, &shared))
            {
                pumps.push(t);
            }
        }
    }
    for t in pumps {
        let _ = t.join();
    }
}

/// Copy `from` to `to` until either closes, the proxy stops, or the connection is
/// frozen; a frozen connection holds its sockets, reading and writing nothing, until
/// the proxy stops.
fn forward(id: u64, mut from: TcpStream, mut to: TcpStream, shared: &Shared) {
    let frozen = || {
        let state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        id < state.frozen_below
    };
    let _ = from.set_read_timeout(Some(POLL));
    let mut buf = [0u8; 16 * 1024];
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        if frozen() {
            let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            while !shared.stop.load(Ordering::SeqCst) {
                state = shared
                    .changed
                    .wait_timeout(state, Duration::from_secs(1))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            return;
        }
        match from.read(&mut buf) {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            // Bytes read as the freeze began are dropped: nothing passes a frozen path.
            Ok(n) if !frozen() => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
