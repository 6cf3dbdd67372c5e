//! `epidemic`: the host. Reads the config, loads the backend library its database URL
//! asks for and the handler libraries of its `[[handler]]` entries, installs the capture
//! triggers and dispatches every captured change to the handlers that asked for it.
//!
//! The host names no database and links no database client: everything database-specific
//! is in the backend library, reached only through the plugin SDK.

mod backfill;
mod backoff;
mod bench;
mod config;
mod daemon;
mod dispatch;
mod lease;
mod metrics;
mod plugins;
mod report;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use epidemic_plugin_host as host;
use epidemic_plugin_sdk::backend::{
    DeadLetterQuery, DeadLetterUpdate, LeaseRequest, LeaseState, StartFrom,
};

use crate::config::Config;

#[derive(Parser)]
#[command(
    name = "epidemic",
    version,
    about = "Turns row changes in a database into calls to handler plugins, and never loses one",
    long_about = "Turns row changes in a database into calls to handler plugins, and never loses one.\n\n\
        Triggers copy every change of the watched columns into a log table inside the database; \
        `epidemic run` reads that log, calls each handler plugin's INSERT/UPDATE/DELETE callbacks \
        and records how far it got, so a daemon that was down catches up when it returns.\n\n\
        Typical use: `epidemic sql` (let the DBA review the DDL), `epidemic install`, `epidemic run`."
)]
struct Cli {
    /// Config file (TOML). Keys can be overridden with EPIDEMIC_SECTION__KEY variables,
    /// e.g. EPIDEMIC_DATABASE__URL.
    #[arg(
        long,
        short,
        global = true,
        default_value = "epidemic.toml",
        env = "EPIDEMIC_CONFIG"
    )]
    config: PathBuf,

    /// Log format on stderr. The level comes from RUST_LOG (default: info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,

    /// Show long explanations of errors (e.g. abi_stable's full layout report).
    #[arg(long, short, global = true)]
    verbose: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Install (idempotently) and run the daemon until SIGTERM or SIGINT.
    Run {
        /// A consumer seen for the first time starts from the oldest change still in the
        /// log instead of from now. Existing consumers always resume where they were.
        #[arg(long)]
        from_oldest: bool,
    },
    /// Create or update log tables and triggers for the configured handlers.
    Install,
    /// Remove every object Epidemic created (log tables, triggers, cursors), nothing else.
    Uninstall,
    /// Print the SQL `install` would run now, applying nothing (for review by a DBA).
    Sql {
        /// Print what `uninstall` would run instead.
        #[arg(long)]
        uninstall: bool,
    },
    /// Show each consumer's position, backlog and dead letters, and each watched table's
    /// triggers and schema problems.
    Status {
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// List, retry or drop changes that handlers gave up on.
    #[command(name = "dead-letters", subcommand)]
    DeadLetters(DeadLetterCommand),
    /// Measure trigger overhead on writes and commit-to-handler latency on this database,
    /// using a scratch table the bench creates and removes (never your tables).
    Bench(bench::BenchArgs),
    /// Inspect plugin libraries.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
}

#[derive(Subcommand)]
enum DeadLetterCommand {
    /// List dead letters (all daemons).
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Ask the owning daemons to deliver these again (they do within a second or two
    /// while running); a letter that succeeds is removed.
    Retry {
        #[arg(required = true)]
        ids: Vec<i64>,
    },
    /// Forget these dead letters.
    Drop {
        #[arg(required = true)]
        ids: Vec<i64>,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Load a plugin library and print its name, SDK version and subscriptions.
    Check {
        /// Path to the .so file.
        file: PathBuf,
        /// The handler's config table as JSON, to show its subscriptions; by default the
        /// config of a [[handler]] using this file in --config, if there is one.
        #[arg(long)]
        handler_config: Option<String>,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run { .. }) {
        // A command whose output is piped into `head` ends quietly when the reader goes
        // away, as other Unix tools do, instead of panicking in `println!` (Rust ignores
        // SIGPIPE by default). The daemon keeps ignoring it: its stderr may be a pipe.
        // SAFETY: setting a signal's disposition to the default before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    init_logging(cli.log_format);
    let verbose = cli.verbose;
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line on stderr: the chain of contexts, outermost first.
            let msg: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("epidemic: error: {}", msg.join(": "));
            if verbose {
                if let Some(detail) = e.downcast_ref::<host::LoadError>().and_then(|l| l.detail()) {
                    eprintln!("{detail}");
                }
            }
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run { from_oldest } => {
            let stop = daemon::install_signal_handlers()?;
            let cfg = Config::load(&cli.config)?;
            let start = if from_oldest {
                StartFrom::Oldest
            } else {
                StartFrom::Now
            };
            daemon::run(cfg, daemon::RunOptions { start }, stop)
        }
        Command::Install => {
            let cfg = Config::load(&cli.config)?;
            let (mut conn, watches) = connect_and_plan(&cfg)?;
            let stmts = conn.install(&watches).context("install")?;
            let tables: Vec<&str> = watches.iter().map(|w| w.table.as_str()).collect();
            println!(
                "installed: {} statements applied; watching {}",
                stmts.len(),
                tables.join(", ")
            );
            Ok(())
        }
        Command::Uninstall => {
            let cfg = Config::load(&cli.config)?;
            let lib = plugins::load_backend(&cfg)?;
            let mut conn = plugins::open(&cfg, &lib)?;
            let stmts = conn.uninstall().context("uninstall")?;
            if stmts.is_empty() {
                println!("nothing to uninstall");
            } else {
                println!("uninstalled: {} statements applied", stmts.len());
            }
            Ok(())
        }
        Command::Sql { uninstall } => {
            let cfg = Config::load(&cli.config)?;
            let (conn, stmts) = if uninstall {
                let lib = plugins::load_backend(&cfg)?;
                let mut conn = plugins::open(&cfg, &lib)?;
                let stmts = conn.plan_uninstall().context("plan uninstall")?;
                (conn, stmts)
            } else {
                let (mut conn, watches) = connect_and_plan(&cfg)?;
                let stmts = conn.plan_install(&watches).context("plan install")?;
                (conn, stmts)
            };
            println!(
                "-- epidemic {}: {} statement(s) for {} as of now",
                if uninstall { "uninstall" } else { "install" },
                stmts.len(),
                epidemic_plugin_sdk::redact_url(&cfg.database.url)
            );
            print!(
                "{}",
                conn.render_script(&stmts).context("render the script")?
            );
            Ok(())
        }
        Command::Status { json } => {
            let cfg = Config::load(&cli.config)?;
            let lib = plugins::load_backend(&cfg)?;
            let mut conn = plugins::open(&cfg, &lib)?;
            let mut status = conn.status().context("status")?;
            if let Ok(LeaseState::Holders(h)) = conn.lease(&LeaseRequest::List) {
                status.daemons = h;
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", report::status(&status, now_us()));
            }
            Ok(())
        }
        Command::DeadLetters(cmd) => {
            let cfg = Config::load(&cli.config)?;
            let lib = plugins::load_backend(&cfg)?;
            let mut conn = plugins::open(&cfg, &lib)?;
            match cmd {
                DeadLetterCommand::List { json } => {
                    let letters = conn
                        .dead_letters(&DeadLetterQuery::All)
                        .context("dead letters")?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&letters)?);
                    } else {
                        print!("{}", report::dead_letters(&letters, now_us()));
                    }
                }
                DeadLetterCommand::Retry { ids } => {
                    check_ids(&mut conn, &ids)?;
                    let n = conn.update_dead_letters(&DeadLetterUpdate::RequestRetry(ids))?;
                    println!("{n} dead letter(s) marked for retry; their daemons redeliver them while running");
                }
                DeadLetterCommand::Drop { ids } => {
                    check_ids(&mut conn, &ids)?;
                    let n = conn.update_dead_letters(&DeadLetterUpdate::Delete(ids))?;
                    println!("{n} dead letter(s) dropped");
                }
            }
            Ok(())
        }
        Command::Bench(args) => {
            let cfg = Config::load(&cli.config)?;
            let report = bench::run(&cfg, &args)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", bench::render(&report));
            }
            Ok(())
        }
        Command::Plugin {
            command:
                PluginCommand::Check {
                    file,
                    handler_config,
                },
        } => plugin_check(&cli.config, &file, handler_config.as_deref()),
    }
}

/// Refuse the whole command if any id does not exist, so nothing is half-done.
fn check_ids(conn: &mut host::HostBackend, ids: &[i64]) -> Result<()> {
    let found = conn.dead_letters(&DeadLetterQuery::Ids(ids.to_vec()))?;
    let missing: Vec<String> = ids
        .iter()
        .filter(|id| !found.iter().any(|l| l.id == **id))
        .map(|id| id.to_string())
        .collect();
    if !missing.is_empty() {
        anyhow::bail!(
            "no dead letter with id {}; nothing changed (see `epidemic dead-letters list`)",
            missing.join(", ")
        );
    }
    Ok(())
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

fn connect_and_plan(
    cfg: &Config,
) -> Result<(host::HostBackend, Vec<epidemic_plugin_sdk::backend::Watch>)> {
    let lib = plugins::load_backend(cfg)?;
    let mut handlers = plugins::load_handlers(cfg, &cfg.daemon_name()?)?;
    let mut conn = plugins::open(cfg, &lib)?;
    let watches = plugins::resolve_names(cfg, &mut conn, &mut handlers).context("resolve names")?;
    Ok((conn, watches))
}

fn plugin_check(
    config_path: &std::path::Path,
    file: &std::path::Path,
    handler_config: Option<&str>,
) -> Result<()> {
    let lib = host::load(file)?;
    println!("file:    {}", lib.path.display());
    println!("kind:    {}", lib.kind_name());
    println!("name:    {}", lib.name);
    println!("version: {}", lib.version);
    println!(
        "sdk:     {} (plugin ABI {}; this epidemic: SDK {}, ABI {})",
        lib.sdk_version,
        lib.abi_version,
        epidemic_plugin_sdk::SDK_VERSION,
        epidemic_plugin_sdk::abi::ABI_VERSION
    );
    if lib.expect_backend().is_ok() {
        println!("schemes: {}", lib.url_schemes.join(", "));
        return Ok(());
    }
    let config: serde_json::Value = match handler_config {
        Some(json) => serde_json::from_str(json).context("--handler-config is not valid JSON")?,
        None => matching_handler_config(config_path, file).unwrap_or_else(|| serde_json::json!({})),
    };
    match lib
        .new_handler(&config, "plugin-check", &lib.name)
        .and_then(|h| h.subscriptions())
    {
        Ok(subs) => {
            println!("subscriptions:");
            for s in subs {
                println!("  {} ({}) ops: {}", s.table, s.columns.join(", "), s.ops);
            }
        }
        Err(e) => println!(
            "subscriptions: unknown without a valid config ({e}); pass --handler-config JSON"
        ),
    }
    Ok(())
}

/// The `[handler.config]` of a handler in the config file that uses `file`, if any.
fn matching_handler_config(
    config_path: &std::path::Path,
    file: &std::path::Path,
) -> Option<serde_json::Value> {
    let cfg = Config::load(config_path).ok()?;
    let want = std::fs::canonicalize(file).ok()?;
    cfg.handlers.iter().find_map(|h| {
        let p = plugins::resolve(&cfg, &h.plugin).ok()?;
        (std::fs::canonicalize(p).ok()? == want).then(|| h.config.clone())
    })
}
