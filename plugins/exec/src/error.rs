//! How running a command can fail, and whether trying again can help.

use std::fmt;
use std::io;
use std::path::PathBuf;

use epidemic_plugin_sdk::HandlerError;

/// The end of a command's standard error, boiled down to one line for an error message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StderrTail(String);

impl StderrTail {
    /// How many of the last non-empty lines are kept.
    const LINES: usize = 3;
    /// The most characters kept (the end is kept when there are more).
    const MAX_CHARS: usize = 400;

    pub fn from_bytes(bytes: &[u8]) -> StderrTail {
        let text = String::from_utf8_lossy(bytes);
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let start = lines.len().saturating_sub(Self::LINES);
        // Control characters (colour codes, carriage returns) would garble a log line.
        let joined: String = lines[start..]
            .join(" | ")
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let count = joined.chars().count();
        if count <= Self::MAX_CHARS {
            StderrTail(joined)
        } else {
            let end: String = joined.chars().skip(count - Self::MAX_CHARS).collect();
            StderrTail(format!("…{end}"))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StderrTail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            Ok(())
        } else {
            write!(f, "; stderr: {}", self.0)
        }
    }
}

/// A failed exec handler call or config.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("invalid exec config: {0}")]
    Config(String),

    #[error(
        "cannot run `{command}`{}: {source}",
        working_dir.as_ref().map(|d| format!(" in {}", d.display())).unwrap_or_default()
    )]
    Spawn {
        command: String,
        /// Named because a missing working directory fails the same way as a missing
        /// program.
        working_dir: Option<PathBuf>,
        #[source]
        source: io::Error,
    },

    #[error("cannot {action} `{command}`: {source}")]
    Io {
        command: String,
        action: &'static str,
        #[source]
        source: io::Error,
    },

    #[error("`{command}` exited with status {code}{stderr}")]
    Exit {
        command: String,
        code: i32,
        stderr: StderrTail,
        permanent: bool,
    },

    #[error("`{command}` was killed by signal {signal}{stderr}")]
    Signal {
        command: String,
        signal: i32,
        stderr: StderrTail,
    },

    #[error(
        "`{command}` timed out after {secs} s and was killed{}{stderr}",
        if *escaped { " (a process it started in a new session still holds its stderr)" } else { "" }
    )]
    TimedOut {
        command: String,
        secs: u64,
        /// Something outlived the kill of the process group.
        escaped: bool,
        stderr: StderrTail,
    },
}

impl ExecError {
    /// Whether the change will fail the same way however often it is retried.
    pub fn is_permanent(&self) -> bool {
        match self {
            ExecError::Config(_) => true,
            ExecError::Exit { permanent, .. } => *permanent,
            // A missing program may be installed, a slow service may recover: the host
            // backs off and retries, and dead-letters the change in the end.
            ExecError::Spawn { .. }
            | ExecError::Io { .. }
            | ExecError::Signal { .. }
            | ExecError::TimedOut { .. } => false,
        }
    }
}

impl From<ExecError> for HandlerError {
    fn from(e: ExecError) -> Self {
        if e.is_permanent() {
            HandlerError::Permanent(e.to_string())
        } else {
            HandlerError::Retryable(e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stderr_tail_keeps_the_last_lines_on_one_line() {
        let tail = StderrTail::from_bytes(b"one\ntwo\n\nthree\r\n\x1b[31mfour\n");
        assert_eq!(tail.as_str(), "two | three |  [31mfour");
        assert_eq!(tail.to_string(), "; stderr: two | three |  [31mfour");
        assert_eq!(StderrTail::from_bytes(b"\n\n").to_string(), "");
    }

    #[test]
    fn stderr_tail_is_capped() {
        let long = "x".repeat(1000);
        let tail = StderrTail::from_bytes(long.as_bytes());
        assert_eq!(tail.as_str().chars().count(), StderrTail::MAX_CHARS + 1);
        assert!(tail.as_str().starts_with('…'));
    }
}
