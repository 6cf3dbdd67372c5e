//! Identifier checks shared by every backend.
//!
//! Names of tables and columns come from config files and plugins, so they are never
//! trusted: each is checked against a conservative pattern here and then quoted by the
//! backend in its own dialect. Mixed case and reserved words pass (quoting handles
//! them); anything that could close a quote or start a new statement does not.

use crate::backend::BackendError;

/// Longest identifier accepted: PostgreSQL's limit, the tightest of the three backends.
pub const MAX_LEN: usize = 63;

/// Check one identifier: ASCII letters, digits, `_` and `$`, not starting with a digit
/// or `$`, at most [`MAX_LEN`] bytes. `what` names it in the error ("table", "column").
pub fn check(what: &str, name: &str) -> Result<(), BackendError> {
    let mut chars = name.chars();
    let ok = match chars.next() {
        Some(c) if c.is_ascii_alphabetic() || c == '_' => {
            chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
        }
        _ => false,
    };
    if !ok || name.len() > MAX_LEN {
        return Err(BackendError::Invalid(format!(
            "invalid {what} name {name:?}: use letters, digits, _ or $ (not first), at most {MAX_LEN} bytes"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check;

    #[test]
    fn accepts_mixed_case_and_reserved_words() {
        for ok in ["users", "Order", "select", "_x", "a$b", "MailUsers2"] {
            assert!(check("table", ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_injection_and_odd_names() {
        for bad in [
            "users; DROP TABLE x",
            "",
            "1abc",
            "a\"b",
            "a`b",
            "a b",
            "a.b",
            "$a",
            "é",
            &"x".repeat(64),
        ] {
            let err = check("table", bad).unwrap_err().to_string();
            assert!(err.contains("invalid table name"), "{bad}: {err}");
        }
    }
}

/// A database URL with its password replaced by `***`, for logs and error messages.
/// `postgres://app:secret@db/mail` becomes `postgres://app:***@db/mail`.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &authority[..at];
    let Some(colon) = userinfo.find(':') else {
        return url.to_owned();
    };
    format!(
        "{}{}:***{}",
        &url[..scheme_end + 3],
        &userinfo[..colon],
        &rest[at..]
    )
}

#[cfg(test)]
mod redact_tests {
    use super::redact_url;

    #[test]
    fn hides_only_the_password() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/mail"),
            "postgres://app:***@db:5432/mail"
        );
        assert_eq!(
            redact_url("mysql://root:p@ss@127.0.0.1/x?a=b"),
            "mysql://root:***@127.0.0.1/x?a=b"
        );
        assert_eq!(
            redact_url("mysql://root@127.0.0.1/x"),
            "mysql://root@127.0.0.1/x"
        );
        assert_eq!(redact_url("sqlite://mail.db"), "sqlite://mail.db");
    }
}
