//! A database of a test's own on any backend, as end-to-end scenarios see it: the URL for
//! the daemons, and a connection of the test's own that stands in for the application
//! (writes, and reads to compare with what handlers did). The daemons are processes of
//! their own, so the test may use its own client library freely.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::mysql::MySqlServer;
use crate::pg::PgServer;

/// One database on one backend.
pub trait SqlDb: Send + Sync {
    /// The backend's name, for messages (`sqlite`, `postgres`, `mysql`).
    fn backend(&self) -> &'static str;
    /// `database.url` for the daemons.
    fn url(&self) -> String;
    /// Extra `[database]` lines for the daemons.
    fn options(&self) -> String {
        String::new()
    }
    /// Run statements in one transaction; an error (a deadlock, a duplicate key) rolls
    /// it back and is returned as text.
    fn try_exec(&self, statements: &[String]) -> Result<(), String>;
    /// Run statements in one transaction, panicking on an error.
    fn exec(&self, statements: &[String]) {
        if let Err(e) = self.try_exec(statements) {
            panic!("{statements:?}: {e}");
        }
    }
    /// The rows of a query, every value as text (`None` for NULL).
    fn query(&self, sql: &str) -> Vec<Vec<Option<String>>>;
    /// Column types of a `mail_users`-style table in this dialect: (text, bigint).
    fn types(&self) -> (&'static str, &'static str);
}

fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A SQLite file in a temp dir (WAL mode).
pub struct SqliteDb {
    _dir: tempfile::TempDir,
    pub path: std::path::PathBuf,
}

impl SqliteDb {
    pub fn new() -> SqliteDb {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = crate::sqlite::create_db(dir.path(), "db", "");
        SqliteDb { _dir: dir, path }
    }
}

impl Default for SqliteDb {
    fn default() -> Self {
        Self::new()
    }
}

impl SqlDb for SqliteDb {
    fn backend(&self) -> &'static str {
        "sqlite"
    }
    fn url(&self) -> String {
        crate::sqlite::url(&self.path)
    }
    fn try_exec(&self, statements: &[String]) -> Result<(), String> {
        let mut conn = crate::sqlite::connect(&self.path);
        let tx = conn.transaction().map_err(|e| e.to_string())?;
        for s in statements {
            tx.execute_batch(s).map_err(|e| format!("{s}: {e}"))?;
        }
        tx.commit().map_err(|e| e.to_string())
    }
    fn query(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        let conn = crate::sqlite::connect(&self.path);
        let mut stmt = conn.prepare(sql).expect("prepare");
        let n = stmt.column_count();
        stmt.query_map([], |r| {
            (0..n)
                .map(|i| {
                    let v: rusqlite::types::Value = r.get(i)?;
                    Ok(match v {
                        rusqlite::types::Value::Null => None,
                        rusqlite::types::Value::Integer(i) => Some(i.to_string()),
                        rusqlite::types::Value::Real(f) => Some(f.to_string()),
                        rusqlite::types::Value::Text(t) => Some(t),
                        rusqlite::types::Value::Blob(b) => {
                            Some(String::from_utf8_lossy(&b).into_owned())
                        }
                    })
                })
                .collect()
        })
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
    }
    fn types(&self) -> (&'static str, &'static str) {
        ("TEXT", "INTEGER")
    }
}

/// A database of its own on the binary's shared PostgreSQL server.
pub struct PgDb {
    name: String,
    url: String,
    pool: Mutex<Vec<postgres::Client>>,
}

impl PgDb {
    pub fn new() -> PgDb {
        let name = unique("scenario");
        let url = PgServer::shared().create_database(&name);
        PgDb {
            name,
            url,
            pool: Mutex::default(),
        }
    }

    fn client(&self) -> postgres::Client {
        let pooled = self.pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match pooled {
            Some(c) if !c.is_closed() => c,
            _ => PgServer::shared().client(&self.name),
        }
    }
}

impl Default for PgDb {
    fn default() -> Self {
        Self::new()
    }
}

impl SqlDb for PgDb {
    fn backend(&self) -> &'static str {
        "postgres"
    }
    fn url(&self) -> String {
        self.url.clone()
    }
    fn try_exec(&self, statements: &[String]) -> Result<(), String> {
        let mut client = self.client();
        let result = (|| {
            let mut tx = client.transaction()?;
            for s in statements {
                tx.batch_execute(s)?;
            }
            tx.commit()
        })();
        self.pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(client);
        result.map_err(|e| e.to_string())
    }
    fn query(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        let mut client = self.client();
        let rows = client.query(sql, &[]).expect("query");
        let out = rows
            .iter()
            .map(|r| (0..r.len()).map(|i| pg_text(r, i)).collect())
            .collect();
        self.pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(client);
        out
    }
    fn types(&self) -> (&'static str, &'static str) {
        ("text", "bigint")
    }
}

/// A column of a row as text: text and numbers as they are (cast anything else to text
/// in the query).
fn pg_text(r: &postgres::Row, i: usize) -> Option<String> {
    use postgres::types::Type;
    let t = r.columns()[i].type_().clone();
    match t {
        Type::INT8 => r.get::<_, Option<i64>>(i).map(|v| v.to_string()),
        Type::INT4 => r.get::<_, Option<i32>>(i).map(|v| v.to_string()),
        Type::INT2 => r.get::<_, Option<i16>>(i).map(|v| v.to_string()),
        Type::FLOAT8 => r.get::<_, Option<f64>>(i).map(|v| v.to_string()),
        Type::BOOL => r.get::<_, Option<bool>>(i).map(|v| v.to_string()),
        _ => r
            .try_get::<_, Option<String>>(i)
            .unwrap_or_else(|e| panic!("column {i} ({t}): cast it to text in the query: {e}")),
    }
}

/// A database of its own on the binary's shared MariaDB server.
pub struct MySqlDb {
    name: String,
    url: String,
    pool: Mutex<Vec<mysql::Conn>>,
}

impl MySqlDb {
    pub fn new() -> MySqlDb {
        let name = unique("scenario");
        let url = MySqlServer::shared().create_database(&name);
        MySqlDb {
            name,
            url,
            pool: Mutex::default(),
        }
    }

    fn conn(&self) -> mysql::Conn {
        let pooled = self.pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
        pooled.unwrap_or_else(|| MySqlServer::shared().conn(&self.name))
    }
}

impl Default for MySqlDb {
    fn default() -> Self {
        Self::new()
    }
}

impl SqlDb for MySqlDb {
    fn backend(&self) -> &'static str {
        "mysql"
    }
    fn url(&self) -> String {
        self.url.clone()
    }
    fn try_exec(&self, statements: &[String]) -> Result<(), String> {
        use mysql::prelude::Queryable;
        let mut conn = self.conn();
        let result = (|| {
            let mut tx = conn.start_transaction(mysql::TxOpts::default())?;
            for s in statements {
                tx.query_drop(s)?;
            }
            tx.commit()
        })();
        self.pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(conn);
        result.map_err(|e| e.to_string())
    }
    fn query(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        use mysql::prelude::Queryable;
        let mut conn = self.conn();
        let rows: Vec<mysql::Row> = conn.query(sql).expect("query");
        let out = rows
            .into_iter()
            .map(|r| {
                r.unwrap()
                    .into_iter()
                    .map(|v| match v {
                        mysql::Value::NULL => None,
                        mysql::Value::Bytes(b) => Some(String::from_utf8_lossy(&b).into_owned()),
                        mysql::Value::Int(i) => Some(i.to_string()),
                        mysql::Value::UInt(i) => Some(i.to_string()),
                        mysql::Value::Float(f) => Some(f.to_string()),
                        mysql::Value::Double(f) => Some(f.to_string()),
                        other => Some(format!("{other:?}")),
                    })
                    .collect()
            })
            .collect();
        self.pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(conn);
        out
    }
    fn types(&self) -> (&'static str, &'static str) {
        ("VARCHAR(200) CHARACTER SET utf8mb4", "BIGINT")
    }
}
