//! The logger the host hands to each plugin: a plugin's records become events of this
//! process's `tracing`, so they appear in the daemon's log in its format (`--log-format
//! json` included), with the plugin's name as a field.

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RArc, RStr, RString, RVec, Tuple2};
use epidemic_plugin_abi::{LoggerBox, RLevel, RawLogger, RawLogger_TO};

#[derive(Clone)]
struct HostLogger {
    /// The handler's `[[handler]]` name, or the backend's name.
    plugin: String,
}

/// Events from plugins have this target, so `RUST_LOG=plugin=debug` selects them.
const TARGET: &str = "plugin";

impl RawLogger for HostLogger {
    fn enabled(&self, level: RLevel) -> bool {
        match level {
            RLevel::Trace => tracing::enabled!(target: TARGET, tracing::Level::TRACE),
            RLevel::Debug => tracing::enabled!(target: TARGET, tracing::Level::DEBUG),
            RLevel::Info => tracing::enabled!(target: TARGET, tracing::Level::INFO),
            RLevel::Warn => tracing::enabled!(target: TARGET, tracing::Level::WARN),
            RLevel::Error => tracing::enabled!(target: TARGET, tracing::Level::ERROR),
        }
    }

    fn log(
        &self,
        level: RLevel,
        target: RStr<'_>,
        message: RStr<'_>,
        fields: RVec<Tuple2<RString, RString>>,
    ) {
        // tracing's field names are static: a plugin's own fields travel as one text.
        let fields = fields
            .iter()
            .map(|Tuple2(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ");
        let (plugin, source, message) = (self.plugin.as_str(), target.as_str(), message.as_str());
        macro_rules! emit {
            ($level:expr) => {
                if fields.is_empty() {
                    tracing::event!(target: TARGET, $level, plugin, source, "{message}")
                } else {
                    tracing::event!(target: TARGET, $level, plugin, source, fields = %fields, "{message}")
                }
            };
        }
        match level {
            RLevel::Trace => emit!(tracing::Level::TRACE),
            RLevel::Debug => emit!(tracing::Level::DEBUG),
            RLevel::Info => emit!(tracing::Level::INFO),
            RLevel::Warn => emit!(tracing::Level::WARN),
            RLevel::Error => emit!(tracing::Level::ERROR),
        }
    }
}

/// A logger for the plugin called `plugin`, writing to this process's `tracing`.
pub fn host_logger(plugin: &str) -> LoggerBox {
    RawLogger_TO::from_ptr(
        RArc::new(HostLogger {
            plugin: plugin.to_owned(),
        }),
        TD_Opaque,
    )
}
