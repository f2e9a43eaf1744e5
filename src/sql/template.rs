//! A job statement split at its `:start` and `:end` placeholders. The scan skips string literals
//! (incl. `E''` and dollar quoting), quoted identifiers, comments and `::type` casts, so text that
//! merely looks like a placeholder stays text; the borders of those come from the one SQL
//! tokenizer ([`super::lex`]). Pure string work: key types and binds are the key module's business.

use super::lex::{tokenize, Kind, LexError};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Start,
    End,
}

/// A job statement split at its `:start` and `:end` placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlTemplate {
    pieces: Vec<Piece>,
}

impl SqlTemplate {
    /// Finds the placeholders, skipping string literals (incl. `E''` and dollar quoting), quoted
    /// identifiers, comments and `::type` casts. Errors are plain sentences for the caller to locate.
    pub fn parse(sql: &str) -> std::result::Result<SqlTemplate, String> {
        let pieces = scan(sql)?;
        let has = |p: &Piece| pieces.iter().any(|x| x == p);
        match (has(&Piece::Start), has(&Piece::End)) {
            (true, true) => Ok(SqlTemplate { pieces }),
            (false, false) => Err("the statement uses neither :start nor :end; restrict it to the chunk, e.g. `WHERE id BETWEEN :start AND :end`".into()),
            (false, true) => Err("the statement has no :start placeholder (the chunk's first key)".into()),
            (true, false) => Err("the statement has no :end placeholder (the chunk's last key)".into()),
        }
    }

    /// True when `sql` contains `:start` or `:end` outside literals and comments.
    pub fn mentions_placeholder(sql: &str) -> bool {
        scan(sql)
            .map(|p| p.iter().any(|x| !matches!(x, Piece::Text(_))))
            .unwrap_or(false)
    }

    /// The statement with `:start` and `:end` replaced by the given SQL expressions (the key
    /// module supplies typed binds or literals).
    pub fn substitute(&self, start: &str, end: &str) -> String {
        self.pieces
            .iter()
            .map(|p| match p {
                Piece::Text(t) => t.as_str(),
                Piece::Start => start,
                Piece::End => end,
            })
            .collect()
    }

    /// The statement as written.
    pub fn source(&self) -> String {
        self.substitute(":start", ":end")
    }
}

/// Splits `sql` at `:start` and `:end`: a `:` token directly followed by the word `start` or
/// `end` (so `:starting` and `x::start` stay text). Everything between placeholders is kept
/// exactly as written.
fn scan(sql: &str) -> std::result::Result<Vec<Piece>, String> {
    let tokens = tokenize(sql).map_err(|e| match e {
        LexError::UnterminatedString => "unterminated string literal".to_string(),
        LexError::UnterminatedQuotedIdent => "unterminated quoted identifier".to_string(),
        LexError::UnterminatedComment => "unterminated /* comment".to_string(),
        LexError::UnterminatedDollarQuote(tag) => {
            format!("unterminated dollar-quoted string {tag}")
        }
    })?;
    if tokens.iter().any(|t| t.kind == Kind::Param) {
        return Err("positional parameters ($1, $2, …) are not allowed: use :start and :end, the engine binds them".into());
    }
    let mut pieces = Vec::new();
    let mut text_from = 0;
    for pair in tokens.windows(2) {
        let (colon, word) = (pair[0], pair[1]);
        if colon.kind != Kind::Punct(':') || word.kind != Kind::Word || word.start != colon.end {
            continue;
        }
        let piece = match word.text(sql) {
            "start" => Piece::Start,
            "end" => Piece::End,
            _ => continue,
        };
        if colon.start > text_from {
            pieces.push(Piece::Text(sql[text_from..colon.start].to_string()));
        }
        pieces.push(piece);
        text_from = word.end;
    }
    if text_from < sql.len() {
        pieces.push(Piece::Text(sql[text_from..].to_string()));
    }
    Ok(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_inside_literals_comments_and_casts_are_text() {
        let sql = "UPDATE t SET s = ':start', d = $$ :end $$, e = E'\\' :end', \"x:start\" = 1 -- :end\n /* :start /* :end */ */ WHERE v::start = 1 AND id BETWEEN :start AND :end";
        let t = SqlTemplate::parse(sql).unwrap();
        let r = t.substitute("$1::text::int", "$2::text::int");
        assert!(
            r.contains("':start'") && r.contains("$$ :end $$") && r.contains("-- :end"),
            "{r}"
        );
        assert!(r.contains("v::start"), "{r}");
        assert_eq!(r.matches("$1::text::int").count(), 1, "{r}");
        assert_eq!(t.source(), sql);
        assert!(SqlTemplate::parse("SELECT ':start', ':end'").is_err());
        assert!(SqlTemplate::parse("SELECT x::end FROM t WHERE id > :start").is_err());
    }

    #[test]
    fn words_that_merely_start_with_placeholder_names_are_not_placeholders() {
        assert!(SqlTemplate::parse("WHERE id BETWEEN :starting AND :end").is_err());
        assert!(SqlTemplate::parse("WHERE id BETWEEN :start AND :endpoint").is_err());
    }

    #[test]
    fn positional_parameters_and_unterminated_literals_are_rejected() {
        assert!(
            SqlTemplate::parse("WHERE id BETWEEN $1 AND :end AND :start")
                .unwrap_err()
                .contains("positional")
        );
        assert!(
            SqlTemplate::parse("WHERE id BETWEEN :start AND :end AND s = 'x")
                .unwrap_err()
                .contains("unterminated")
        );
        // `a$1` is an identifier, not a parameter.
        assert!(SqlTemplate::parse("WHERE a$1 = 0 AND id BETWEEN :start AND :end").is_ok());
    }
}
