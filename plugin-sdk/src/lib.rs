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
//! ```ignore
//! use epidemic_plugin_sdk::{Change, Handler, HandlerConfig, HandlerError, Subscription};
//!
//! pub struct Greeter { table: String }
//!
//! impl Handler for Greeter {
//!     const NAME: &'static str = "greeter";
//!     fn new(config: &HandlerConfig) -> Result<Self, HandlerError> {
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
//! ```
//!
//! Build it as a `cdylib`; the host refuses a library built against an incompatible SDK
//! with a one-line error naming both versions. A panic in handler code is caught on the
//! plugin's side and reported as a failed delivery; it never crosses into the host.
//!
//! This crate does not talk to any database and does not run handlers on its own.

pub mod backend;
pub mod change;
pub mod ffi;
pub mod handler;
pub mod host;
pub mod testing;

pub use backend::{Backend, BackendError, Batch, Consumer, Registered, StartFrom, Watch};
pub use change::{Change, Op, Ops, Subscription, Value};
pub use ffi::SDK_VERSION;
pub use handler::{Handler, HandlerConfig, HandlerError};
pub use serde_json;

#[doc(hidden)]
pub mod __private {
    pub use abi_stable;
    use abi_stable::prefix_type::PrefixTypeTrait;
    use abi_stable::std_types::RStr;

    use crate::ffi::{PluginKind, PluginModule, PluginModuleRef};

    pub fn handler_module<H: crate::Handler>(version: &'static str) -> PluginModuleRef {
        PluginModule {
            kind: PluginKind::Handler,
            name: RStr::from_str(H::NAME),
            version: RStr::from_str(version),
            url_schemes: RStr::from_str(""),
            new_handler: crate::handler::new_handler::<H>,
            open_backend: crate::ffi::no_backend,
        }
        .leak_into_prefix()
    }

    pub fn backend_module<B: crate::Backend>(version: &'static str) -> PluginModuleRef {
        PluginModule {
            kind: PluginKind::Backend,
            name: RStr::from_str(B::NAME),
            version: RStr::from_str(version),
            url_schemes: RStr::from_str(B::URL_SCHEMES_JOINED),
            new_handler: crate::ffi::no_handler,
            open_backend: crate::backend::open_backend::<B>,
        }
        .leak_into_prefix()
    }
}
