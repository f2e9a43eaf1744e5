//! The job file exactly as written: a serde struct that rejects unknown keys and keeps the span of
//! every value, so that validation errors can name the file, the line and the key.

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJob {
    pub description: Option<Spanned<String>>,
    pub table: Spanned<String>,
    pub key: Spanned<Vec<Spanned<String>>>,
    pub sql: Spanned<String>,
    pub chunk_rows: Option<Spanned<i64>>,
    pub verify: Option<Spanned<String>>,
    pub lock_timeout: Option<Spanned<String>>,
    pub statement_timeout: Option<Spanned<String>>,
    pub on_error: Option<Spanned<String>>,
}
