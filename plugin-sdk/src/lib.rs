//! The Epidemic plugin SDK: what handler plugins, backend plugins and the `epidemic` host
//! share.
//!
//! - [`change`]: the plain Rust types plugin code works with ([`Change`], [`Value`], ...).
//! - [`handler`]: the [`Handler`] trait and [`export_handler!`] for handler plugins.
//! - [`backend`]: the [`Backend`] trait and [`export_backend!`] for database backends.
//! - [`host`]: loading and checking a plugin library (used by the host and tests).
//! - [`testing`]: feed changes to a handler in a unit test, without a database.
//! - [`ffi`]: the stable-ABI boundary types (abi_stable). Authors never need it.
//!
//! # Writing a handler
//!
//! ```no_run
//! use epidemic_plugin_sdk::{Change, Context, Handler, HandlerConfig, HandlerError, Subscription};
//!
//! pub struct Greeter { table: String }
//!
//! impl Handler for Greeter {
//!     const NAME: &'static str = "greeter";
//!     fn new(_config: &HandlerConfig, _ctx: &Context) -> Result<Self, HandlerError> {
//!         Ok(Greeter { table: "users".into() })
//!     }
//!     fn subscriptions(&self) -> Vec<Subscription> {
//!         vec![Subscription::new(&self.table, ["name"])]
//!     }
//!     fn insert(&mut self, change: &Change) -> Result<(), HandlerError> {
//!         println!("hello {}", change.value("name").unwrap());
//!         Ok(())
//!     }
//! }
//!
//! epidemic_plugin_sdk::export_handler!(Greeter);
//! # fn main() {}
//! ```
//!
//! Build it as a `cdylib`; the host refuses a library built against an incompatible SDK
//! with a one-line error naming both versions. A panic in handler code is caught on the
//! plugin's side and reported as a failed delivery; it never crosses into the host.
//!
//! This crate does not talk to any database and does not run handlers on its own.

pub mod backend;
pub mod boundary;
pub mod change;
pub mod context;
pub mod handler;
pub mod ident;
pub mod ops;
pub mod routing;
pub mod testing;

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
