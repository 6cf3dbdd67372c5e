//! Database credentials kept out of the config file: `database.url_file` (a file holding
//! the whole URL) and `database.password_file` (a file holding only the password, which
//! is put into the URL). Either may name a systemd credential as `cred:NAME`, read from
//! `$CREDENTIALS_DIRECTORY/NAME` (`LoadCredential=` / `LoadCredentialEncrypted=` in the
//! unit), so the secret need not be readable by anyone but the service.
//!
//! The secret ends up in `DatabaseConfig::url`, which is only ever shown through
//! `redact_url`; nothing here logs it, and errors name the file, never its content.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::Result;
use tracing::warn;

use crate::exit::config_bail;

/// Where `value` of `key` points: `cred:NAME` under `$CREDENTIALS_DIRECTORY`, a relative
/// path under the config file's directory.
fn locate(file: &str, key: &str, value: &str, dir: &Path) -> Result<PathBuf> {
    if let Some(name) = value.strip_prefix("cred:") {
        if name.is_empty() || name.contains('/') {
            config_bail!(
                "{file}: {key}: {value:?}: a credential name is one file name (cred:NAME)"
            );
        }
        let Some(creds) = std::env::var_os("CREDENTIALS_DIRECTORY") else {
            config_bail!(
                "{file}: {key}: {value:?} needs $CREDENTIALS_DIRECTORY, which systemd sets for a unit with \
                 LoadCredential={name}:/path/to/file (outside systemd, give a path instead)"
            );
        };
        return Ok(Path::new(&creds).join(name));
    }
    let p = Path::new(value);
    Ok(if p.is_absolute() {
        p.to_owned()
    } else {
        dir.join(p)
    })
}

/// The secret in the file `value` of `key` names, without its trailing line break.
pub fn read(file: &str, key: &str, value: &str, dir: &Path) -> Result<String> {
    let path = locate(file, key, value, dir)?;
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => config_bail!("{file}: {key}: cannot read {}: {e}", path.display()),
    };
    let secret = text.trim_end_matches(['\n', '\r']);
    if secret.is_empty() {
        config_bail!("{file}: {key}: {} is empty", path.display());
    }
    if secret.contains(['\n', '\r']) {
        config_bail!(
            "{file}: {key}: {} holds more than one line; put the secret alone in it",
            path.display()
        );
    }
    if let Ok(meta) = std::fs::metadata(&path) {
        if meta.permissions().mode() & 0o004 != 0 {
            warn!(
                file = %path.display(),
                "{key}: the file is readable by every user; chmod o-r it"
            );
        }
    }
    Ok(secret.to_owned())
}

/// `url` with `password` as its password (percent-encoded as URLs need).
pub fn with_password(url: &str, password: &str) -> Result<String, String> {
    let mut parsed = url::Url::parse(url).map_err(|e| {
        format!(
            "cannot put the password into database.url {}: {e}",
            epidemic_plugin_sdk::redact_url(url)
        )
    })?;
    if parsed.password().is_some() {
        return Err(format!(
            "database.url {} already has a password; remove it from the URL or drop password_file",
            epidemic_plugin_sdk::redact_url(url)
        ));
    }
    if parsed.username().is_empty() || !parsed.has_host() {
        return Err(format!(
            "database.url {url} names no user@host to give the password to (scheme://USER@HOST/...)"
        ));
    }
    parsed
        .set_password(Some(password))
        .map_err(|()| format!("database.url {url} cannot carry a password"))?;
    Ok(parsed.into())
}

#[cfg(test)]
mod tests {
    use super::with_password;

    #[test]
    fn password_is_encoded_into_the_url() {
        assert_eq!(
            with_password("postgres://app@db.example:5432/mail", "p@ss/w:rd").unwrap(),
            "postgres://app:p%40ss%2Fw%3Ard@db.example:5432/mail"
        );
        assert!(with_password("postgres://app:x@db/mail", "y")
            .unwrap_err()
            .contains("already has a password"));
        assert!(with_password("sqlite://mail.db", "y")
            .unwrap_err()
            .contains("names no user@host"));
    }
}
