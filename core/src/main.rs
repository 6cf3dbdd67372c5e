//! `epidemic`: the host. Reads the config, loads the backend library its database URL
//! asks for and the handler libraries of its `[[handler]]` entries, installs the capture
//! triggers and dispatches every captured change to the handlers that asked for it.
//!
//! The host names no database and links no database client: everything database-specific
//! is in the backend library, reached only through the plugin SDK.

mod backfill;
mod backfill_cmd;
mod backoff;
mod bench;
mod config;
mod daemon;
mod dispatch;
mod exit;
mod filter;
mod lease;
mod metrics;
mod plugins;
mod report;
mod secrets;
mod wait_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use epidemic_plugin_host as host;
use epidemic_plugin_sdk::backend::{
    BackfillRequest, DeadLetterQuery, DeadLetterUpdate, LeaseRequest, LeaseState, StartFrom,
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
        /// Monitoring-plugin mode: print one line and exit 0 (OK), 1 (WARNING: status has
        /// warnings), 2 (CRITICAL: a consumer evicted or stalled, dead letters, schema
        /// problems) or 3 (UNKNOWN: the status could not be read).
        #[arg(long, conflicts_with = "json")]
        check: bool,
        /// With --check: a consumer is stalled when its oldest pending change, or its last
        /// sign of life, is older than this.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration, requires = "check")]
        stall_after: std::time::Duration,
        /// With --check: look only at this daemon's consumers (default: every daemon's).
        #[arg(long, requires = "check")]
        daemon: Option<String>,
    },
    /// Write the man pages (DIR/man/*.1) and shell completions (DIR/completions/) for the
    /// package, generated from this command line's definition so they never drift.
    #[command(hide = true)]
    GenerateAssets { dir: PathBuf },
    /// Check the config, the plugins and the database connection, changing nothing; exits
    /// 0, 78 (configuration) or 69 (database unavailable). For `ExecStartPre=`.
    Check,
    /// Give a handler every existing row of its tables (as snapshot rows, interleaved with
    /// live changes, never older than a change it already had), carried out by its
    /// daemon while it runs; shows the progress until it is done.
    Backfill(backfill_cmd::BackfillArgs),
    /// Wait until every consumer (or those named) has handled every change committed
    /// before this call: a barrier for a front end that must not answer before the mail
    /// servers acted. Exits 0, or 1 naming the consumers still behind at the timeout.
    Wait(wait_cmd::WaitArgs),
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
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not errors.
            return if e.use_stderr() {
                ExitCode::from(exit::EX_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
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
    let nagios = matches!(cli.command, Command::Status { check: true, .. });
    match dispatch(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // One line on stderr: the chain of contexts, outermost first.
            let msg: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            if nagios {
                // Monitoring plugins report their own failure as UNKNOWN, on stdout.
                println!("EPIDEMIC UNKNOWN: {}", msg.join(": "));
                return ExitCode::from(report::CheckState::Unknown.code());
            }
            eprintln!("epidemic: error: {}", msg.join(": "));
            if verbose {
                if let Some(detail) = e.downcast_ref::<host::LoadError>().and_then(|l| l.detail()) {
                    eprintln!("{detail}");
                }
            }
            ExitCode::from(exit::code(&e))
        }
    }
}

/// Read the config and move into its directory (see [`Config::enter_dir`]).
fn load_config(path: &std::path::Path) -> Result<Config> {
    let cfg = Config::load(path)?;
    cfg.enter_dir()?;
    Ok(cfg)
}

/// Runs the command; `Ok` carries the exit status (non-zero when what a command
/// reports is broken).
fn dispatch(cli: Cli) -> Result<u8> {
    match cli.command {
        Command::Run { from_oldest } => {
            let stop = daemon::install_signal_handlers()?;
            let cfg = load_config(&cli.config)?;
            let start = if from_oldest {
                StartFrom::Oldest
            } else {
                StartFrom::Now
            };
            daemon::run(cfg, daemon::RunOptions { start }, stop)?;
            Ok(0)
        }
        Command::Install => {
            let cfg = load_config(&cli.config)?;
            let (mut conn, watches) = connect_and_plan(&cfg)?;
            let stmts = conn.install(&watches).context("install")?;
            let tables: Vec<&str> = watches.iter().map(|w| w.table.as_str()).collect();
            println!(
                "installed: {} statements applied; watching {}",
                stmts.len(),
                tables.join(", ")
            );
            Ok(0)
        }
        Command::Uninstall => {
            let cfg = load_config(&cli.config)?;
            let lib = plugins::load_backend(&cfg)?;
            let mut conn = plugins::open(&cfg, &lib)?;
            let stmts = conn.uninstall().context("uninstall")?;
            if stmts.is_empty() {
                println!("nothing to uninstall");
            } else {
                println!("uninstalled: {} statements applied", stmts.len());
            }
            Ok(0)
        }
        Command::Sql { uninstall } => {
            let cfg = load_config(&cli.config)?;
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
            Ok(0)
        }
        Command::Status {
            json,
            check,
            stall_after,
            daemon,
        } => {
            let cfg = load_config(&cli.config)?;
            let lib = plugins::load_backend(&cfg)?;
            let mut conn = plugins::open(&cfg, &lib)?;
            let mut status = conn.status().context("status")?;
            if let Ok(LeaseState::Holders(h)) = conn.lease(&LeaseRequest::List) {
                status.daemons = h;
            }
            // A backend that keeps no backfills simply shows none.
            if let Ok(reply) = conn.backfills(&BackfillRequest::List) {
                status.backfills = reply.backfills;
            }
            if check {
                let (state, line) =
                    report::check(&status, now_us(), stall_after, daemon.as_deref());
                println!("{line}");
                return Ok(state.code());
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", report::status(&status, now_us()));
            }
            Ok(0)
        }
        Command::Check => check(&load_config(&cli.config)?),
        Command::GenerateAssets { dir } => {
            generate_assets(&dir)?;
            Ok(0)
        }
        Command::DeadLetters(cmd) => {
            let cfg = load_config(&cli.config)?;
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
            Ok(0)
        }
        Command::Backfill(args) => backfill_cmd::run(&load_config(&cli.config)?, &args),
        Command::Wait(args) => wait_cmd::run(&load_config(&cli.config)?, &args),
        Command::Bench(args) => {
            let cfg = load_config(&cli.config)?;
            let report = bench::run(&cfg, &args)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", bench::render(&report));
            }
            Ok(0)
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
        return Err(anyhow::Error::new(exit::DataError(format!(
            "no dead letter with id {}; nothing changed (see `epidemic dead-letters list`)",
            missing.join(", ")
        ))));
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
    plugins::check_filters(cfg, &handlers, &watches)?;
    Ok((conn, watches))
}

/// Man pages (one per subcommand, `epidemic-run.1`…) by clap_mangen, completions for
/// bash, zsh and fish by clap_complete.
fn generate_assets(dir: &std::path::Path) -> Result<()> {
    use clap::CommandFactory;
    let man = dir.join("man");
    let completions = dir.join("completions");
    for d in [&man, &completions] {
        std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
    }
    clap_mangen::generate_to(Cli::command(), &man)
        .with_context(|| format!("write man pages to {}", man.display()))?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut Cli::command(), "epidemic", &completions)
            .with_context(|| format!("write {shell} completions to {}", completions.display()))?;
    }
    Ok(())
}

/// `epidemic check`: everything `run` needs before it changes anything, read-only.
fn check(cfg: &Config) -> Result<u8> {
    println!("config:   {} ok", cfg.path.display());
    let daemon = cfg.daemon_name()?;
    println!("daemon:   {daemon}");
    let lib = plugins::load_backend(cfg)?;
    println!(
        "backend:  {} {} ({})",
        lib.name,
        lib.version,
        lib.path.display()
    );
    let mut handlers = plugins::load_handlers(cfg, &cfg.daemon_name()?)?;
    for h in &handlers {
        println!(
            "handler:  {} ({} {}) watches {}",
            h.config.name,
            h.library.name,
            h.library.version,
            h.tables().join(", ")
        );
    }
    let mut conn = plugins::open(cfg, &lib)?;
    println!(
        "database: {} reachable",
        epidemic_plugin_sdk::redact_url(&cfg.database.url)
    );
    let watches = plugins::resolve_names(cfg, &mut conn, &mut handlers)
        .map_err(|e| anyhow::Error::new(e).context("watched tables"))?;
    plugins::check_filters(cfg, &handlers, &watches)?;
    // Planning checks every watched table and column, as `sql` does.
    conn.plan_install(&watches)
        .map_err(|e| anyhow::Error::new(e).context("plan install"))?;
    // What install would still do, from status (the install script itself is
    // idempotent and always complete, so its length says nothing).
    let status = conn
        .status()
        .map_err(|e| anyhow::Error::new(e).context("status"))?;
    let pending: Vec<&str> = watches
        .iter()
        .filter(|w| {
            !status.tables.iter().any(|t| {
                t.table == w.table
                    && t.triggers.iter().all(|(_, ok)| *ok)
                    && w.columns.iter().all(|c| t.columns.contains(c))
            })
        })
        .map(|w| w.table.as_str())
        .collect();
    if pending.is_empty() {
        println!("install:  up to date");
    } else {
        println!(
            "install:  needed for {} (`run` or `install` does it; `epidemic sql` shows the SQL)",
            pending.join(", ")
        );
    }
    println!("ok");
    Ok(0)
}

fn plugin_check(
    config_path: &std::path::Path,
    file: &std::path::Path,
    handler_config: Option<&str>,
) -> Result<u8> {
    // Absolute before a --config's handler config moves into the config's directory.
    let file = &std::fs::canonicalize(file).unwrap_or_else(|_| file.to_owned());
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
        return Ok(0);
    }
    // A config given (on the command line, or by a [[handler]] of --config using this
    // file) must work: a refusal is an error. Without one, an empty config is tried
    // only to show subscriptions.
    let (config, given) = match handler_config {
        Some(json) => (
            serde_json::from_str(json)
                .map_err(|e| exit::config(format!("--handler-config is not valid JSON: {e}")))?,
            Some("--handler-config".to_owned()),
        ),
        None => match matching_handler_config(config_path, file)? {
            Some((name, c)) => (
                c,
                Some(format!(
                    "{}: [handler.config] of handler {name:?}",
                    config_path.display()
                )),
            ),
            None => (serde_json::json!({}), None),
        },
    };
    match lib
        .new_handler(&config, "plugin-check", &lib.name)
        .and_then(|h| h.subscriptions())
    {
        Ok(subs) if subs.is_empty() || subs.iter().any(|s| s.columns.is_empty()) => {
            Err(exit::config(format!(
                "plugin {}: subscribes to nothing, or to a table without columns",
                lib.name
            )))
        }
        Ok(subs) => {
            println!("subscriptions:");
            for s in subs {
                println!("  {} ({}) ops: {}", s.table, s.columns.join(", "), s.ops);
            }
            Ok(0)
        }
        Err(e) => match given {
            Some(source) => Err(exit::config(format!(
                "{source}: plugin {} refuses it: {e}",
                lib.name
            ))),
            None => {
                println!(
                    "subscriptions: unknown without a valid config ({e}); pass --handler-config JSON"
                );
                Ok(0)
            }
        },
    }
}

/// The name and `[handler.config]` of the handler in the config file that uses `file`,
/// if the config file exists and one does. A config file that exists but cannot be
/// read is an error: its refusal is what the user asked about.
fn matching_handler_config(
    config_path: &std::path::Path,
    file: &std::path::Path,
) -> Result<Option<(String, serde_json::Value)>> {
    if !config_path.exists() {
        return Ok(None);
    }
    let want = std::fs::canonicalize(file)?;
    let cfg = load_config(config_path)?;
    Ok(cfg.handlers.iter().find_map(|h| {
        let p = plugins::resolve(&cfg, &h.plugin).ok()?;
        (std::fs::canonicalize(p).ok()? == want).then(|| (h.name.clone(), h.config.clone()))
    }))
}
