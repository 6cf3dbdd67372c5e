//! The Epidemic plugin SDK: write a handler plugin that the `epidemic` daemon calls for
//! every change of the rows it cares about.
//!
//! This page is the handler author's guide. Backend authors read [`backend`]; the host's
//! side of the boundary is the `epidemic-plugin-host` crate; the boundary itself is
//! [`abi`] (its own crate, so that its version is the ABI's).
//!
//! # A handler in five minutes
//!
//! A handler is a `cdylib` exporting one type that implements [`Handler`]:
//!
//! ```toml
//! [lib]
//! crate-type = ["cdylib", "rlib"]   # the .so the daemon loads; rlib for unit tests
//!
//! [dependencies]
//! epidemic-plugin-sdk = "0.2"
//! serde = { version = "1", features = ["derive"] }
//! ```
//!
//! ```no_run
//! use epidemic_plugin_sdk::{Change, Context, Handler, HandlerConfig, HandlerError, Subscription};
//!
//! #[derive(serde::Deserialize)]
//! #[serde(deny_unknown_fields)]          // a typo in the config is an error, not a default
//! struct Config { table: String }
//!
//! pub struct Greeter { table: String }
//!
//! impl Handler for Greeter {
//!     const NAME: &'static str = "greeter";
//!
//!     fn new(config: &HandlerConfig, ctx: &Context) -> Result<Self, HandlerError> {
//!         let config: Config = config.parse()?;
//!         ctx.logger().info(&format!("greeting rows of {} on {}", config.table, ctx.daemon()));
//!         Ok(Greeter { table: config.table })
//!     }
//!
//!     fn subscriptions(&self) -> Vec<Subscription> {
//!         vec![Subscription::new(&self.table, ["name"])]
//!     }
//!
//!     fn insert(&mut self, change: &Change) -> Result<(), HandlerError> {
//!         let id = change.key_value("id");
//!         tracing::info!(?id, "hello {}", change.value("name").unwrap());
//!         Ok(())
//!     }
//! }
//!
//! epidemic_plugin_sdk::export_handler!(Greeter);
//! # use epidemic_plugin_sdk::tracing;
//! # fn main() {}
//! ```
//!
//! `cargo build --release`, then `epidemic plugin check target/release/libgreeter.so
//! --handler-config '{"table": "users"}'` prints its name, SDK version and subscriptions,
//! or the one-line reason it cannot be loaded. Add it to `epidemic.toml`:
//!
//! ```toml
//! [[handler]]
//! name = "greeter"
//! plugin = "/usr/lib/epidemic/libgreeter.so"
//! [handler.config]
//! table = "users"
//! ```
//!
//! `plugin-sdk/template/` in the Epidemic sources is a complete plugin to copy.
//!
//! # What you receive
//!
//! [`Handler::subscriptions`] names tables, the columns you need and the operations you
//! want. You get an INSERT or DELETE of those tables, and an UPDATE when one of your
//! columns changed or the row moved to another key. A [`Change`] holds:
//!
//! | field | what it is |
//! |---|---|
//! | `op`, `table`, `schema` | INSERT/UPDATE/DELETE; the table as you subscribed to it; its schema on PostgreSQL |
//! | `columns`, `old`, `new` | your columns and their values before and after (`old` is `None` for an INSERT, `new` for a DELETE); read them with [`Change::value`], [`Change::old_value`], [`Change::new_value`], [`Change::changed`] |
//! | `key_columns`, `key`, `old_key` | the row's primary key (or the `[table.NAME] key` the config names), always there whatever columns you asked for; `old_key` when an UPDATE changed it |
//! | `stable_id` | unique in the database for ever: your idempotency key downstream |
//! | `origin` | a live change, or a row of a snapshot ([`Origin`]) |
//! | `attempt` | 1 on the first delivery, more on retries |
//! | `txid`, `commit_seq` | the transaction and a commit-order token, where the backend has them |
//! | `id`, `changed_at_us` | the position in the table's log; when it was captured |
//!
//! Values are [`Value`]s: `Null`, `Int`, `Float`, `Text`, `Bytes`. Exact decimals arrive as
//! text, never through a float.
//!
//! # What the daemon promises, and what it asks of you
//!
//! - **Every committed change, at least once.** A crash of the daemon (or of the machine)
//!   between your success and its acknowledgement hands you the same changes again, with
//!   the same `stable_id`. Make handlers idempotent: creating what exists is success,
//!   removing what is gone is success.
//! - **Commit order per row.** Changes to one row reach you in the order they committed.
//! - **Your calls come from one thread at a time**, for each `[[handler]]` entry. Another
//!   handler's failures never hold you up, and yours never hold them up.
//!
//! # Failing well
//!
//! Return [`HandlerError::Retryable`] for what may work later (a full disk, a server that
//! is down): the daemon retries with backoff, up to `max_attempts`, then moves the change
//! to the dead letters (`epidemic dead-letters list | retry | drop`), or with
//! `on_failure = "block"` retries until it succeeds. Return [`HandlerError::Permanent`]
//! for what never will (bad data): it goes to the dead letters at once. A panic is caught
//! on your side of the boundary and treated as a retryable failure; it never takes the
//! daemon down. `std::io::Error` converts to a retryable error with `?`.
//!
//! # Batches
//!
//! The daemon hands changes over in batches through [`Handler::handle_batch`], whose
//! default calls [`Handler::handle`] (and so `insert`/`update`/`delete`) for each. Override
//! it when a batch is cheaper as a whole (one transaction, one request, waiting for many
//! acknowledgements at once). Return [`BatchError`] with the index of the change that
//! failed: the daemon counts the ones before it as handled, retries that one on its own,
//! then goes on with the rest in one call again.
//!
//! # Logging and context
//!
//! [`Context`] says which daemon (`ctx.daemon()`: which host this is) and which
//! `[[handler]]` entry (`ctx.handler()`) you are. `tracing` events from your code (use the
//! re-export [`tracing`], or your own `tracing` 0.1) and [`Context::logger`] land in the
//! daemon's log, in its format (`--log-format json` too), with your handler's name.
//!
//! # Testing without a database
//!
//! [`testing::Harness`] builds your handler from a JSON config and feeds it changes made
//! with [`testing::insert`], [`testing::update`], [`testing::delete`] (and
//! [`testing::keyed`] for a key), routed by the daemon's own [`Router`], so what passes
//! there behaves the same in the daemon.
//!
//! # Compatibility
//!
//! A plugin built with SDK 0.2.x loads into any epidemic whose plugin ABI is 0.2, and a
//! later 0.2 release may only add to the boundary; a plugin from another series (0.1, 0.3)
//! is refused at load time with one line naming both versions, never undefined behaviour.

pub mod backend;
pub mod backfill;
pub mod barrier;
pub mod boundary;
pub mod change;
pub mod context;
pub mod handler;
pub mod ident;
pub mod ops;
pub mod routing;
pub mod testing;

pub use backfill::SnapshotEvent;
pub use change::{Change, Op, Ops, Origin, Subscription, Value};
pub use context::{Context, Level, Logger};
pub use handler::{BatchError, Handler, HandlerConfig, HandlerError};
pub use ident::redact_url;
pub use routing::Router;
pub use serde_json;
pub use tracing;

/// The stable-ABI boundary (its own crate, so that its version is the ABI's).
pub use epidemic_plugin_abi as abi;

/// The version of this SDK crate (the ABI's is [`abi::ABI_VERSION`]).
pub const SDK_VERSION: &str = env!("CARGO_PKG_VERSION");

/// What abi_stable's `#[export_root_module]` generates, written against the SDK's
/// re-export of abi_stable so plugin crates need no abi_stable dependency of their own
/// (the attribute names `::abi_stable` directly). The symbol name is abi_stable 0.11's
/// root-module loader name; `__private::tests` checks it against abi_stable's constant.
#[doc(hidden)]
#[macro_export]
macro_rules! __export_root_module {
    ($module:expr) => {
        #[doc(hidden)]
        pub mod __epidemic_plugin_root {
            use super::*;
            use $crate::__private::abi_stable::library as __lib;

            fn __epidemic_root_module() -> $crate::abi::PluginModuleRef {
                $module
            }

            extern "C" fn __epidemic_erased_root_module() -> __lib::RootModuleResult {
                __lib::__call_root_module_loader(__epidemic_root_module)
            }

            /// The header the Epidemic host reads to find and check this plugin.
            #[export_name = "_1as_0lib_1header_0root_bmodule_bloader"]
            pub static EPIDEMIC_PLUGIN_HEADER: __lib::LibHeader = unsafe {
                __lib::LibHeader::from_constructor::<$crate::abi::PluginModuleRef>(
                    __epidemic_erased_root_module,
                    __lib::CheckTypeLayout::Yes,
                )
            };
        }
    };
}

#[doc(hidden)]
pub mod __private {
    use abi_stable::prefix_type::PrefixTypeTrait;
    use abi_stable::std_types::RStr;
    pub use epidemic_plugin_abi::abi_stable;

    use epidemic_plugin_abi::{no_backend, no_handler, PluginKind, PluginModule, PluginModuleRef};

    pub fn handler_module<H: crate::Handler>(version: &'static str) -> PluginModuleRef {
        PluginModule {
            kind: PluginKind::Handler,
            name: RStr::from_str(H::NAME),
            version: RStr::from_str(version),
            sdk_version: RStr::from_str(crate::SDK_VERSION),
            url_schemes: RStr::from_str(""),
            new_handler: crate::handler::new_handler::<H>,
            open_backend: no_backend,
        }
        .leak_into_prefix()
    }

    pub fn backend_module<B: crate::backend::Backend>(version: &'static str) -> PluginModuleRef {
        PluginModule {
            kind: PluginKind::Backend,
            name: RStr::from_str(B::NAME),
            version: RStr::from_str(version),
            sdk_version: RStr::from_str(crate::SDK_VERSION),
            url_schemes: RStr::from_str(B::URL_SCHEMES_JOINED),
            new_handler: no_handler,
            open_backend: crate::backend::adapter::open_backend::<B>,
        }
        .leak_into_prefix()
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn export_symbol_matches_abi_stable() {
            assert_eq!(
                abi_stable::library::ROOT_MODULE_LOADER_NAME,
                "_1as_0lib_1header_0root_bmodule_bloader",
                "abi_stable changed its root-module symbol: update __export_root_module!"
            );
        }
    }
}
