//! Maildir trees on disk, and what a mail users table says they should be: for the
//! scenarios that check the maildir plugin converged (filters, backfills).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Maildir path → the first line of its `maildirsize` (the quota, `<bytes>S`), if any.
pub type Tree = BTreeMap<PathBuf, Option<String>>;

/// What rows of (username, quota) say the tree under `base` should hold.
pub fn expected(rows: &[(String, Option<i64>)], base: &Path) -> Tree {
    rows.iter()
        .map(|(user, quota)| {
            let dir = match user.split_once('@') {
                Some((local, domain)) => base.join(domain).join(local),
                None => base.join(user),
            };
            (dir, quota.map(|q| format!("{q}S")))
        })
        .collect()
}

/// What is on disk under `base`: every directory holding `cur`, `new` and `tmp`, with its
/// quota line; dot directories (the archive) are left out.
pub fn on_disk(base: &Path) -> Tree {
    let mut out = BTreeMap::new();
    let mut stack = vec![base.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if !p.is_dir()
                || p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            {
                continue;
            }
            if ["cur", "new", "tmp"].iter().all(|s| p.join(s).is_dir()) {
                let quota = std::fs::read_to_string(p.join("maildirsize"))
                    .ok()
                    .and_then(|t| t.lines().next().map(str::to_owned));
                out.insert(p, quota);
            } else {
                stack.push(p);
            }
        }
    }
    out
}

/// The differences between two trees, for an assertion message.
pub fn diff(want: &Tree, got: &Tree) -> String {
    let mut out = String::new();
    for (p, q) in want {
        match got.get(p) {
            None => out.push_str(&format!("missing: {} ({q:?})\n", p.display())),
            Some(g) if g != q => out.push_str(&format!(
                "quota of {}: want {q:?}, got {g:?}\n",
                p.display()
            )),
            _ => {}
        }
    }
    for p in got.keys().filter(|p| !want.contains_key(*p)) {
        out.push_str(&format!("extra: {}\n", p.display()));
    }
    out
}
