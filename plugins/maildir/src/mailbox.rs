//! Usernames and where their Maildir lives: the one place that decides whether a name from
//! the database is safe to turn into a path.

use std::path::PathBuf;

use crate::error::MaildirError;

/// The longest local part or domain accepted, in bytes. File names may have 255 bytes; the
/// rest is kept for the `-<change id>.<n>` suffix of archived directories.
pub const MAX_PART_LEN: usize = 200;

/// A validated username: `local@domain`, or a bare `local`.
///
/// Each part is exactly one path component that stays inside `base_dir`: never empty,
/// never `.` or `..`, no `/`, `\`, NUL or other control character, and no leading dot
/// (dot names are kept for Maildir++ folders and the default `.archive` directory, so a
/// user can never be mapped onto them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox {
    local: String,
    domain: Option<String>,
}

impl Mailbox {
    pub fn parse(username: &str) -> Result<Mailbox, MaildirError> {
        let refuse = |reason| MaildirError::InvalidUsername {
            username: username.to_owned(),
            reason,
        };
        if username.is_empty() {
            return Err(refuse("it is empty"));
        }
        let (local, domain) = match username.split_once('@') {
            None => (username, None),
            Some((local, domain)) => {
                if domain.contains('@') {
                    return Err(refuse("it has more than one @"));
                }
                (local, Some(domain))
            }
        };
        check_part(local).map_err(refuse)?;
        if let Some(domain) = domain {
            check_part(domain).map_err(refuse)?;
        }
        Ok(Mailbox {
            local: local.to_owned(),
            domain: domain.map(str::to_owned),
        })
    }

    pub fn local(&self) -> &str {
        &self.local
    }

    pub fn domain(&self) -> Option<&str> {
        self.domain.as_deref()
    }

    /// The Maildir's path relative to `base_dir`: `domain/local` or `local`.
    pub fn relative_dir(&self) -> PathBuf {
        match &self.domain {
            Some(domain) => PathBuf::from(domain).join(&self.local),
            None => PathBuf::from(&self.local),
        }
    }
}

fn check_part(part: &str) -> Result<(), &'static str> {
    if part.is_empty() {
        return Err("its local part or domain is empty");
    }
    if part == "." || part == ".." {
        return Err("a part is . or ..");
    }
    if part.starts_with('.') {
        return Err("a part starts with a dot");
    }
    if part.contains('/') || part.contains('\\') {
        return Err("it contains a slash or backslash");
    }
    if part.contains('\0') {
        return Err("it contains a NUL byte");
    }
    if part.chars().any(char::is_control) {
        return Err("it contains a control character");
    }
    if part.len() > MAX_PART_LEN {
        return Err("a part is longer than 200 bytes");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_local_and_domain() {
        let m = Mailbox::parse("ann@example.org").unwrap();
        assert_eq!(m.local(), "ann");
        assert_eq!(m.domain(), Some("example.org"));
        assert_eq!(m.relative_dir(), PathBuf::from("example.org/ann"));
        let m = Mailbox::parse("bob").unwrap();
        assert_eq!(m.domain(), None);
        assert_eq!(m.relative_dir(), PathBuf::from("bob"));
    }

    #[test]
    fn refuses_names_that_could_leave_base_dir() {
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "x/../../y",
            "/etc/passwd",
            "a\\b",
            "a@b/c",
            "a@..",
            "..@example.org",
            "@example.org",
            "ann@",
            "a@b@c",
            ".hidden",
            "ann@.archive",
            "a\0b",
            "a\nb@example.org",
        ] {
            assert!(Mailbox::parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(Mailbox::parse(&"x".repeat(MAX_PART_LEN + 1)).is_err());
        assert!(Mailbox::parse(&"x".repeat(MAX_PART_LEN)).is_ok());
    }
}
