//! Plain-text tables for `status` and `dead-letters list`.

use std::fmt::Write;

use epidemic_plugin_sdk::backend::{BackfillState, DeadLetter, Status};

/// Columns padded to their widest cell, two spaces apart.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: Vec<String>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            let _ = write!(l, "{c:<w$}  ", w = widths[i]);
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut out, header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(&mut out, r.clone());
    }
    out
}

fn ago(now_us: i64, then_us: i64) -> String {
    if then_us <= 0 {
        return "-".into();
    }
    let secs = ((now_us - then_us).max(0) / 1_000_000) as u64;
    format!(
        "{} ago",
        humantime::format_duration(std::time::Duration::from_secs(secs))
    )
}

pub fn status(s: &Status, now_us: i64) -> String {
    let mut out = format!("backend: {}\n\n", s.backend);
    if s.consumers.is_empty() && s.tables.is_empty() {
        out.push_str("nothing installed (run `epidemic install` or `epidemic run`)\n");
        return out;
    }
    let rows: Vec<Vec<String>> = s
        .consumers
        .iter()
        .map(|c| {
            vec![
                format!("{}/{}", c.daemon, c.handler),
                c.position.clone(),
                c.backlog.to_string(),
                c.oldest_pending_age_s
                    .map_or("-".into(), |a| format!("{a:.1}s")),
                c.dead_letters.to_string(),
                ago(now_us, c.last_seen_us),
                if c.evicted {
                    "EVICTED".into()
                } else {
                    "live".into()
                },
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "CONSUMER",
            "POSITION",
            "BACKLOG",
            "OLDEST",
            "DEAD",
            "LAST SEEN",
            "STATE",
        ],
        &rows,
    ));
    out.push('\n');
    let rows: Vec<Vec<String>> = s
        .tables
        .iter()
        .map(|t| {
            let triggers: Vec<String> = t
                .triggers
                .iter()
                .map(|(n, ok)| format!("{}{}", if *ok { "" } else { "MISSING " }, n))
                .collect();
            vec![
                t.table.clone(),
                t.log_rows.to_string(),
                t.columns.join(","),
                if t.triggers.iter().all(|(_, ok)| *ok) {
                    "ok".into()
                } else {
                    triggers.join(" ")
                },
            ]
        })
        .collect();
    out.push_str(&table(&["TABLE", "LOG ROWS", "COLUMNS", "TRIGGERS"], &rows));
    let problems: Vec<&String> = s.tables.iter().flat_map(|t| &t.problems).collect();
    if !problems.is_empty() {
        out.push_str("\nproblems:\n");
        for p in problems {
            let _ = writeln!(out, "  - {p}");
        }
    }
    if !s.daemons.is_empty() {
        let rows: Vec<Vec<String>> = s
            .daemons
            .iter()
            .map(|d| {
                vec![
                    d.daemon.clone(),
                    d.holder.clone(),
                    if d.expires_in_ms >= 0 {
                        format!(
                            "running (lease for {:.1}s)",
                            d.expires_in_ms as f64 / 1000.0
                        )
                    } else {
                        format!(
                            "not running (lease expired {:.1}s ago)",
                            -d.expires_in_ms as f64 / 1000.0
                        )
                    },
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&table(&["DAEMON", "HELD BY", "STATE"], &rows));
    }
    if !s.backfills.is_empty() {
        let rows: Vec<Vec<String>> = s
            .backfills
            .iter()
            .map(|b| {
                let rate = crate::backfill_cmd::rate_and_eta(b);
                vec![
                    format!("{}/{}", b.daemon, b.handler),
                    b.table.clone(),
                    match b.state {
                        BackfillState::Requested => "requested".into(),
                        BackfillState::Running => "running".into(),
                        BackfillState::Done => "done".into(),
                    },
                    b.rows_done.to_string(),
                    b.rows_estimate.map_or("?".into(), |t| format!("~{t}")),
                    rate.map_or("-".into(), |(r, _)| format!("{r:.0}/s")),
                    rate.and_then(|(_, eta)| eta)
                        .map_or("-".into(), |e| humantime::format_duration(e).to_string()),
                    ago(now_us, b.updated_at_us.max(b.requested_at_us)),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&table(
            &[
                "BACKFILL", "TABLE", "STATE", "ROWS", "TOTAL", "RATE", "ETA", "UPDATED",
            ],
            &rows,
        ));
    }
    if !s.warnings.is_empty() {
        out.push_str("\nwarnings:\n");
        for w in &s.warnings {
            let _ = writeln!(out, "  - {w}");
        }
    }
    out
}

/// A monitoring plugin's verdict (the Nagios plugin convention, which Icinga, Sensu and
/// others share).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CheckState {
    Ok,
    Warning,
    Critical,
    Unknown,
}

impl CheckState {
    pub fn code(self) -> u8 {
        match self {
            CheckState::Ok => 0,
            CheckState::Warning => 1,
            CheckState::Critical => 2,
            CheckState::Unknown => 3,
        }
    }

    fn label(self) -> &'static str {
        match self {
            CheckState::Ok => "OK",
            CheckState::Warning => "WARNING",
            CheckState::Critical => "CRITICAL",
            CheckState::Unknown => "UNKNOWN",
        }
    }
}

/// `status --check`: CRITICAL when a consumer is evicted, stalled (its oldest pending
/// change or its last sign of life older than `stall_after`) or has dead letters, or a
/// watched table has a problem; WARNING when status has warnings; one line saying why.
pub fn check(
    s: &Status,
    now_us: i64,
    stall_after: std::time::Duration,
    daemon: Option<&str>,
) -> (CheckState, String) {
    let mut critical = Vec::new();
    let consumers: Vec<_> = s
        .consumers
        .iter()
        .filter(|c| daemon.is_none_or(|d| c.daemon == d))
        .collect();
    if let Some(d) = daemon {
        if consumers.is_empty() {
            critical.push(format!("daemon {d} has no consumers"));
        }
    }
    let limit = stall_after.as_secs_f64();
    for c in &consumers {
        let name = format!("{}/{}", c.daemon, c.handler);
        if c.evicted {
            critical.push(format!("{name} evicted"));
            continue;
        }
        if c.dead_letters > 0 {
            critical.push(format!("{name} has {} dead letter(s)", c.dead_letters));
        }
        match c.oldest_pending_age_s {
            Some(age) if age > limit => critical.push(format!(
                "{name} stalled: oldest pending change {age:.0}s old"
            )),
            _ => {
                let silent = (now_us - c.last_seen_us) as f64 / 1e6;
                if c.last_seen_us > 0 && silent > limit {
                    critical.push(format!("{name} stalled: last seen {silent:.0}s ago"));
                }
            }
        }
    }
    critical.extend(s.tables.iter().flat_map(|t| t.problems.iter().cloned()));
    let (state, reasons) = if !critical.is_empty() {
        (CheckState::Critical, critical)
    } else if !s.warnings.is_empty() {
        (CheckState::Warning, s.warnings.clone())
    } else {
        (
            CheckState::Ok,
            vec![format!(
                "{} consumer(s), backlog {}",
                consumers.len(),
                consumers.iter().map(|c| c.backlog).sum::<i64>()
            )],
        )
    };
    (
        state,
        format!("EPIDEMIC {}: {}", state.label(), reasons.join("; ")),
    )
}

pub fn dead_letters(letters: &[DeadLetter], now_us: i64) -> String {
    if letters.is_empty() {
        return "no dead letters\n".into();
    }
    let rows: Vec<Vec<String>> = letters
        .iter()
        .map(|l| {
            let mut err = l.error.replace('\n', " ");
            if err.chars().count() > 80 {
                err = err.chars().take(77).collect::<String>() + "...";
            }
            vec![
                l.id.to_string(),
                format!("{}/{}", l.daemon, l.handler),
                format!("{} {} #{}", l.op, l.table, l.change_id),
                l.attempts.to_string(),
                ago(now_us, l.failed_at_us),
                if l.retry_requested {
                    "retry requested".into()
                } else {
                    String::new()
                },
                err,
            ]
        })
        .collect();
    table(
        &[
            "ID", "CONSUMER", "CHANGE", "ATTEMPTS", "FAILED", "STATE", "ERROR",
        ],
        &rows,
    )
}
