//! A throwaway `nats-server` with JetStream (Debian's `nats-server` package), in a temp
//! dir on free ports, stopped at the end; it can be stopped and started again on the same
//! ports and store (an outage). Plus a reader for what a stream holds.
//!
//! `nats-server -js -sd DIR -a 127.0.0.1 -p PORT -m MONITOR_PORT` starts in well under a
//! second; readiness is its monitor's `/healthz` answering `ok` with JetStream up.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt;

use crate::{free_port, wait_until};

const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The `nats-server` binary: Debian installs it in /usr/sbin, which a test's PATH may lack.
fn nats_server_bin() -> PathBuf {
    let debian = PathBuf::from("/usr/sbin/nats-server");
    if debian.exists() {
        debian
    } else {
        PathBuf::from("nats-server")
    }
}

/// A running (or stopped) throwaway server.
pub struct NatsServer {
    dir: tempfile::TempDir,
    pub port: u16,
    pub monitor_port: u16,
    /// Extra `nats-server` arguments (TLS), kept for restarts.
    args: Vec<String>,
    child: Option<Child>,
}

/// One message of a stream, as a consumer reads it.
#[derive(Debug, Clone)]
pub struct StreamMessage {
    pub seq: u64,
    pub subject: String,
    pub msg_id: Option<String>,
    pub payload: serde_json::Value,
}

impl NatsServer {
    /// Start a server with JetStream on free ports.
    pub fn start() -> NatsServer {
        Self::start_with(&[])
    }

    /// Start a server that accepts only TLS clients, with this certificate and key (PEM).
    pub fn start_tls(cert: &std::path::Path, key: &std::path::Path) -> NatsServer {
        let cert = cert.display().to_string();
        let key = key.display().to_string();
        Self::start_with(&["--tls", "--tlscert", &cert, "--tlskey", &key])
    }

    fn start_with(args: &[&str]) -> NatsServer {
        let mut s = NatsServer {
            dir: tempfile::tempdir().expect("tempdir"),
            port: free_port(),
            monitor_port: free_port(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            child: None,
        };
        s.start_again();
        s
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Start the server again (after [`NatsServer::stop`]) on the same ports and store,
    /// and wait until it is ready.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "nats-server is running");
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .expect("nats-server log");
        let child = Command::new(nats_server_bin())
            .arg("-js")
            .arg("-sd")
            .arg(self.dir.path().join("store"))
            .args(["-a", "127.0.0.1"])
            .args(["-p", &self.port.to_string()])
            .args(["-m", &self.monitor_port.to_string()])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start nats-server ({e}): install it with `apt-get install nats-server` (scripts/test.sh does)"
                )
            });
        self.child = Some(child);
        let ready = wait_until(START_TIMEOUT, || {
            http_get(self.monitor_port, "/healthz?js-enabled-only=true")
                .is_some_and(|body| body.contains("ok"))
        });
        assert!(ready, "nats-server did not start:\n{}", self.log_text());
    }

    /// Stop the server (SIGTERM, as an operator's restart does) and wait for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let exited = wait_until(Duration::from_secs(20), || {
                matches!(c.try_wait(), Ok(Some(_)))
            });
            if !exited {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// The monitor's `/jsz?streams=true&config=true`: JetStream's view of streams, their
    /// settings and counts.
    pub fn jsz(&self) -> serde_json::Value {
        let body = http_get(self.monitor_port, "/jsz?streams=true&config=true").expect("GET /jsz");
        serde_json::from_str(&body).expect("/jsz is JSON")
    }

    /// How many messages stream `name` holds (0 if it does not exist or the server is down).
    pub fn stream_count(&self, name: &str) -> u64 {
        let Some(body) = http_get(self.monitor_port, "/jsz?streams=true") else {
            return 0;
        };
        let Ok(jsz) = serde_json::from_str::<serde_json::Value>(&body) else {
            return 0;
        };
        stream_detail(&jsz, name)
            .and_then(|s| s["state"]["messages"].as_u64())
            .unwrap_or(0)
    }

    /// Every message of stream `name`, in stream order, read with an ephemeral consumer.
    pub fn read_stream(&self, name: &str) -> Vec<StreamMessage> {
        let want = self.stream_count(name);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
            let client = async_nats::connect(self.url()).await.expect("connect");
            let js = async_nats::jetstream::new(client);
            let stream = js.get_stream(name).await.expect("stream");
            let consumer = stream
                .create_consumer(pull::Config {
                    ack_policy: AckPolicy::None,
                    deliver_policy: DeliverPolicy::All,
                    ..Default::default()
                })
                .await
                .expect("consumer");
            let mut messages = consumer.messages().await.expect("messages");
            let mut out = Vec::new();
            while (out.len() as u64) < want {
                let next = tokio::time::timeout(Duration::from_secs(30), messages.next())
                    .await
                    .expect("the stream's messages within 30 s")
                    .expect("a message")
                    .expect("a message, not an error");
                let info = next.info().expect("jetstream message info");
                out.push(StreamMessage {
                    seq: info.stream_sequence,
                    subject: next.subject.to_string(),
                    msg_id: next
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("Nats-Msg-Id"))
                        .map(|v| v.as_str().to_owned()),
                    payload: serde_json::from_slice(&next.payload).expect("payload is JSON"),
                });
            }
            out
        })
    }
}

/// Stream `name`'s entry in a `/jsz?streams=true` answer.
pub fn stream_detail<'a>(jsz: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    jsz["account_details"]
        .as_array()?
        .iter()
        .filter_map(|a| a["stream_detail"].as_array())
        .flatten()
        .find(|s| s["name"] == name)
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `GET path` on 127.0.0.1:port; the body of a 200 answer, else `None`.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        conn,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    conn.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200")
        .then(|| body.to_owned())
        .or_else(|| head.starts_with("HTTP/1.0 200").then(|| body.to_owned()))
}
