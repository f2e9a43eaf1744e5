//! A job statement split at its `:start` and `:end` placeholders. The scan skips string literals
//! (incl. `E''` and dollar quoting), quoted identifiers, comments and `::type` casts, so text that
//! merely looks like a placeholder stays text. Pure string work: key types and binds are the key
//! module's business.

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

fn is_ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '$'
}

fn scan(sql: &str) -> std::result::Result<Vec<Piece>, String> {
    let chars: Vec<char> = sql.chars().collect();
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut i = 0;
    let prev_is_ident = |i: usize| i > 0 && is_ident_char(chars[i - 1]);
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        match c {
            '\'' => {
                // E'...' strings take backslash escapes.
                let escapes = i > 0
                    && matches!(chars[i - 1], 'e' | 'E')
                    && !(i > 1 && is_ident_char(chars[i - 2]));
                let start = i;
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err("unterminated string literal".into()),
                        Some('\\') if escapes => i += 2,
                        Some('\'') if chars.get(i + 1) == Some(&'\'') => i += 2,
                        Some('\'') => {
                            i += 1;
                            break;
                        }
                        Some(_) => i += 1,
                    }
                }
                text.extend(&chars[start..i.min(chars.len())]);
            }
            '"' => {
                let start = i;
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err("unterminated quoted identifier".into()),
                        Some('"') if chars.get(i + 1) == Some(&'"') => i += 2,
                        Some('"') => {
                            i += 1;
                            break;
                        }
                        Some(_) => i += 1,
                    }
                }
                text.extend(&chars[start..i]);
            }
            '-' if next == Some('-') => {
                let start = i;
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
                text.extend(&chars[start..i]);
            }
            '/' if next == Some('*') => {
                let start = i;
                let mut depth = 0;
                loop {
                    match (chars.get(i), chars.get(i + 1)) {
                        (None, _) => return Err("unterminated /* comment".into()),
                        (Some('/'), Some('*')) => {
                            depth += 1;
                            i += 2;
                        }
                        (Some('*'), Some('/')) => {
                            depth -= 1;
                            i += 2;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => i += 1,
                    }
                }
                text.extend(&chars[start..i]);
            }
            '$' if !prev_is_ident(i) => {
                // $1 is a positional parameter; $tag$ or $$ opens a dollar-quoted string.
                if next.is_some_and(|d| d.is_ascii_digit()) {
                    return Err("positional parameters ($1, $2, …) are not allowed: use :start and :end, the engine binds them".into());
                }
                let mut j = i + 1;
                while j < chars.len() && (chars[j].is_alphanumeric() || chars[j] == '_') {
                    j += 1;
                }
                if chars.get(j) == Some(&'$') {
                    let tag: String = chars[i..=j].iter().collect();
                    let start = i;
                    i = j + 1;
                    let tag_chars: Vec<char> = tag.chars().collect();
                    loop {
                        if i >= chars.len() {
                            return Err(format!("unterminated dollar-quoted string {tag}"));
                        }
                        if chars[i..].starts_with(&tag_chars) {
                            i += tag_chars.len();
                            break;
                        }
                        i += 1;
                    }
                    text.extend(&chars[start..i]);
                } else {
                    text.push(c);
                    i += 1;
                }
            }
            ':' if next == Some(':') => {
                text.push_str("::");
                i += 2;
            }
            ':' => {
                let mut j = i + 1;
                while j < chars.len() && is_ident_char(chars[j]) {
                    j += 1;
                }
                let word: String = chars[i + 1..j].iter().collect();
                let piece = match word.as_str() {
                    "start" => Some(Piece::Start),
                    "end" => Some(Piece::End),
                    _ => None,
                };
                match piece {
                    Some(p) => {
                        if !text.is_empty() {
                            pieces.push(Piece::Text(std::mem::take(&mut text)));
                        }
                        pieces.push(p);
                        i = j;
                    }
                    None => {
                        text.push(c);
                        i += 1;
                    }
                }
            }
            _ => {
                text.push(c);
                i += 1;
            }
        }
    }
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
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
