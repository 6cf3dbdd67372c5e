//! Exit statuses a service manager or a script can act on, from BSD's `sysexits.h`.
//!
//! systemd's `RestartPreventExitStatus=78` stops a unit from restarting over a config
//! error that a restart cannot fix, while a database outage (69) or anything else is
//! worth another try. Errors are classified by type, never by their text: a
//! [`ConfigError`] anywhere in an error's chain means "configuration", a backend's
//! connection error means "unavailable".

use std::fmt;

use epidemic_plugin_host::LoadError;
use epidemic_plugin_sdk::backend::BackendError;

/// Something else went wrong.
pub const FAILURE: u8 = 1;
/// Bad command line (clap's own usage errors).
pub const EX_USAGE: u8 = 64;
/// The command's input names something that does not exist (a dead-letter id).
pub const EX_DATAERR: u8 = 65;
/// The database cannot be reached.
pub const EX_UNAVAILABLE: u8 = 69;
/// The configuration is wrong: the file, an `EPIDEMIC_…` variable, a plugin it names,
/// a table or column it watches.
pub const EX_CONFIG: u8 = 78;

/// An error the operator fixes in the configuration; exits with [`EX_CONFIG`].
#[derive(Debug)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// An input error naming something that does not exist; exits with [`EX_DATAERR`].
#[derive(Debug)]
pub struct DataError(pub String);

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DataError {}

/// A [`ConfigError`] as an `anyhow::Error`.
pub fn config(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(ConfigError(msg.into()))
}

/// `return Err(config error)`, formatted like `bail!`.
macro_rules! config_bail {
    ($($arg:tt)*) => {
        return Err($crate::exit::config(format!($($arg)*)))
    };
}
pub(crate) use config_bail;

/// The exit status for an error: the first classified error in its chain decides.
pub fn code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if cause.is::<ConfigError>() || cause.is::<LoadError>() {
            return EX_CONFIG;
        }
        if cause.is::<DataError>() {
            return EX_DATAERR;
        }
        if let Some(b) = cause.downcast_ref::<BackendError>() {
            match b {
                BackendError::Connection(_) => return EX_UNAVAILABLE,
                // A bad URL or option, a missing table or column: the config names them.
                BackendError::Invalid(_) => return EX_CONFIG,
                _ => return FAILURE,
            }
        }
    }
    FAILURE
}
