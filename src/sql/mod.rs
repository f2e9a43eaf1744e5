//! SQL text helpers at the bottom of the dependency order: identifier quoting, table names as
//! PostgreSQL resolves them, the one SQL tokenizer ([`lex`]) and the `:start`/`:end` template
//! built on it. Pure string work: nothing here touches the database, a job file or
//! any other module of the crate.

pub mod lex;
mod template;

pub use template::SqlTemplate;

/// The key name that walks the heap by pages instead of an index.
pub const CTID: &str = "ctid";

/// A table name as PostgreSQL resolves it: optional schema, unquoted parts folded to lower case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    pub schema: Option<String>,
    pub name: String,
}

impl TableName {
    /// Parses `orders`, `app.orders`, `"Odd Name"`, `app."Orders"`.
    pub fn parse(text: &str) -> std::result::Result<TableName, String> {
        let mut parts = Vec::new();
        let mut chars = text.trim().chars().peekable();
        loop {
            let mut part = String::new();
            if chars.peek() == Some(&'"') {
                chars.next();
                loop {
                    match chars.next() {
                        Some('"') if chars.peek() == Some(&'"') => {
                            chars.next();
                            part.push('"');
                        }
                        Some('"') => break,
                        Some(c) => part.push(c),
                        None => return Err("unterminated quoted identifier".into()),
                    }
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c.is_alphanumeric() || c == '_' || c == '$' {
                        part.push(c.to_ascii_lowercase());
                        chars.next();
                    } else {
                        break;
                    }
                }
                if part.is_empty() || part.starts_with(|c: char| c.is_ascii_digit() || c == '$') {
                    return Err("expected an identifier such as `orders` or `app.orders`".into());
                }
            }
            parts.push(part);
            match chars.next() {
                None => break,
                Some('.') => continue,
                Some(c) => return Err(format!("unexpected character `{c}`")),
            }
        }
        match parts.len() {
            1 => Ok(TableName {
                schema: None,
                name: parts.remove(0),
            }),
            2 => {
                let name = parts.remove(1);
                Ok(TableName {
                    schema: Some(parts.remove(0)),
                    name,
                })
            }
            _ => Err("expected `table` or `schema.table`".into()),
        }
    }

    /// The name quoted for use in SQL.
    pub fn quoted(&self) -> String {
        match &self.schema {
            Some(s) => format!("{}.{}", quote_ident(s), quote_ident(&self.name)),
            None => quote_ident(&self.name),
        }
    }
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.schema {
            Some(s) => write!(f, "{s}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names() {
        assert_eq!(
            TableName::parse("App.Orders").unwrap().to_string(),
            "app.orders"
        );
        assert_eq!(
            TableName::parse("\"Odd \"\"x\"\"\"").unwrap().name,
            "Odd \"x\""
        );
        assert_eq!(TableName::parse("a.\"B\"").unwrap().quoted(), "\"a\".\"B\"");
        assert!(TableName::parse("a.b.c").is_err());
        assert!(TableName::parse("drop table x").is_err());
        assert!(TableName::parse("").is_err());
    }
}
