//! The `[handler.config]` table of a maildir handler, and the checks it gets at start-up.

use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use epidemic_plugin_sdk::HandlerConfig;
use serde::Deserialize;

use crate::error::MaildirError;

/// The config table as written in the file. See the crate docs for each key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MaildirConfigFile {
    #[serde(default = "default_table")]
    table: String,
    base_dir: PathBuf,
    #[serde(default = "default_username_column")]
    username_column: String,
    #[serde(default = "default_quota_column")]
    quota_column: String,
    #[serde(default)]
    on_delete: OnDelete,
    #[serde(default)]
    orphans: Orphans,
    archive_dir: Option<PathBuf>,
    dir_mode: Option<DirMode>,
    uid: Option<u32>,
    gid: Option<u32>,
}

fn default_table() -> String {
    "mail_users".to_owned()
}

fn default_username_column() -> String {
    "username".to_owned()
}

fn default_quota_column() -> String {
    "quota_bytes".to_owned()
}

/// What a DELETE does to the user's Maildir.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDelete {
    /// Remove the directory and everything in it.
    #[default]
    Remove,
    /// Move it into `archive_dir`.
    Archive,
}

/// What the end of a whole snapshot of the table does with a Maildir that no row backs
/// (an orphan). It is logged in every mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Orphans {
    /// Leave it where it is.
    #[default]
    Keep,
    /// Move it into `archive_dir`.
    Archive,
    /// Remove the directory and everything in it.
    Remove,
}

impl Orphans {
    /// The mode as the config file spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Orphans::Keep => "keep",
            Orphans::Archive => "archive",
            Orphans::Remove => "remove",
        }
    }
}

/// `dir_mode` as TOML allows it: an integer (`0o700`) or an octal string (`"0700"`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum DirMode {
    Bits(u32),
    Octal(String),
}

/// The checked config.
#[derive(Debug, Clone)]
pub struct MaildirConfig {
    pub table: String,
    pub base_dir: PathBuf,
    pub username_column: String,
    pub quota_column: String,
    pub on_delete: OnDelete,
    pub orphans: Orphans,
    pub archive_dir: PathBuf,
    pub dir_mode: u32,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// Maildirs hold private mail: only their owner may enter them.
const DEFAULT_DIR_MODE: u32 = 0o700;

impl MaildirConfig {
    pub fn from_handler_config(config: &HandlerConfig) -> Result<MaildirConfig, MaildirError> {
        let file: MaildirConfigFile = config
            .parse()
            .map_err(|e| MaildirError::Config(e.to_string()))?;
        let bad = |msg: String| Err(MaildirError::Config(msg));

        for (key, value) in [
            ("table", &file.table),
            ("username_column", &file.username_column),
            ("quota_column", &file.quota_column),
        ] {
            if value.is_empty() {
                return bad(format!("{key} is empty"));
            }
        }
        if file.username_column == file.quota_column {
            return bad("username_column and quota_column name the same column".to_owned());
        }

        check_path("base_dir", &file.base_dir)?;
        // base_dir is never created: if it is a mount point that is not mounted yet, filling
        // the empty directory underneath would hide mail once the mount comes back.
        match std::fs::metadata(&file.base_dir) {
            Ok(m) if m.is_dir() => {}
            _ => {
                return bad(format!(
                    "base_dir {} is missing or not a directory",
                    file.base_dir.display()
                ))
            }
        }

        let archive_dir = match file.archive_dir {
            Some(dir) => {
                check_path("archive_dir", &dir)?;
                dir
            }
            None => file.base_dir.join(".archive"),
        };
        if file.base_dir.starts_with(&archive_dir) {
            return bad("archive_dir must not be base_dir or contain it".to_owned());
        }
        if let Ok(inside) = archive_dir.strip_prefix(&file.base_dir) {
            // Usernames never start with a dot, so a dot name cannot collide with a domain
            // or a user's Maildir.
            let first = inside.components().next();
            let dotted =
                matches!(first, Some(Component::Normal(c)) if c.to_string_lossy().starts_with('.'));
            if !dotted {
                return bad(format!(
                    "archive_dir {} is inside base_dir, so its first component there must start with a dot",
                    archive_dir.display()
                ));
            }
        }
        if file.on_delete == OnDelete::Archive || file.orphans == Orphans::Archive {
            // Archiving is a rename, which cannot cross file systems.
            let base_dev = device(&file.base_dir)?;
            let archive_dev = device(nearest_existing(&archive_dir))?;
            if base_dev != archive_dev {
                return bad(format!(
                    "archive_dir {} is not on the same file system as base_dir (directories are archived by rename)",
                    archive_dir.display()
                ));
            }
        }

        let dir_mode = match file.dir_mode {
            None => DEFAULT_DIR_MODE,
            Some(DirMode::Bits(bits)) => bits,
            Some(DirMode::Octal(text)) => {
                match u32::from_str_radix(text.trim_start_matches("0o"), 8) {
                    Ok(bits) => bits,
                    Err(_) => return bad(format!("dir_mode {text:?} is not an octal number")),
                }
            }
        };
        if dir_mode > 0o7777 || dir_mode & 0o700 != 0o700 {
            return bad(format!(
                "dir_mode {dir_mode:o} must be at most 7777 and give the owner rwx (700)"
            ));
        }

        Ok(MaildirConfig {
            table: file.table,
            base_dir: file.base_dir,
            username_column: file.username_column,
            quota_column: file.quota_column,
            on_delete: file.on_delete,
            orphans: file.orphans,
            archive_dir,
            dir_mode,
            uid: file.uid,
            gid: file.gid,
        })
    }
}

/// Paths must be absolute (the daemon's working directory is nobody's business) and free of
/// `..`, so that "is inside base_dir" can be decided from the text of the path.
fn check_path(key: &str, path: &Path) -> Result<(), MaildirError> {
    if !path.is_absolute() {
        return Err(MaildirError::Config(format!(
            "{key} {} is not an absolute path",
            path.display()
        )));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(MaildirError::Config(format!(
            "{key} {} contains ..",
            path.display()
        )));
    }
    Ok(())
}

fn device(path: &Path) -> Result<u64, MaildirError> {
    std::fs::metadata(path)
        .map(|m| m.dev())
        .map_err(MaildirError::io("inspect", path))
}

/// The path itself or its closest ancestor that exists (`/` at worst).
fn nearest_existing(path: &Path) -> &Path {
    path.ancestors()
        .find(|p| p.exists())
        .unwrap_or_else(|| Path::new("/"))
}
