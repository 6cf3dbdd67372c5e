//! Finding and loading plugin libraries: the backend the database URL asks for, and the
//! handlers of the `[[handler]]` entries.
//!
//! The core knows no database by name: a URL scheme `X` means the library
//! `libepidemic_backend_X.so`, and if there is none, any backend library whose declared
//! URL schemes include `X`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use epidemic_plugin_host::{self as host, HostBackend, HostHandler, Library};
use std::sync::Arc;

use epidemic_plugin_sdk::backend::{BackendError, ColumnIn, ColumnType, Watch};
use epidemic_plugin_sdk::{redact_url, Subscription};

use crate::config::{Config, HandlerConfig};
use crate::exit::{self, config_bail};
use crate::filter::CelFilter;

/// Directories searched for a bare library name, in order.
pub fn search_dirs(cfg: &Config) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = &cfg.daemon.plugin_dir {
        dirs.push(if d.is_absolute() {
            d.clone()
        } else {
            cfg.dir().join(d)
        });
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            dirs.push(dir.to_owned());
            // The packaged layout: /usr/bin/epidemic, /usr/lib/epidemic/*.so.
            let lib = dir.join("../lib/epidemic");
            dirs.push(std::fs::canonicalize(&lib).unwrap_or(lib));
        }
    }
    dirs
}

/// Where a plugin named in config lives. `maildir` is short for `libepidemic_maildir.so`;
/// anything with a `/` is a path relative to the config file.
pub fn resolve(cfg: &Config, plugin: &str) -> Result<PathBuf> {
    if plugin.contains('/') {
        let p = Path::new(plugin);
        return Ok(if p.is_absolute() {
            p.to_owned()
        } else {
            cfg.dir().join(p)
        });
    }
    let file = if plugin.ends_with(".so") {
        plugin.to_owned()
    } else {
        format!("libepidemic_{plugin}.so")
    };
    let dirs = search_dirs(cfg);
    for d in &dirs {
        let p = d.join(&file);
        if p.exists() {
            return Ok(p);
        }
    }
    let searched: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    config_bail!(
        "plugin {file}: file not found (searched {})",
        searched.join(", ")
    )
}

fn scheme(url: &str) -> Result<&str> {
    url.split_once(':')
        .map(|(s, _)| s)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| exit::config(format!("database.url {} has no scheme", redact_url(url))))
}

/// Load the backend library `database.url` asks for.
pub fn load_backend(cfg: &Config) -> Result<Library> {
    let scheme = scheme(&cfg.database.url)?;
    let lib = if let Some(path) = &cfg.database.backend {
        let path = if path.is_absolute() {
            path.clone()
        } else {
            cfg.dir().join(path)
        };
        host::load(&path)?
    } else {
        let file = format!("libepidemic_backend_{scheme}.so");
        let direct = search_dirs(cfg)
            .into_iter()
            .map(|d| d.join(&file))
            .find(|p| p.exists());
        match direct {
            Some(p) => host::load(&p)?,
            None => find_backend_for(cfg, scheme)?,
        }
    };
    lib.expect_backend()?;
    if !lib.url_schemes.iter().any(|s| s == scheme) {
        config_bail!(
            "backend {} serves {} URLs, not {scheme}://",
            lib.path.display(),
            lib.url_schemes.join(", ")
        );
    }
    Ok(lib)
}

/// Look through every backend library on the search path for one serving `scheme`
/// (`postgresql://` is served by `libepidemic_backend_postgres.so`).
fn find_backend_for(cfg: &Config, scheme: &str) -> Result<Library> {
    let mut known = Vec::new();
    for dir in search_dirs(cfg) {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for p in paths {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if !(name.starts_with("libepidemic_backend_") && name.ends_with(".so")) {
                continue;
            }
            let Ok(lib) = host::load(&p) else { continue };
            if lib.url_schemes.iter().any(|s| s == scheme) {
                return Ok(lib);
            }
            known.extend(lib.url_schemes.iter().map(|s| format!("{s}://")));
        }
    }
    known.sort();
    known.dedup();
    config_bail!(
        "database.url: no backend library for {scheme}:// (found backends for: {})",
        if known.is_empty() {
            "none".to_owned()
        } else {
            known.join(", ")
        }
    )
}

/// A configured handler: its library, a live instance and what it subscribed to.
pub struct LoadedHandler {
    pub config: HandlerConfig,
    pub library: Library,
    pub instance: HostHandler,
    pub subscriptions: Vec<Subscription>,
    /// Its `filter`, compiled.
    pub filter: Option<Arc<CelFilter>>,
    /// Per table (the catalog's spelling): the part of `filter` a backfill's SELECT can
    /// apply ([`CelFilter::pushdown`]), filled in by [`resolve_names`].
    pub snapshot_only: HashMap<String, Vec<ColumnIn>>,
}

impl LoadedHandler {
    /// The tables this handler reads.
    pub fn tables(&self) -> Vec<String> {
        let mut t: Vec<String> = self.subscriptions.iter().map(|s| s.table.clone()).collect();
        t.sort();
        t.dedup();
        t
    }
}

/// Load the handler of one `[[handler]]` entry, for daemon `daemon`.
pub fn load_handler(cfg: &Config, h: &HandlerConfig, daemon: &str) -> Result<LoadedHandler> {
    let file = cfg.path.display();
    let path = resolve(cfg, &h.plugin)
        .map_err(|e| exit::config(format!("{file}: handler {:?}: {e}", h.name)))?;
    let library = host::load(&path)?;
    library.expect_handler()?;
    // The plugin judges its own `[handler.config]`; say which file and table it is.
    let refused = |what: String| {
        exit::config(format!(
            "{file}: [handler.config] of handler {:?} ({}): {what}",
            h.name, library.name
        ))
    };
    let instance = library
        .new_handler(&h.config, daemon, &h.name)
        .map_err(|e| refused(e.to_string()))?;
    let subscriptions = instance
        .subscriptions()
        .map_err(|e| refused(format!("subscriptions: {e}")))?;
    if subscriptions.is_empty() {
        return Err(refused("subscribes to nothing".into()));
    }
    for s in &subscriptions {
        if s.columns.is_empty() {
            return Err(refused(format!(
                "subscription to {} names no columns",
                s.table
            )));
        }
    }
    let filter = match &h.filter {
        Some(source) => Some(Arc::new(CelFilter::compile(source, daemon).map_err(
            |e| exit::config(format!("{file}: handler {:?}: filter: {e}", h.name)),
        )?)),
        None => None,
    };
    Ok(LoadedHandler {
        config: h.clone(),
        library,
        instance,
        subscriptions,
        filter,
        snapshot_only: HashMap::new(),
    })
}

/// Load every `[[handler]]`, for daemon `daemon`.
pub fn load_handlers(cfg: &Config, daemon: &str) -> Result<Vec<LoadedHandler>> {
    if cfg.handlers.is_empty() {
        config_bail!(
            "{}: no [[handler]] entries; nothing to do",
            cfg.path.display()
        );
    }
    let handlers: Vec<LoadedHandler> = cfg
        .handlers
        .iter()
        .map(|h| load_handler(cfg, h, daemon))
        .collect::<Result<_>>()?;
    check_table_entries(cfg, &handlers)?;
    Ok(handlers)
}

/// A `[table.NAME]` entry for a table no handler watches is a typo, not a default.
fn check_table_entries(cfg: &Config, handlers: &[LoadedHandler]) -> Result<()> {
    for name in cfg.tables.keys() {
        let watched = handlers
            .iter()
            .flat_map(|h| &h.subscriptions)
            .any(|s| s.table.eq_ignore_ascii_case(name));
        if !watched {
            config_bail!(
                "{}: [table.{name}]: no handler watches a table called {name}",
                cfg.path.display()
            );
        }
    }
    Ok(())
}

/// Merge every handler's subscriptions into one watch per table: the union of columns,
/// in first-seen order, the columns each handler's row filter reads (captured too, so a
/// row moving in or out of a filter is a change), and the key columns the config names
/// for the table (none: the backend uses the table's primary key).
pub fn watches(cfg: &Config, handlers: &[LoadedHandler]) -> Vec<Watch> {
    let mut out: Vec<Watch> = Vec::new();
    let subscriptions = handlers.iter().flat_map(|h| {
        h.subscriptions
            .iter()
            .map(move |s| (s, h.filter.as_ref().map(|f| f.columns()).unwrap_or(&[])))
    });
    for (s, filter_columns) in subscriptions {
        let w = match out.iter_mut().position(|w| w.table == s.table) {
            Some(i) => &mut out[i],
            None => {
                out.push(Watch {
                    table: s.table.clone(),
                    columns: Vec::new(),
                    key: cfg.table_key(&s.table),
                    types: Vec::new(),
                });
                out.last_mut().expect("pushed")
            }
        };
        for c in &s.columns {
            if !w.columns.contains(c) {
                w.columns.push(c.clone());
            }
        }
        for c in filter_columns {
            if !w.columns.iter().any(|x| x.eq_ignore_ascii_case(c)) {
                w.columns.push(c.clone());
            }
        }
    }
    out
}

/// Check every handler's row filter against the tables it reads, as resolved (catalog
/// columns and types): one line naming the file, the handler and what is wrong.
pub fn check_filters(cfg: &Config, handlers: &[LoadedHandler], watches: &[Watch]) -> Result<()> {
    for h in handlers {
        let Some(f) = &h.filter else { continue };
        for table in h.tables() {
            let Some(w) = watches.iter().find(|w| w.table == table) else {
                continue;
            };
            f.check_types(&w.table, &w.columns, &w.types).map_err(|e| {
                exit::config(format!(
                    "{}: handler {:?}: filter {:?}: {e}",
                    cfg.path.display(),
                    h.config.name,
                    f.source()
                ))
            })?;
        }
    }
    Ok(())
}

/// Ask the backend for the catalog's spelling of every watched table and column and use
/// it in every handler's subscriptions, so that dispatch (which compares names exactly)
/// matches what the backend reports on a database whose names are case-insensitive.
/// Returns the merged watches in that spelling. Also works out, per handler with a
/// filter and table, what a backfill's SELECT can apply of the filter
/// (`LoadedHandler::snapshot_only`), from the catalog's spelling and types.
pub fn resolve_names(
    cfg: &Config,
    conn: &mut HostBackend,
    handlers: &mut [LoadedHandler],
) -> Result<Vec<Watch>, BackendError> {
    let asked = watches(cfg, handlers);
    let resolved = conn.resolve(&asked)?;
    let same_shape = resolved.len() == asked.len()
        && asked
            .iter()
            .zip(&resolved)
            .all(|(a, r)| a.columns.len() == r.columns.len());
    if !same_shape {
        return Err(BackendError::Other(
            "backend resolved the watched names into a different shape".into(),
        ));
    }
    // Positional: the backend returns one watch per watch asked, columns in order.
    for h in handlers.iter_mut() {
        let Some(f) = &h.filter else { continue };
        h.snapshot_only = h
            .subscriptions
            .iter()
            .filter_map(|s| asked.iter().position(|w| w.table == s.table))
            .map(|i| {
                let r = &resolved[i];
                (r.table.clone(), f.pushdown(&r.columns, &r.types))
            })
            .filter(|(_, only)| !only.is_empty())
            .collect();
    }
    for s in handlers.iter_mut().flat_map(|h| h.subscriptions.iter_mut()) {
        let Some(i) = asked.iter().position(|w| w.table == s.table) else {
            continue;
        };
        for c in s.columns.iter_mut() {
            if let Some(j) = asked[i].columns.iter().position(|a| a == c) {
                *c = resolved[i].columns[j].clone();
            }
        }
        s.table = resolved[i].table.clone();
    }
    // The keys and column types the backend found go with the merged watches (filter
    // columns keep the expression's spelling; they are matched without regard to case).
    let mut merged = watches(cfg, handlers);
    for w in &mut merged {
        if let Some(r) = resolved.iter().find(|r| r.table == w.table) {
            w.key = r.key.clone();
            if r.types.len() == r.columns.len() {
                w.types = w
                    .columns
                    .iter()
                    .map(|c| {
                        r.columns
                            .iter()
                            .position(|x| x.eq_ignore_ascii_case(c))
                            .map_or(ColumnType::Missing, |i| r.types[i])
                    })
                    .collect();
            }
        }
    }
    Ok(merged)
}

/// Open a connection through the backend library. The error keeps the backend's error
/// kind (for the exit status) under a line naming the URL, password redacted, and where
/// a refused URL or option came from: an `EPIDEMIC_DATABASE__…` variable whose key the
/// refusal names, or else the file.
pub fn open(cfg: &Config, lib: &Library) -> Result<HostBackend> {
    open_raw(cfg, lib).map_err(|e| {
        let url = redact_url(&cfg.database.url);
        // A backend that already names the URL in its message is not made to say it twice.
        let place = if e.to_string().contains(&url) {
            format!("{} backend", lib.name)
        } else {
            format!("{url} ({})", lib.name)
        };
        let context = match (&e, env_option(&e.to_string())) {
            (_, Some(var)) => format!("{var} (environment): {place}"),
            (BackendError::Invalid(_), None) => format!("{}: {place}", cfg.path.display()),
            _ => place,
        };
        anyhow::Error::new(e).context(context)
    })
}

/// The `EPIDEMIC_DATABASE__…` variable whose option key a backend's message names in
/// backticks (as serde's "unknown field `key`" does).
fn env_option(message: &str) -> Option<String> {
    std::env::vars().find_map(|(var, _)| {
        let key = var.strip_prefix("EPIDEMIC_DATABASE__")?.to_lowercase();
        message.contains(&format!("`{key}`")).then_some(var)
    })
}

/// [`open`], keeping the backend's error kind so callers can retry connection errors.
pub fn open_raw(cfg: &Config, lib: &Library) -> Result<HostBackend, BackendError> {
    lib.open_backend(&cfg.database.url, &cfg.backend_options())
}
