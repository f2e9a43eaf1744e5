//! One finishing step read offline: one statement, not a transaction command, its hash (a step
//! whose statement changed runs again), the table it works on and the index a concurrent build
//! names. Reads the statement's head with the one SQL tokenizer ([`crate::sql::lex`]); never
//! touches the database or the `finish_steps` rows, which are `super`'s.

use crate::error::{Error, Result};
use crate::sql::lex::{self, Kind, LexError};
use crate::sql::quote_ident;
use sha2::{Digest, Sha256};

/// One validated step.
pub(super) struct Step {
    pub(super) n: i32,
    pub(super) sql: String,
    pub(super) hash: String,
    /// The relation the statement works on, as its name's parts, when the statement says.
    pub(super) table: Option<Vec<String>>,
    /// Set for `CREATE INDEX CONCURRENTLY name …`, whose failure leaves an invalid index behind.
    pub(super) index: Option<IndexName>,
}

/// The name a concurrent index build gives its index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct IndexName {
    pub(super) schema: Option<String>,
    pub(super) name: String,
}

impl Step {
    pub(super) fn parse(job: &str, n: usize, total: usize, sql: &str) -> Result<Step> {
        let sql = sql.trim();
        let refuse = |why: &str| {
            Error::Usage(format!(
                "job {job}: finishing step {n}/{total} (`{}`) {why}",
                shorten(sql)
            ))
        };
        let toks = tokens(sql).map_err(|what| {
            refuse(&format!(
                "has {what}; close it, or fix the step in the job's `finish_sql`"
            ))
        })?;
        let words: Vec<&Tok> = toks.iter().filter(|t| **t != Tok::Semi).collect();
        if words.is_empty() {
            return Err(refuse(
                "is empty; remove it from the job's `finish_sql` or write the statement",
            ));
        }
        let first_semi = toks.iter().position(|t| *t == Tok::Semi);
        if first_semi.is_some_and(|i| toks[i..].iter().any(|t| *t != Tok::Semi)) {
            return Err(refuse(
                "holds more than one statement; put each statement in its own entry of the job's `finish_sql` (each runs on its own, outside any transaction)",
            ));
        }
        if let Tok::Word(w) = &toks[0] {
            let second = matches!(toks.get(1), Some(Tok::Word(t)) if t == "transaction");
            let control = matches!(
                w.as_str(),
                "begin" | "commit" | "end" | "rollback" | "abort" | "savepoint" | "release"
            ) || (w == "start" && second)
                || (w == "prepare" && second);
            if control {
                return Err(refuse(
                    "is a transaction command; finishing steps run one by one outside any transaction, so remove it from the job's `finish_sql`",
                ));
            }
        }
        let mut h = Sha256::new();
        h.update(sql.as_bytes());
        Ok(Step {
            n: n as i32,
            sql: sql.to_string(),
            hash: h.finalize().iter().map(|b| format!("{b:02x}")).collect(),
            table: relation_of(&toks),
            index: concurrent_index(&toks),
        })
    }
}
impl IndexName {
    pub(super) fn render(&self) -> String {
        match &self.schema {
            Some(s) => format!("{}.{}", quote_ident(s), quote_ident(&self.name)),
            None => quote_ident(&self.name),
        }
    }
}
/// A statement on one line, cut to a length that fits an error message.
pub(super) fn shorten(sql: &str) -> String {
    const MAX: usize = 60;
    let one_line = sql
        .trim()
        .trim_end_matches(';')
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    if one_line.chars().count() <= MAX {
        return one_line;
    }
    let cut: String = one_line.chars().take(MAX).collect();
    format!("{} …", cut.trim_end())
}

/// A token of SQL text: just enough to count statements and read the head of one.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    /// An unquoted identifier or keyword, folded to lower case as the server folds it.
    Word(String),
    /// A double-quoted identifier, unescaped, its case kept.
    Quoted(String),
    Semi,
    Dot,
    /// Anything else: literals, numbers, operators, parameters.
    Other,
}

/// Reads SQL into [`Tok`]s with the one SQL tokenizer, which skips comments and the contents of
/// quoted strings, so that a `;` inside them is not mistaken for the end of a statement. Errs on
/// unterminated text, naming what is left open.
fn tokens(sql: &str) -> Result<Vec<Tok>, &'static str> {
    let lexed = lex::tokenize(sql).map_err(|e| match e {
        LexError::UnterminatedString => "an unterminated quoted string",
        LexError::UnterminatedQuotedIdent => "an unterminated quoted identifier",
        LexError::UnterminatedComment => "an unterminated /* comment",
        LexError::UnterminatedDollarQuote(_) => "an unterminated dollar-quoted string",
    })?;
    Ok(lexed
        .iter()
        .map(|t| match t.kind {
            Kind::Word => Tok::Word(t.text(sql).to_ascii_lowercase()),
            Kind::QuotedIdent => Tok::Quoted(lex::unquote_ident(t.text(sql))),
            Kind::Punct(';') => Tok::Semi,
            Kind::Punct('.') => Tok::Dot,
            _ => Tok::Other,
        })
        .collect())
}

/// Reads the head of a statement token by token.
struct Cursor<'a> {
    toks: &'a [Tok],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn new(toks: &'a [Tok]) -> Cursor<'a> {
        Cursor { toks, at: 0 }
    }

    fn word(&mut self, w: &str) -> bool {
        let hit = matches!(self.toks.get(self.at), Some(Tok::Word(x)) if x == w);
        if hit {
            self.at += 1;
        }
        hit
    }

    fn words(&mut self, ws: &[&str]) -> bool {
        let save = self.at;
        if ws.iter().all(|w| self.word(w)) {
            return true;
        }
        self.at = save;
        false
    }

    /// An identifier other than the keyword `on` (reserved, so never an index name).
    fn ident(&mut self) -> Option<String> {
        let found = match self.toks.get(self.at)? {
            Tok::Word(w) if w != "on" => w.clone(),
            Tok::Quoted(q) => q.clone(),
            _ => return None,
        };
        self.at += 1;
        Some(found)
    }

    /// `a`, `a.b` or `a.b.c`, as its parts.
    fn qualified(&mut self) -> Option<Vec<String>> {
        let mut parts = vec![self.ident()?];
        while self.toks.get(self.at) == Some(&Tok::Dot) {
            self.at += 1;
            parts.push(self.ident()?);
        }
        Some(parts)
    }
}

/// A qualified name for SQL, every part quoted.
pub(super) fn render(parts: &[String]) -> String {
    parts
        .iter()
        .map(|p| quote_ident(p))
        .collect::<Vec<_>>()
        .join(".")
}

/// A qualified name for people: parts quoted only where SQL would need it.
pub(super) fn display(parts: &[String]) -> String {
    parts
        .iter()
        .map(|p| {
            let plain = p
                .bytes()
                .next()
                .is_some_and(|c| c.is_ascii_lowercase() || c == b'_')
                && p.bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_');
            if plain {
                p.clone()
            } else {
                quote_ident(p)
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// `CREATE [UNIQUE] INDEX CONCURRENTLY [IF NOT EXISTS] name ON …`: the index name, when given.
fn concurrent_index(toks: &[Tok]) -> Option<IndexName> {
    let mut c = Cursor::new(toks);
    if !c.word("create") {
        return None;
    }
    c.word("unique");
    if !c.words(&["index", "concurrently"]) {
        return None;
    }
    c.words(&["if", "not", "exists"]);
    let mut parts = c.qualified()?;
    if !c.word("on") {
        return None;
    }
    let name = parts.pop()?;
    Some(IndexName {
        schema: parts.pop(),
        name,
    })
}

/// The table an `ALTER TABLE` or `CREATE INDEX` works on, for messages and to find an index
/// build's leftover.
fn relation_of(toks: &[Tok]) -> Option<Vec<String>> {
    let mut c = Cursor::new(toks);
    if c.words(&["alter", "table"]) {
        c.words(&["if", "exists"]);
    } else if c.word("create") {
        c.word("unique");
        if !c.word("index") {
            return None;
        }
        c.word("concurrently");
        c.words(&["if", "not", "exists"]);
        if !c.word("on") {
            c.qualified()?;
            if !c.word("on") {
                return None;
            }
        }
    } else {
        return None;
    }
    c.word("only");
    c.qualified()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(sql: &str) -> Result<Step> {
        Step::parse("j", 1, 1, sql)
    }

    fn refused(sql: &str, why: &str) {
        match parse(sql) {
            Err(Error::Usage(m)) => assert!(m.contains(why), "{sql}: {m}"),
            Err(e) => panic!("{sql}: wrong kind of error: {e}"),
            Ok(_) => panic!("{sql}: accepted"),
        }
    }

    #[test]
    fn one_statement_per_step() {
        for ok in [
            "ALTER TABLE t VALIDATE CONSTRAINT c",
            "ALTER TABLE t VALIDATE CONSTRAINT c;",
            "  ALTER TABLE t VALIDATE CONSTRAINT c ; ;  -- done\n",
            "COMMENT ON TABLE t IS 'a; b'",
            "COMMENT ON TABLE t IS E'it\\'s; fine'",
            "COMMENT ON TABLE t IS 'it''s; fine'",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1; SELECT 2 $$",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $body$ SELECT 1; $x$ $body$",
            "ALTER TABLE \"odd;name\" VALIDATE CONSTRAINT c /* a; /* nested; */ b; */",
            "SELECT a$b FROM t -- x; y",
        ] {
            assert!(parse(ok).is_ok(), "{ok}: {:?}", parse(ok).err());
        }
        refused(
            "ALTER TABLE t ADD c int; ALTER TABLE t DROP c",
            "more than one statement",
        );
        refused("SELECT 1;SELECT 2;", "more than one statement");
        refused("SELECT $$a$$; SELECT 2", "more than one statement");
        refused("", "is empty");
        refused(" ; -- nothing\n", "is empty");
        refused("BEGIN", "transaction command");
        refused("commit;", "transaction command");
        refused("/* c */ START TRANSACTION", "transaction command");
        refused("SELECT 'open", "unterminated");
        refused("SELECT $x$ open", "unterminated");
    }

    #[test]
    fn the_hash_ignores_surrounding_whitespace_only() {
        let a = parse("ALTER TABLE t VALIDATE CONSTRAINT c").unwrap();
        let b = parse("\n  ALTER TABLE t VALIDATE CONSTRAINT c  ").unwrap();
        let c = parse("ALTER TABLE t VALIDATE CONSTRAINT d").unwrap();
        assert_eq!(a.hash, b.hash);
        assert_ne!(a.hash, c.hash);
    }

    #[test]
    fn concurrent_index_names_are_read() {
        let name = |sql: &str| parse(sql).unwrap().index;
        let plain = |n: &str| {
            Some(IndexName {
                schema: None,
                name: n.into(),
            })
        };
        assert_eq!(
            name("CREATE INDEX CONCURRENTLY t_x_idx ON t (x)"),
            plain("t_x_idx")
        );
        assert_eq!(
            name("create unique index concurrently if not exists T_X ON t (x)"),
            plain("t_x")
        );
        assert_eq!(
            name("CREATE INDEX CONCURRENTLY \"Odd \"\"Name\" ON t (x)"),
            plain("Odd \"Name")
        );
        assert_eq!(
            name("CREATE INDEX CONCURRENTLY app.\"X\" ON app.t (x)"),
            Some(IndexName {
                schema: Some("app".into()),
                name: "X".into()
            })
        );
        assert_eq!(name("CREATE INDEX CONCURRENTLY ON t (x)"), None);
        assert_eq!(name("CREATE INDEX t_x_idx ON t (x)"), None);
        assert_eq!(name("ALTER TABLE t VALIDATE CONSTRAINT c"), None);
    }

    #[test]
    fn the_table_is_read_for_messages() {
        let table = |sql: &str| parse(sql).unwrap().table.as_deref().map(display);
        assert_eq!(
            table("ALTER TABLE orders VALIDATE CONSTRAINT c").as_deref(),
            Some("orders")
        );
        assert_eq!(
            table("ALTER TABLE IF EXISTS ONLY app.\"Orders\" SET NOT NULL").as_deref(),
            Some("app.\"Orders\"")
        );
        assert_eq!(
            table("CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS i ON ONLY t (x)").as_deref(),
            Some("t")
        );
        assert_eq!(
            table("CREATE INDEX CONCURRENTLY ON s.t (x)").as_deref(),
            Some("s.t")
        );
        assert_eq!(table("VACUUM t"), None);
    }

    #[test]
    fn long_statements_are_shortened_on_one_line() {
        assert_eq!(
            shorten("ALTER TABLE t\n   VALIDATE CONSTRAINT c;"),
            "ALTER TABLE t VALIDATE CONSTRAINT c"
        );
        let long = shorten(&format!("SELECT {}", "x, ".repeat(40)));
        assert!(long.ends_with(" …") && long.chars().count() <= 62, "{long}");
    }
}
