//! What can go wrong, and whether trying again can help.

use std::io;
use std::path::PathBuf;

use epidemic_plugin_sdk::HandlerError;

/// A failed maildir operation.
///
/// [`MaildirError::is_permanent`] decides how the host treats it: permanent errors are
/// about the data (a username that would escape `base_dir`, a quota that is not a number)
/// and fail the same way every time; the rest are about the machine (a full disk, an
/// unmounted `base_dir`) and may clear up.
#[derive(Debug, thiserror::Error)]
pub enum MaildirError {
    #[error("invalid maildir config: {0}")]
    Config(String),

    #[error("refusing username {username:?}: {reason}")]
    InvalidUsername {
        username: String,
        reason: &'static str,
    },

    #[error("column {column} is {found}, expected a text username")]
    UsernameNotText { column: String, found: String },

    #[error("column {column} holds {value:?}, expected a quota in bytes (a non-negative integer or NULL)")]
    InvalidQuota { column: String, value: String },

    #[error("{} is not a directory (symbolic links are not followed)", path.display())]
    NotADirectory { path: PathBuf },

    #[error("refusing to {action} {}: it is neither empty nor a Maildir (no cur directory)", path.display())]
    NotAMaildir { action: &'static str, path: PathBuf },

    #[error("refusing to {action} orphan {}: {reason}", path.display())]
    UnsafeOrphan {
        action: &'static str,
        path: PathBuf,
        reason: &'static str,
    },

    #[error("cannot rename {} to {}: the target already exists", from.display(), to.display())]
    RenameTargetExists { from: PathBuf, to: PathBuf },

    #[error("cannot rename {} to {}: the target is inside the source", from.display(), to.display())]
    RenameIntoItself { from: PathBuf, to: PathBuf },

    #[error("no free archive name for {} after {tries} tries", base.display())]
    ArchiveNamesExhausted { base: PathBuf, tries: u32 },

    #[error("base_dir {} is missing or not a directory", path.display())]
    BaseDirMissing { path: PathBuf },

    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl MaildirError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| MaildirError::Io {
            action,
            path,
            source,
        }
    }

    /// Whether the change will fail the same way however often it is retried.
    pub fn is_permanent(&self) -> bool {
        match self {
            MaildirError::Config(_)
            | MaildirError::InvalidUsername { .. }
            | MaildirError::UsernameNotText { .. }
            | MaildirError::InvalidQuota { .. }
            | MaildirError::NotADirectory { .. }
            | MaildirError::NotAMaildir { .. }
            | MaildirError::UnsafeOrphan { .. }
            | MaildirError::RenameTargetExists { .. }
            | MaildirError::RenameIntoItself { .. }
            | MaildirError::ArchiveNamesExhausted { .. } => true,
            // An unmounted file system or a full disk can be fixed by the operator while
            // the host backs off.
            MaildirError::BaseDirMissing { .. } | MaildirError::Io { .. } => false,
        }
    }
}

impl From<MaildirError> for HandlerError {
    fn from(e: MaildirError) -> Self {
        let message = e.to_string();
        if e.is_permanent() {
            HandlerError::Permanent(message)
        } else {
            HandlerError::Retryable(message)
        }
    }
}
