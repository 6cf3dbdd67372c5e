//! The directory tree under `base_dir`: creating, renaming, removing and archiving
//! Maildirs, writing their `maildirsize` file, and finding the Maildirs on disk (for
//! orphans).
//!
//! Every operation here is idempotent, because delivery is at-least-once: doing it again
//! after it succeeded (or half succeeded, if the daemon died) ends in the same state.
//! Paths for changes are built only from a [`Mailbox`], so they stay inside `base_dir` or
//! `archive_dir`; directories on the way are checked not to be symbolic links. Paths of
//! orphans come from [`MaildirTree::scan_maildirs`], which yields only `<domain>/<local>`
//! or `<user>` under `base_dir`, and are checked again before anything is done to them.

use std::ffi::{OsStr, OsString};
use std::fs::{self, DirBuilder};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::SystemTime;

use crate::config::MaildirConfig;
use crate::error::MaildirError;
use crate::mailbox::Mailbox;

/// The Maildir++ quota file, kept in the Maildir's top directory.
pub const MAILDIRSIZE: &str = "maildirsize";

/// The subdirectories every Maildir has.
const SUBDIRS: [&str; 3] = ["cur", "new", "tmp"];

/// How many `.<n>` suffixes to try for an archive name before giving up.
const ARCHIVE_TRIES: u32 = 1000;

pub struct MaildirTree {
    base_dir: PathBuf,
    archive_dir: PathBuf,
    dir_mode: u32,
    uid: Option<u32>,
    gid: Option<u32>,
}

impl MaildirTree {
    pub fn new(config: &MaildirConfig) -> MaildirTree {
        MaildirTree {
            base_dir: config.base_dir.clone(),
            archive_dir: config.archive_dir.clone(),
            dir_mode: config.dir_mode,
            uid: config.uid,
            gid: config.gid,
        }
    }

    pub fn base_dir(&self) -> &Path {
        &self.base_dir
    }

    /// Where a user's Maildir lives.
    pub fn maildir(&self, mailbox: &Mailbox) -> PathBuf {
        self.base_dir.join(mailbox.relative_dir())
    }

    fn domain_dir(&self, mailbox: &Mailbox) -> Option<PathBuf> {
        mailbox.domain().map(|d| self.base_dir.join(d))
    }

    /// Fail (retryably) when `base_dir` is gone, rather than create anything in its place.
    pub fn check_base_dir(&self) -> Result<(), MaildirError> {
        match fs::metadata(&self.base_dir) {
            Ok(m) if m.is_dir() => Ok(()),
            _ => Err(MaildirError::BaseDirMissing {
                path: self.base_dir.clone(),
            }),
        }
    }

    /// Create the user's Maildir with `cur`, `new` and `tmp`, and the domain directory
    /// above it, as far as they are missing. Returns whether the Maildir itself was new.
    pub fn create(&self, mailbox: &Mailbox) -> Result<bool, MaildirError> {
        if let Some(domain_dir) = self.domain_dir(mailbox) {
            self.ensure_dir(&domain_dir)?;
        }
        let dir = self.maildir(mailbox);
        let created = self.ensure_dir(&dir)?;
        for sub in SUBDIRS {
            self.ensure_dir(&dir.join(sub))?;
        }
        Ok(created)
    }

    /// Move a Maildir to a new name. Already moved (only the new one exists) is success;
    /// when neither exists there is nothing to move and the caller creates the new one.
    pub fn rename(&self, from: &Mailbox, to: &Mailbox) -> Result<(), MaildirError> {
        let from_dir = self.maildir(from);
        let to_dir = self.maildir(to);
        if from_dir == to_dir {
            return Ok(());
        }
        if !self.dir_exists(&from_dir)? {
            return Ok(());
        }
        if to_dir.starts_with(&from_dir) {
            return Err(MaildirError::RenameIntoItself {
                from: from_dir,
                to: to_dir,
            });
        }
        if self.dir_exists(&to_dir)? {
            return Err(MaildirError::RenameTargetExists {
                from: from_dir,
                to: to_dir,
            });
        }
        self.check_is_maildir("rename", &from_dir)?;
        if let Some(domain_dir) = self.domain_dir(to) {
            self.ensure_dir(&domain_dir)?;
        }
        fs::rename(&from_dir, &to_dir).map_err(MaildirError::io("rename", &from_dir))?;
        self.remove_domain_if_empty(from.domain().map(OsStr::new));
        Ok(())
    }

    /// Remove a user's Maildir and everything in it. Already gone is success.
    pub fn remove(&self, mailbox: &Mailbox) -> Result<(), MaildirError> {
        let dir = self.maildir(mailbox);
        if !self.dir_exists(&dir)? {
            return Ok(());
        }
        self.check_is_maildir("remove", &dir)?;
        fs::remove_dir_all(&dir).map_err(MaildirError::io("remove", &dir))?;
        self.remove_domain_if_empty(mailbox.domain().map(OsStr::new));
        Ok(())
    }

    /// Move a user's Maildir to `archive_dir/<domain>/<local>-<change id>` (or
    /// `archive_dir/<local>-<change id>`), adding `.2`, `.3`, ... if that name is taken.
    /// Already gone is success. Returns where it went, if it was moved now.
    pub fn archive(
        &self,
        mailbox: &Mailbox,
        change_id: i64,
    ) -> Result<Option<PathBuf>, MaildirError> {
        let dir = self.maildir(mailbox);
        if !self.dir_exists(&dir)? {
            return Ok(None);
        }
        self.check_is_maildir("archive", &dir)?;
        let domain = mailbox.domain().map(OsStr::new);
        let target = self.archive_as(
            &dir,
            domain,
            OsStr::new(mailbox.local()),
            &change_id.to_string(),
        )?;
        self.remove_domain_if_empty(domain);
        Ok(Some(target))
    }

    /// Rename `dir` to `archive_dir/[<domain>/]<local>-<tag>`, or the first free
    /// `<local>-<tag>.<n>`, never overwriting an earlier archive.
    fn archive_as(
        &self,
        dir: &Path,
        domain: Option<&OsStr>,
        local: &OsStr,
        tag: &str,
    ) -> Result<PathBuf, MaildirError> {
        let parent = match domain {
            Some(domain) => self.archive_dir.join(domain),
            None => self.archive_dir.clone(),
        };
        self.ensure_dir_all(&parent)?;
        let name = |n: u32| {
            let mut name = OsString::from(local);
            name.push(format!("-{tag}"));
            if n > 1 {
                name.push(format!(".{n}"));
            }
            parent.join(name)
        };
        let mut n = 1;
        let mut target = name(n);
        while self.exists_no_follow(&target)? {
            n += 1;
            if n > ARCHIVE_TRIES {
                return Err(MaildirError::ArchiveNamesExhausted {
                    base: name(1),
                    tries: ARCHIVE_TRIES,
                });
            }
            target = name(n);
        }
        fs::rename(dir, &target).map_err(MaildirError::io("archive", dir))?;
        Ok(target)
    }

    /// Every Maildir under `base_dir`, by its path relative to `base_dir`: a directory
    /// with `cur`, `new` and `tmp` directories, at `<user>` or `<domain>/<local>`.
    /// Names starting with a dot (Maildir++ folders, the default `archive_dir`) are never
    /// entered or reported, nor is `archive_dir` wherever it is, nor anything reached
    /// through a symbolic link. Inside a bare user's Maildir, a directory that looks like
    /// a Maildir may be a folder of that user (`LAYOUT=fs`) as well as the Maildir of a
    /// user of a domain that has the user's name: it is not reported. Returns the
    /// directories that could not be read: the Maildirs in them are not reported.
    pub fn scan_maildirs(
        &self,
        mut found: impl FnMut(&Path),
    ) -> Result<Vec<MaildirError>, MaildirError> {
        self.check_base_dir()?;
        let mut unreadable = Vec::new();
        for top in self.subdirs(&self.base_dir)? {
            let top = Path::new(&top);
            let top_dir = self.base_dir.join(top);
            if looks_like_maildir(&top_dir) {
                found(top);
                continue;
            }
            match self.subdirs(&top_dir) {
                Ok(subs) => {
                    for sub in subs {
                        let rel = top.join(sub);
                        if looks_like_maildir(&self.base_dir.join(&rel)) {
                            found(&rel);
                        }
                    }
                }
                Err(e) => unreadable.push(e),
            }
        }
        Ok(unreadable)
    }

    /// The names of the directories in `dir` that a scan may enter: real directories
    /// (not symbolic links), not starting with a dot, and not `archive_dir` or one of its
    /// ancestors.
    fn subdirs(&self, dir: &Path) -> Result<Vec<OsString>, MaildirError> {
        let mut names = Vec::new();
        for entry in fs::read_dir(dir).map_err(MaildirError::io("read", dir))? {
            let entry = entry.map_err(MaildirError::io("read", dir))?;
            let name = entry.file_name();
            if name.as_encoded_bytes().starts_with(b".") {
                continue;
            }
            // DirEntry::file_type does not follow a symbolic link.
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if self.archive_dir.starts_with(dir.join(&name)) {
                continue;
            }
            names.push(name);
        }
        Ok(names)
    }

    /// When anything in a Maildir found by [`Self::scan_maildirs`] last changed: the
    /// newest modification time of the directory and of its `cur`, `new` and `tmp` (a
    /// delivery, a client reading mail, a quota rewrite all change one of them).
    pub fn last_modified(&self, relative: &Path) -> Result<SystemTime, MaildirError> {
        let dir = self.base_dir.join(relative);
        let mut newest = SystemTime::UNIX_EPOCH;
        for path in std::iter::once(dir.clone()).chain(SUBDIRS.iter().map(|s| dir.join(s))) {
            let modified = fs::symlink_metadata(&path)
                .and_then(|m| m.modified())
                .map_err(MaildirError::io("inspect", &path))?;
            newest = newest.max(modified);
        }
        Ok(newest)
    }

    /// Remove an orphan found by [`Self::scan_maildirs`] and everything in it, then its
    /// domain directory if that is left empty. Already gone is success. `backed` says
    /// whether a path relative to `base_dir` is the Maildir of a row.
    pub fn remove_orphan(
        &self,
        relative: &Path,
        backed: impl Fn(&Path) -> bool,
    ) -> Result<(), MaildirError> {
        let Some(orphan) = self.orphan("remove", relative, backed)? else {
            return Ok(());
        };
        // remove_dir_all removes symbolic links inside, never what they point to.
        fs::remove_dir_all(&orphan.dir).map_err(MaildirError::io("remove", &orphan.dir))?;
        self.remove_domain_if_empty(orphan.domain);
        Ok(())
    }

    /// Move an orphan found by [`Self::scan_maildirs`] to
    /// `archive_dir/[<domain>/]<local>-<tag>` (`.2`, `.3`, ... if taken), then remove its
    /// domain directory if that is left empty. Returns where it went, or `None` when it
    /// was already gone. `backed` as for [`Self::remove_orphan`].
    pub fn archive_orphan(
        &self,
        relative: &Path,
        tag: &str,
        backed: impl Fn(&Path) -> bool,
    ) -> Result<Option<PathBuf>, MaildirError> {
        let Some(orphan) = self.orphan("archive", relative, backed)? else {
            return Ok(None);
        };
        let target = self.archive_as(&orphan.dir, orphan.domain, orphan.local, tag)?;
        self.remove_domain_if_empty(orphan.domain);
        Ok(Some(target))
    }

    /// The checks before an orphan is removed or archived, made again at that moment:
    /// one or two plain components under `base_dir`, none of them a symbolic link or
    /// starting with a dot; still a Maildir; for a bare user, holding no Maildir that a
    /// row backs (a user of a domain with the same name). `None` when it is gone.
    fn orphan<'a>(
        &self,
        action: &'static str,
        relative: &'a Path,
        backed: impl Fn(&Path) -> bool,
    ) -> Result<Option<Orphan<'a>>, MaildirError> {
        let dir = self.base_dir.join(relative);
        let refuse = |reason: &'static str| MaildirError::UnsafeOrphan {
            action,
            path: dir.clone(),
            reason,
        };
        let parts: Vec<&OsStr> = relative
            .components()
            .map(|c| match c {
                Component::Normal(name) if !name.as_encoded_bytes().starts_with(b".") => Ok(name),
                _ => Err(refuse(
                    "it is not <user> or <domain>/<local> under base_dir",
                )),
            })
            .collect::<Result<_, _>>()?;
        let (domain, local) = match parts.as_slice() {
            [local] => (None, *local),
            [domain, local] => (Some(*domain), *local),
            _ => {
                return Err(refuse(
                    "it is not <user> or <domain>/<local> under base_dir",
                ))
            }
        };
        if let Some(domain) = domain {
            if !self.dir_exists(&self.base_dir.join(domain))? {
                return Ok(None);
            }
        }
        if !self.dir_exists(&dir)? {
            return Ok(None);
        }
        if !looks_like_maildir(&dir) {
            return Err(refuse("it no longer has cur, new and tmp directories"));
        }
        if domain.is_none() {
            // Its own folders go with it, and so would the Maildir of an orphan of a domain
            // with its name (which would be removed anyway); a user's that a row backs
            // must not.
            for sub in self.subdirs(&dir)? {
                let rel = relative.join(&sub);
                if backed(&rel) && looks_like_maildir(&dir.join(&sub)) {
                    return Err(refuse(
                        "it holds the Maildir of a user of the domain with its name",
                    ));
                }
            }
        }
        Ok(Some(Orphan { dir, domain, local }))
    }

    /// Make the first line of `maildirsize` the quota definition `<bytes>S`, or remove the
    /// file when there is no quota. Usage lines already in the file are kept: they still
    /// count the mail that is there, and the mail server recalculates the file by its own
    /// rules. An unchanged quota leaves the file alone.
    pub fn set_quota(&self, mailbox: &Mailbox, quota: Option<u64>) -> Result<(), MaildirError> {
        let path = self.maildir(mailbox).join(MAILDIRSIZE);
        let current = match fs::read(&path) {
            Ok(bytes) => Some(bytes),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(MaildirError::io("read", &path)(e)),
        };
        let Some(bytes) = quota else {
            return match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    Err(MaildirError::io("remove", &path)(e))
                }
                _ => Ok(()),
            };
        };
        let header = format!("{bytes}S");
        let (first, usage): (&[u8], &[u8]) = match &current {
            None => (&[], &[]),
            Some(text) => match text.iter().position(|&b| b == b'\n') {
                Some(i) => (&text[..i], &text[i + 1..]),
                None => (text, &[]),
            },
        };
        if current.is_some() && first == header.as_bytes() {
            return Ok(());
        }
        let mut content = Vec::with_capacity(header.len() + 1 + usage.len());
        content.extend_from_slice(header.as_bytes());
        content.push(b'\n');
        content.extend_from_slice(usage);
        self.write_atomically(&path, &content)
    }

    /// Write a file by writing a temporary file next to it and renaming it over the old
    /// one, so that a reader (the mail server) sees the old or the new content, never half.
    fn write_atomically(&self, path: &Path, content: &[u8]) -> Result<(), MaildirError> {
        let dir = path.parent().unwrap_or(&self.base_dir);
        // tempfile creates the file with mode 0600, which is what maildirsize wants.
        let mut tmp = tempfile::Builder::new()
            .prefix(".epidemic-maildirsize-")
            .tempfile_in(dir)
            .map_err(MaildirError::io("create a temporary file in", dir))?;
        tmp.write_all(content)
            .map_err(MaildirError::io("write", tmp.path()))?;
        // Without the sync, a crash soon after the rename can leave an empty file on
        // file systems that order metadata before data.
        tmp.as_file()
            .sync_all()
            .map_err(MaildirError::io("sync", tmp.path()))?;
        self.chown(tmp.path())?;
        tmp.persist(path)
            .map_err(|e| MaildirError::io("replace", path)(e.error))?;
        Ok(())
    }

    /// Create one directory with the configured mode and owner; an existing directory is
    /// fine, anything else in its place is not. Returns whether it was created now.
    fn ensure_dir(&self, path: &Path) -> Result<bool, MaildirError> {
        match DirBuilder::new().mode(self.dir_mode).create(path) {
            Ok(()) => {
                self.set_mode_and_owner(path)?;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                if self.dir_exists(path)? {
                    Ok(false)
                } else {
                    Err(MaildirError::NotADirectory {
                        path: path.to_owned(),
                    })
                }
            }
            Err(e) => Err(MaildirError::io("create", path)(e)),
        }
    }

    /// Like [`Self::ensure_dir`], creating missing parents too (for `archive_dir`, which
    /// may be anywhere).
    fn ensure_dir_all(&self, path: &Path) -> Result<(), MaildirError> {
        if self.dir_exists(path)? {
            return Ok(());
        }
        if let Some(parent) = path.parent() {
            if !parent.exists() {
                DirBuilder::new()
                    .mode(self.dir_mode)
                    .recursive(true)
                    .create(parent)
                    .map_err(MaildirError::io("create", parent))?;
            }
        }
        self.ensure_dir(path).map(drop)
    }

    fn set_mode_and_owner(&self, path: &Path) -> Result<(), MaildirError> {
        // The mode given to mkdir is reduced by the daemon's umask; the configured mode is
        // meant exactly.
        fs::set_permissions(path, fs::Permissions::from_mode(self.dir_mode))
            .map_err(MaildirError::io("set the mode of", path))?;
        self.chown(path)
    }

    fn chown(&self, path: &Path) -> Result<(), MaildirError> {
        if self.uid.is_none() && self.gid.is_none() {
            return Ok(());
        }
        std::os::unix::fs::chown(path, self.uid, self.gid)
            .map_err(MaildirError::io("change the owner of", path))
    }

    /// Whether `path` is a directory, without following a symbolic link in its place.
    /// Something else there (a file, a link) is an error.
    fn dir_exists(&self, path: &Path) -> Result<bool, MaildirError> {
        match fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => Ok(true),
            Ok(_) => Err(MaildirError::NotADirectory {
                path: path.to_owned(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(MaildirError::io("inspect", path)(e)),
        }
    }

    fn exists_no_follow(&self, path: &Path) -> Result<bool, MaildirError> {
        match fs::symlink_metadata(path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(MaildirError::io("inspect", path)(e)),
        }
    }

    /// A bare username can name the same directory as a domain (`example.org` and
    /// `ann@example.org`). Before moving or deleting a whole directory, make sure it is a
    /// Maildir (it has `cur`) or empty, so that a domain full of other users is never taken
    /// for one user's Maildir.
    fn check_is_maildir(&self, action: &'static str, dir: &Path) -> Result<(), MaildirError> {
        if fs::symlink_metadata(dir.join("cur")).is_ok_and(|m| m.is_dir()) {
            return Ok(());
        }
        let mut entries = fs::read_dir(dir).map_err(MaildirError::io("read", dir))?;
        if entries.next().is_none() {
            return Ok(());
        }
        Err(MaildirError::NotAMaildir {
            action,
            path: dir.to_owned(),
        })
    }

    /// Tidy up a domain directory that the last user left. Failure is not an error: the
    /// directory is not empty (the usual case), or it will be tried again next time.
    fn remove_domain_if_empty(&self, domain: Option<&OsStr>) {
        if let Some(domain) = domain {
            // remove_dir only ever removes an empty directory.
            let _ = fs::remove_dir(self.base_dir.join(domain));
        }
    }
}

/// An orphan that passed the checks before it is moved or removed.
struct Orphan<'a> {
    dir: PathBuf,
    domain: Option<&'a OsStr>,
    local: &'a OsStr,
}

/// Whether `dir` has `cur`, `new` and `tmp` directories (none of them a symbolic link):
/// what a scan takes for a Maildir.
fn looks_like_maildir(dir: &Path) -> bool {
    SUBDIRS
        .iter()
        .all(|sub| fs::symlink_metadata(dir.join(sub)).is_ok_and(|m| m.is_dir()))
}
