//! Turning rows of the fetch statement into [`Change`]s: how each captured column's value
//! is read back ([`ValueKind`]), and what a change carries besides its values
//! ([`PgLogTable`]): its table as the consumer spelled it, the schema, the key, the
//! stable id, the transaction and the batch's commit-order token.

use std::sync::Arc;

use epidemic_plugin_sdk::backend::kit;
use epidemic_plugin_sdk::{Change, Op, Value};
use postgres::types::Type;
use postgres::Row;

use crate::ident::Ident;
use crate::reader::statement::col;

/// How one captured column is read back.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ValueKind {
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    Bytes,
    Text,
    /// Any other type: cast to text in SQL. `numeric` is among them, so that no
    /// precision is lost to a float.
    CastToText,
}

impl ValueKind {
    pub fn of(type_oid: u32) -> ValueKind {
        match Type::from_oid(type_oid) {
            Some(Type::INT2) => ValueKind::Int2,
            Some(Type::INT4) => ValueKind::Int4,
            Some(Type::INT8) => ValueKind::Int8,
            Some(Type::FLOAT4) => ValueKind::Float4,
            Some(Type::FLOAT8) => ValueKind::Float8,
            Some(Type::BYTEA) => ValueKind::Bytes,
            Some(Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME) => ValueKind::Text,
            _ => ValueKind::CastToText,
        }
    }

    /// The SQL type of what [`ValueKind::select`] yields for a column of `type_oid`: the
    /// type of the NULL that stands for the column in rows of another log table.
    pub fn sql_type(self, type_oid: u32) -> &'static str {
        match self {
            ValueKind::Int2 => "pg_catalog.int2",
            ValueKind::Int4 => "pg_catalog.int4",
            ValueKind::Int8 => "pg_catalog.int8",
            ValueKind::Float4 => "pg_catalog.float4",
            ValueKind::Float8 => "pg_catalog.float8",
            ValueKind::Bytes => "pg_catalog.bytea",
            ValueKind::Text => match Type::from_oid(type_oid) {
                Some(Type::VARCHAR) => "pg_catalog.varchar",
                Some(Type::BPCHAR) => "pg_catalog.bpchar",
                Some(Type::NAME) => "pg_catalog.name",
                _ => "pg_catalog.text",
            },
            ValueKind::CastToText => "pg_catalog.text",
        }
    }

    pub fn select(self, column: &Ident) -> String {
        match self {
            ValueKind::CastToText => format!("l.{}::text", column.quoted()),
            _ => format!("l.{}", column.quoted()),
        }
    }

    fn read(self, row: &Row, i: usize) -> Result<Value, postgres::Error> {
        Ok(match self {
            ValueKind::Int2 => row.try_get::<_, Option<i16>>(i)?.map(i64::from).into(),
            ValueKind::Int4 => row.try_get::<_, Option<i32>>(i)?.map(i64::from).into(),
            ValueKind::Int8 => row.try_get::<_, Option<i64>>(i)?.into(),
            ValueKind::Float4 => row.try_get::<_, Option<f32>>(i)?.map(f64::from).into(),
            ValueKind::Float8 => row.try_get::<_, Option<f64>>(i)?.into(),
            ValueKind::Bytes => row.try_get::<_, Option<Vec<u8>>>(i)?.into(),
            ValueKind::Text | ValueKind::CastToText => row.try_get::<_, Option<String>>(i)?.into(),
        })
    }
}

/// How to decode the rows of one log table in the fetch statement's result.
pub(crate) struct PgLogTable {
    /// The table's name as the consumer spelled it: what [`Change::table`] carries, so it
    /// matches the handler's subscription.
    pub table: String,
    /// The schema the table is in (`public` included).
    pub schema: String,
    /// The log's identity: the first half of every stable id.
    pub identity: String,
    /// The captured columns, key columns included.
    pub columns: Arc<[String]>,
    pub key_columns: Arc<[String]>,
    /// Where each key column is in `columns`.
    pub key_index: Vec<usize>,
    pub kinds: Vec<ValueKind>,
    /// Result column of this table's first old value; the new value follows it, then
    /// the next column's pair.
    pub first: usize,
}

impl PgLogTable {
    /// The change in `row`, one of the batch whose commit-order token is `commit_seq`.
    pub fn change(&self, row: &Row, id: i64, commit_seq: i64) -> Result<Change, postgres::Error> {
        let op: i8 = row.try_get(col::OP)?;
        let changed_at_us: i64 = row.try_get(col::CHANGED_AT_US)?;
        let txid: i64 = row.try_get(col::TXID)?;
        let values = |first: usize| -> Result<Vec<Value>, postgres::Error> {
            self.kinds
                .iter()
                .enumerate()
                .map(|(i, k)| k.read(row, first + 2 * i))
                .collect()
        };
        let (op, old, new) = match op as u8 {
            b'I' => (Op::Insert, None, Some(values(self.first + 1)?)),
            b'U' => (
                Op::Update,
                Some(values(self.first)?),
                Some(values(self.first + 1)?),
            ),
            // The triggers write only I, U and D.
            _ => (Op::Delete, Some(values(self.first)?), None),
        };
        let key_of = |values: &Option<Vec<Value>>| {
            values.as_ref().map(|v| {
                self.key_index
                    .iter()
                    .map(|&i| v.get(i).cloned().unwrap_or(Value::Null))
                    .collect()
            })
        };
        let (key, old_key) = kit::row_key(op, key_of(&old), key_of(&new));
        Ok(Change {
            id,
            stable_id: kit::stable_id(&self.identity, id),
            schema: Some(self.schema.clone()),
            table: self.table.clone(),
            op,
            key_columns: self.key_columns.clone(),
            key,
            old_key,
            columns: self.columns.clone(),
            old,
            new,
            changed_at_us,
            txid: Some(txid),
            commit_seq: Some(commit_seq),
            ..Change::default()
        })
    }
}
