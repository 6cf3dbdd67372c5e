//! The byte stream under every connection, TLS or plain ([`PgStream`]), watched for a
//! dead peer: a server that owes an answer and stays silent for longer than
//! `dead_peer_timeout_ms` ends the connection with an error, so the host reconnects.
//!
//! # Why the stream watches, and how
//!
//! A path that goes silent without closing (an expired NAT entry, a firewall that drops
//! a flow, a frozen proxy) leaves a statement waiting for its answer for ever: the
//! `postgres` crate has no per-statement timeout. TCP keepalives and `tcp_user_timeout`
//! (set in [`crate::conn`]) catch a path that drops packets, but not a middlebox whose
//! kernel still acknowledges them (a proxy that stopped forwarding, a load balancer).
//! So the stream counts, in PostgreSQL's own framing, the answers the server owes:
//! every `Query` and `Sync` message (and the startup message) is answered by exactly
//! one `ReadyForQuery`. While one is owed and nothing arrives for the limit, reading
//! fails with `TimedOut`; any byte from the server restarts the count of silence. An
//! idle connection owes nothing and is never cut: a connection waiting for
//! notifications sends a heartbeat ([`crate::wake`]) so that a dead one is found too.
//!
//! A statement that may legitimately run long without a byte in return — install's
//! DDL waiting for a lock behind an application's transaction, a prune of a large
//! backlog — runs inside [`DeadPeerWatch::patient`]: no limit then, only TCP keepalives. Cutting
//! such a statement would leave it waiting in the server's lock queue (where it blocks
//! every writer of the table) and try again, for ever.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use postgres::tls::{ChannelBinding, MakeTlsConnect, TlsStream};
use postgres::Socket;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tokio_postgres_rustls::MakeRustlsConnect;

type RustlsStream = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream;

/// The dead-peer limit of one backend instance's connections, shared by the backend
/// (which marks patient statements) and the stream of its current connection.
#[derive(Debug, Clone)]
pub struct DeadPeerWatch {
    limit: Option<Duration>,
    patient: Arc<AtomicBool>,
    /// A shorter limit for the statements of [`DeadPeerWatch::hurried`], in ms; 0: none.
    hurry_ms: Arc<AtomicU64>,
}

impl DeadPeerWatch {
    /// `None`: no limit (`dead_peer_timeout_ms = 0`).
    pub fn new(limit: Option<Duration>) -> DeadPeerWatch {
        DeadPeerWatch {
            limit,
            patient: Arc::new(AtomicBool::new(false)),
            hurry_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn limit(&self) -> Option<Duration> {
        self.limit
    }

    /// Run `f` with no limit on the server's answers (see the module docs).
    pub fn patient<T>(&self, f: impl FnOnce() -> T) -> T {
        let before = self.patient.swap(true, Ordering::Relaxed);
        let result = f();
        self.patient.store(before, Ordering::Relaxed);
        result
    }

    /// Run `f` with at most `limit` for each answer, whatever the configured limit (even
    /// none): for housekeeping that must not hold anything up, such as a backend's last
    /// statement when it is dropped.
    pub fn hurried<T>(&self, limit: Duration, f: impl FnOnce() -> T) -> T {
        let ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX).max(1);
        let before = self.hurry_ms.swap(ms, Ordering::Relaxed);
        let result = f();
        self.hurry_ms.store(before, Ordering::Relaxed);
        result
    }

    fn hurry(&self) -> Option<Duration> {
        match self.hurry_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// The limit a new wait for an answer starts with.
    fn deadline_limit(&self) -> Option<Duration> {
        self.hurry().or(self.limit)
    }

    fn active_limit(&self) -> Option<Duration> {
        self.hurry()
            .or(self.limit.filter(|_| !self.patient.load(Ordering::Relaxed)))
    }
}

enum Transport {
    Plain(Socket),
    Tls(Box<RustlsStream>),
}

/// A connection's stream; see the module docs.
pub struct PgStream {
    transport: Transport,
    watch: DeadPeerWatch,
    /// `ReadyForQuery` messages the server owes.
    owed: u32,
    sent: Frames,
    received: Frames,
    /// When the silence becomes a dead peer, while something is owed.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl PgStream {
    pub fn plain(socket: Socket, watch: DeadPeerWatch) -> PgStream {
        PgStream::new(Transport::Plain(socket), watch)
    }

    pub fn tls(stream: RustlsStream, watch: DeadPeerWatch) -> PgStream {
        PgStream::new(Transport::Tls(Box::new(stream)), watch)
    }

    fn new(transport: Transport, watch: DeadPeerWatch) -> PgStream {
        PgStream {
            transport,
            watch,
            owed: 0,
            // The first message a client sends is the untyped startup message.
            sent: Frames::new(false),
            received: Frames::new(true),
            deadline: None,
        }
    }

    fn restart_silence(&mut self) {
        let Some(limit) = self.watch.deadline_limit() else {
            return;
        };
        let at = Instant::now() + limit;
        match &mut self.deadline {
            Some(sleep) => sleep.as_mut().reset(at),
            None => self.deadline = Some(Box::pin(tokio::time::sleep_until(at))),
        }
    }

    fn on_sent(&mut self, bytes: &[u8]) {
        let before = self.owed;
        let owed = &mut self.owed;
        self.sent.scan(bytes, |tag| {
            // Startup (untyped), simple Query and Sync are each answered by one
            // ReadyForQuery.
            if matches!(tag, None | Some(b'Q') | Some(b'S')) {
                *owed += 1;
            }
        });
        if before == 0 && self.owed > 0 {
            self.restart_silence();
        }
    }

    fn on_received(&mut self, bytes: &[u8]) {
        let owed = &mut self.owed;
        self.received.scan(bytes, |tag| {
            if tag == Some(b'Z') {
                *owed = owed.saturating_sub(1);
            }
        });
        if self.owed > 0 {
            self.restart_silence();
        }
    }

    /// While the transport has nothing: the dead-peer error once the server has owed an
    /// answer and said nothing for the limit.
    fn silence(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let Some(limit) = self.watch.active_limit() else {
            return Poll::Pending;
        };
        if self.owed == 0 {
            return Poll::Pending;
        }
        let Some(deadline) = self.deadline.as_mut() else {
            return Poll::Pending;
        };
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "no answer from the server for {} ms (dead_peer_timeout_ms): the connection is taken for dead",
                    limit.as_millis()
                ),
            )),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for PgStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = match &mut this.transport {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        match polled {
            Poll::Ready(Ok(())) => {
                let filled = buf.filled();
                if filled.len() > before {
                    let new = filled[before..].to_vec();
                    this.on_received(&new);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => this.silence(cx).map(Err),
            other => other,
        }
    }
}

impl AsyncWrite for PgStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = match &mut this.transport {
            Transport::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        };
        match polled {
            Poll::Ready(Ok(n)) => {
                this.on_sent(&buf[..n]);
                Poll::Ready(Ok(n))
            }
            Poll::Pending => this.silence(cx).map(Err),
            other => other,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = match &mut this.transport {
            Transport::Plain(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        };
        match polled {
            Poll::Pending => this.silence(cx).map(Err),
            other => other,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().transport {
            Transport::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl TlsStream for PgStream {
    fn channel_binding(&self) -> ChannelBinding {
        match &self.transport {
            Transport::Plain(_) => ChannelBinding::none(),
            Transport::Tls(s) => s.channel_binding(),
        }
    }
}

/// Finds message boundaries in one direction of PostgreSQL's protocol: a type byte
/// (except the client's first, untyped, startup message) and a big-endian length that
/// counts itself but not the type byte.
#[derive(Debug)]
struct Frames {
    typed: bool,
    header: [u8; 5],
    have: usize,
    /// Body bytes of the current message still to skip.
    skip: usize,
}

impl Frames {
    fn new(typed: bool) -> Frames {
        Frames {
            typed,
            header: [0; 5],
            have: 0,
            skip: 0,
        }
    }

    /// Feed the next bytes; `on_message` gets each message's type byte (`None` for the
    /// startup message) as soon as its header is complete.
    fn scan(&mut self, mut bytes: &[u8], mut on_message: impl FnMut(Option<u8>)) {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let header_len = if self.typed { 5 } else { 4 };
            let n = (header_len - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == header_len {
                let (tag, len) = if self.typed {
                    (Some(self.header[0]), &self.header[1..5])
                } else {
                    (None, &self.header[0..4])
                };
                let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
                self.skip = len.saturating_sub(4);
                self.have = 0;
                self.typed = true;
                on_message(tag);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn frames_are_found_however_the_bytes_are_split() {
        let mut stream = Vec::new();
        // Startup: length 9 = 4 + 5 bytes of body.
        stream.extend_from_slice(&9u32.to_be_bytes());
        stream.extend_from_slice(b"abcde");
        stream.extend(message(b'Q', b"SELECT 1\0"));
        stream.extend(message(b'P', b"\0SELECT $1\0\0\0"));
        stream.extend(message(b'S', b""));
        for chunk in [1, 2, 3, 7, 100] {
            let mut frames = Frames::new(false);
            let mut tags = Vec::new();
            for piece in stream.chunks(chunk) {
                frames.scan(piece, |t| tags.push(t));
            }
            assert_eq!(tags, [None, Some(b'Q'), Some(b'P'), Some(b'S')], "{chunk}");
        }
    }
}
