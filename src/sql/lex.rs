//! The one SQL tokenizer: splits statement text into tokens the way PostgreSQL's scanner draws
//! their borders — string literals (incl. `E''` with backslash escapes), dollar quoting, quoted
//! identifiers, nested `/* */` and `--` comments, `::` casts, `$1` parameters — so that a `;`, a
//! `:start` or a keyword inside a literal or a comment is never mistaken for one outside it.
//!
//! Tokens carry byte spans into the text, so callers can keep the source exactly as written (the
//! placeholder template) or read words (the finishing steps). Comments and whitespace produce no
//! token. This module knows nothing of placeholders, statements or the database, and depends on
//! nothing else in the crate.

/// What a token is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An unquoted identifier or keyword, as written (`$` may continue it: `a$b`).
    Word,
    /// A double-quoted identifier, quotes included; [`unquote_ident`] gives its name.
    QuotedIdent,
    /// A string literal: `'…'`, `E'…'` (the `E` included) or a dollar-quoted `$tag$…$tag$`.
    String,
    /// A numeric literal.
    Number,
    /// A positional parameter such as `$1`.
    Param,
    /// The cast operator `::`.
    Cast,
    /// Any other single character (`;`, `.`, `:`, `(`, operators …).
    Punct(char),
}

/// One token: its kind and its byte range in the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    pub kind: Kind,
    pub start: usize,
    pub end: usize,
}

impl Token {
    /// The token's text in `sql`, the text it was lexed from.
    pub fn text<'a>(&self, sql: &'a str) -> &'a str {
        &sql[self.start..self.end]
    }
}

/// Text the tokenizer could not finish: it ended inside a literal, identifier or comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LexError {
    UnterminatedString,
    UnterminatedQuotedIdent,
    UnterminatedComment,
    /// A dollar-quoted string whose closing tag (given, e.g. `$body$`) never comes.
    UnterminatedDollarQuote(String),
}

/// A byte that may start an identifier. Every byte of a multi-byte character counts, as in
/// PostgreSQL's scanner, so a token never splits a character.
fn ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn ident_continue(c: u8) -> bool {
    ident_start(c) || c.is_ascii_digit() || c == b'$'
}

/// Splits `sql` into tokens; comments and whitespace are skipped.
pub fn tokenize(sql: &str) -> Result<Vec<Token>, LexError> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        let start = i;
        let kind = if c.is_ascii_whitespace() {
            i += 1;
            continue;
        } else if c == b'-' && next == Some(b'-') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            continue;
        } else if c == b'/' && next == Some(b'*') {
            i = skip_block_comment(b, i)?;
            continue;
        } else if c == b'\'' {
            i = skip_string(b, i, false)?;
            Kind::String
        } else if c == b'"' {
            i = skip_quoted_ident(b, i)?;
            Kind::QuotedIdent
        } else if c == b'$' && !(i > 0 && ident_continue(b[i - 1])) {
            let (end, kind) = dollar(b, i)?;
            i = end;
            kind
        } else if ident_start(c) {
            while i < b.len() && ident_continue(b[i]) {
                i += 1;
            }
            // `E'…'` takes backslash escapes; the `E` belongs to the literal.
            if b.get(i) == Some(&b'\'') && sql[start..i].eq_ignore_ascii_case("e") {
                i = skip_string(b, i, true)?;
                Kind::String
            } else {
                Kind::Word
            }
        } else if c.is_ascii_digit() {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.' || b[i] == b'_') {
                i += 1;
            }
            Kind::Number
        } else if c == b':' && next == Some(b':') {
            i += 2;
            Kind::Cast
        } else {
            i += 1;
            Kind::Punct(c as char)
        };
        out.push(Token {
            kind,
            start,
            end: i,
        });
    }
    Ok(out)
}

/// The name a quoted identifier (`"a""b"`, quotes included) stands for: `a"b`.
pub fn unquote_ident(quoted: &str) -> String {
    let inner = quoted
        .strip_prefix('"')
        .and_then(|q| q.strip_suffix('"'))
        .unwrap_or(quoted);
    inner.replace("\"\"", "\"")
}

/// The index just past the block comment starting at `b[i]`; block comments nest in PostgreSQL.
fn skip_block_comment(b: &[u8], mut i: usize) -> Result<usize, LexError> {
    let mut depth = 0;
    loop {
        match (b.get(i), b.get(i + 1)) {
            (None, _) => return Err(LexError::UnterminatedComment),
            (Some(b'/'), Some(b'*')) => {
                depth += 1;
                i += 2;
            }
            (Some(b'*'), Some(b'/')) => {
                depth -= 1;
                i += 2;
                if depth == 0 {
                    return Ok(i);
                }
            }
            _ => i += 1,
        }
    }
}

/// The index just past the string literal starting at `b[i]` (a quote); `''` is a quote inside,
/// and with `backslash` (E'…') so is `\'`.
fn skip_string(b: &[u8], mut i: usize, backslash: bool) -> Result<usize, LexError> {
    i += 1;
    loop {
        match (b.get(i), b.get(i + 1)) {
            (None, _) => return Err(LexError::UnterminatedString),
            (Some(b'\\'), Some(_)) if backslash => i += 2,
            (Some(b'\''), Some(b'\'')) => i += 2,
            (Some(b'\''), _) => return Ok(i + 1),
            _ => i += 1,
        }
    }
}

/// The index just past the quoted identifier starting at `b[i]`; `""` is a quote inside.
fn skip_quoted_ident(b: &[u8], mut i: usize) -> Result<usize, LexError> {
    i += 1;
    loop {
        match (b.get(i), b.get(i + 1)) {
            (None, _) => return Err(LexError::UnterminatedQuotedIdent),
            (Some(b'"'), Some(b'"')) => i += 2,
            (Some(b'"'), _) => return Ok(i + 1),
            _ => i += 1,
        }
    }
}

/// At a `$` that does not continue an identifier: `$1` is a parameter, `$tag$ … $tag$` (or
/// `$$ … $$`) a string; a lone `$` is punctuation.
fn dollar(b: &[u8], i: usize) -> Result<(usize, Kind), LexError> {
    if b.get(i + 1).is_some_and(|d| d.is_ascii_digit()) {
        let mut j = i + 1;
        while j < b.len() && b[j].is_ascii_digit() {
            j += 1;
        }
        return Ok((j, Kind::Param));
    }
    let mut j = i + 1;
    while j < b.len() && (ident_start(b[j]) || (j > i + 1 && b[j].is_ascii_digit())) {
        j += 1;
    }
    if b.get(j) != Some(&b'$') {
        return Ok((i + 1, Kind::Punct('$')));
    }
    let tag = &b[i..=j];
    let body = j + 1;
    match b[body..].windows(tag.len()).position(|w| w == tag) {
        Some(at) => Ok((body + at + tag.len(), Kind::String)),
        None => Err(LexError::UnterminatedDollarQuote(
            String::from_utf8_lossy(tag).into_owned(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each token as (kind, text).
    fn lex(sql: &str) -> Vec<(Kind, &str)> {
        tokenize(sql)
            .unwrap()
            .iter()
            .map(|t| (t.kind, t.text(sql)))
            .collect()
    }

    #[test]
    fn token_borders() {
        use Kind::*;
        let cases: &[(&str, &[(Kind, &str)])] = &[
            (
                "a.b;",
                &[
                    (Word, "a"),
                    (Punct('.'), "."),
                    (Word, "b"),
                    (Punct(';'), ";"),
                ],
            ),
            ("x::int", &[(Word, "x"), (Cast, "::"), (Word, "int")]),
            (":start", &[(Punct(':'), ":"), (Word, "start")]),
            ("'a;b' -- c;\n1.5", &[(String, "'a;b'"), (Number, "1.5")]),
            ("'it''s'", &[(String, "'it''s'")]),
            ("E'it\\'s;'", &[(String, "E'it\\'s;'")]),
            ("e 'x'", &[(Word, "e"), (String, "'x'")]),
            (
                "\"a\"\"b\".c",
                &[(QuotedIdent, "\"a\"\"b\""), (Punct('.'), "."), (Word, "c")],
            ),
            ("/* a /* ; */ b */ z", &[(Word, "z")]),
            ("$$ ; $$", &[(String, "$$ ; $$")]),
            ("$body$ $x$ ; $body$", &[(String, "$body$ $x$ ; $body$")]),
            (
                "$1, $23",
                &[(Param, "$1"), (Punct(','), ","), (Param, "$23")],
            ),
            ("a$1 a$b$", &[(Word, "a$1"), (Word, "a$b$")]),
            ("$ x", &[(Punct('$'), "$"), (Word, "x")]),
            ("über;", &[(Word, "über"), (Punct(';'), ";")]),
        ];
        for (sql, want) in cases {
            assert_eq!(lex(sql), *want, "{sql}");
        }
    }

    #[test]
    fn unterminated_text_is_an_error() {
        let cases = [
            ("'open", LexError::UnterminatedString),
            ("E'open\\'", LexError::UnterminatedString),
            ("\"open", LexError::UnterminatedQuotedIdent),
            ("/* /* */", LexError::UnterminatedComment),
            ("$x$ open", LexError::UnterminatedDollarQuote("$x$".into())),
        ];
        for (sql, want) in cases {
            assert_eq!(tokenize(sql), Err(want), "{sql}");
        }
    }

    #[test]
    fn quoted_identifiers_are_unescaped() {
        assert_eq!(unquote_ident("\"Odd \"\"Name\""), "Odd \"Name");
        assert_eq!(unquote_ident("\"x\""), "x");
    }
}
