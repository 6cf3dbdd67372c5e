//! Running one command to completion or to its deadline.
//!
//! The input is written on its own thread, so a command that never reads stdin cannot
//! deadlock us (its early exit shows up as EPIPE, which is ignored: the exit status is
//! what counts). Standard error is read on another thread, keeping only its tail. The
//! command runs in a process group of its own; on timeout the whole group gets SIGTERM,
//! then SIGKILL after a grace period, so `sh -c` scripts do not leave children behind.

use std::io::{self, Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// How much of the end of standard error is kept.
pub const STDERR_TAIL_BYTES: usize = 4096;

/// After SIGTERM on timeout, how long the command gets before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(2);

/// After the command exited, how long to wait for its standard error to reach end of file.
/// Something the command started in the background may hold it open for ever.
const STDERR_GRACE: Duration = Duration::from_secs(2);

/// How a run ended.
#[derive(Debug)]
pub struct RunOutput {
    pub status: ExitStatus,
    /// The deadline passed and the process group was killed.
    pub timed_out: bool,
    /// The last [`STDERR_TAIL_BYTES`] of standard error.
    pub stderr_tail: Vec<u8>,
    /// Standard error reached end of file: nothing of the command's is still holding it.
    pub stderr_closed: bool,
}

#[derive(Debug)]
pub enum RunError {
    /// The command could not be started.
    Spawn(io::Error),
    /// Something else failed; the command, if started, was killed.
    Other(&'static str, io::Error),
}

/// Run `command` with `input` on its stdin, stdout discarded, stderr captured.
pub fn run(
    command: &mut Command,
    input: Vec<u8>,
    timeout: Duration,
) -> Result<RunOutput, RunError> {
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = command.spawn().map_err(RunError::Spawn)?;
    let pid = child.id();

    let abort = |child: &mut std::process::Child, what: &'static str, e: io::Error| {
        signal_group(pid, libc::SIGKILL);
        // Reap it so no zombie is left; the error that matters is `e`.
        let _ = child.wait();
        RunError::Other(what, e)
    };

    let tail = Arc::new(Mutex::new(Vec::new()));
    let (stderr_done, stderr_closed_rx) = mpsc::channel::<()>();
    if let Some(mut stderr) = child.stderr.take() {
        let tail = Arc::clone(&tail);
        let spawned = thread::Builder::new()
            .name("epidemic-exec-stderr".into())
            .spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    match stderr.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => keep_tail(&tail, &buf[..n]),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(_) => break,
                    }
                }
                let _ = stderr_done.send(());
            });
        if let Err(e) = spawned {
            return Err(abort(&mut child, "start a thread for", e));
        }
    }

    if let Some(mut stdin) = child.stdin.take() {
        // Never joined: if something the command started keeps stdin open without reading
        // it, this thread waits for it rather than the handler.
        let spawned = thread::Builder::new()
            .name("epidemic-exec-stdin".into())
            .spawn(move || {
                // EPIPE just means the command did not read all of its input. (It is an
                // error, not a fatal SIGPIPE, because Rust programs such as the daemon and
                // the test runner start with SIGPIPE ignored.)
                let _ = stdin.write_all(&input);
            });
        if let Err(e) = spawned {
            return Err(abort(&mut child, "start a thread for", e));
        }
    }

    let (finished, finished_rx) = mpsc::channel::<()>();
    let watchdog = thread::Builder::new()
        .name("epidemic-exec-timeout".into())
        .spawn(move || match finished_rx.recv_timeout(timeout) {
            Err(RecvTimeoutError::Timeout) => {
                signal_group(pid, libc::SIGTERM);
                if let Err(RecvTimeoutError::Timeout) = finished_rx.recv_timeout(TERM_GRACE) {
                    signal_group(pid, libc::SIGKILL);
                }
                true
            }
            _ => false,
        });
    let watchdog = match watchdog {
        Ok(w) => w,
        Err(e) => return Err(abort(&mut child, "start a thread for", e)),
    };

    let status = child.wait();
    let _ = finished.send(());
    // The watchdog cannot panic; if it somehow did, the run did not time out through it.
    let timed_out = watchdog.join().unwrap_or(false);
    let status = status.map_err(|e| RunError::Other("wait for", e))?;

    let stderr_closed = match stderr_closed_rx.recv_timeout(STDERR_GRACE) {
        Ok(()) | Err(RecvTimeoutError::Disconnected) => true,
        Err(RecvTimeoutError::Timeout) => false,
    };
    let stderr_tail = match tail.lock() {
        Ok(t) => t.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    };
    Ok(RunOutput {
        status,
        timed_out,
        stderr_tail,
        stderr_closed,
    })
}

fn keep_tail(tail: &Mutex<Vec<u8>>, chunk: &[u8]) {
    let mut tail = match tail.lock() {
        Ok(t) => t,
        Err(poisoned) => poisoned.into_inner(),
    };
    tail.extend_from_slice(chunk);
    if tail.len() > STDERR_TAIL_BYTES {
        let excess = tail.len() - STDERR_TAIL_BYTES;
        tail.drain(..excess);
    }
}

/// Send `signal` to the process group the command leads.
///
/// The command is its group's leader (`process_group(0)`), so the group id is its pid.
/// This is called only while the command has not been reaped, or just after it exited on
/// its own at the deadline; then the group's id can only have been reused if the kernel
/// handed the same pid to a new group leader within that instant.
fn signal_group(pid: u32, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) takes plain integers and has no memory-safety requirements.
        unsafe {
            libc::kill(-pid, signal);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("/bin/sh");
        c.arg("-c").arg(script);
        c
    }

    #[test]
    fn stdin_reaches_the_command() {
        let out = run(
            &mut sh("test \"$(cat)\" = hello"),
            b"hello".to_vec(),
            Duration::from_secs(10),
        )
        .unwrap();
        assert!(out.status.success());
        assert!(!out.timed_out);
        assert!(out.stderr_closed);
    }

    #[test]
    fn a_command_that_ignores_a_large_input_does_not_deadlock() {
        let input = vec![b'x'; 4 << 20];
        let out = run(&mut sh("exit 0"), input, Duration::from_secs(10)).unwrap();
        assert!(out.status.success());
        assert!(!out.timed_out);
    }

    #[test]
    fn only_the_tail_of_stderr_is_kept() {
        let script =
            "i=0; while [ $i -lt 2000 ]; do echo line $i >&2; i=$((i+1)); done; echo last >&2";
        let out = run(&mut sh(script), Vec::new(), Duration::from_secs(30)).unwrap();
        assert_eq!(out.stderr_tail.len(), STDERR_TAIL_BYTES);
        assert!(out.stderr_tail.ends_with(b"line 1999\nlast\n"));
    }

    #[test]
    fn timeout_kills_the_whole_process_group() {
        let started = Instant::now();
        // The background sleep holds stderr open: stderr reaches end of file only if it
        // was killed along with the shell.
        let out = run(
            &mut sh("sleep 30 & sleep 30"),
            Vec::new(),
            Duration::from_secs(1),
        )
        .unwrap();
        assert!(out.timed_out);
        assert!(!out.status.success());
        assert!(
            out.stderr_closed,
            "a child of the command survived the timeout"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn spawn_failure_is_reported() {
        let err = run(
            &mut Command::new("/nonexistent/epidemic-test"),
            Vec::new(),
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(matches!(err, RunError::Spawn(e) if e.kind() == io::ErrorKind::NotFound));
    }
}
