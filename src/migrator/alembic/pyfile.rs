//! One alembic revision file read without running Python: a small tokenizer for the module-level
//! assignments Alembic reads (`revision`, `down_revision`, `depends_on`, `branch_labels`) —
//! strings with their prefixes, tuples and lists over several lines, type annotations, comments —
//! and Alembic's rules for what a revision file must declare. Knows nothing of the graph the
//! files make (that is `super`'s) or of the database.

use std::path::Path;

/// A module-level assignment as read without running Python.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Value {
    Absent,
    /// `None`, a string, or a tuple or list of strings.
    Strings(Vec<String>),
    /// Anything else, as written (e.g. `(cli.EXPAND_BRANCH,)`).
    Expression(String),
}

/// The assignments of one revision file that matter here (the last one of each name counts).
#[derive(Debug, PartialEq)]
pub(super) struct ParsedFile {
    pub(super) revision: Value,
    pub(super) down_revision: Value,
    pub(super) depends_on: Value,
    pub(super) branch_labels: Value,
}

pub(super) enum Labels {
    Known(Vec<String>),
    Unknown(String),
}

/// What the graph needs of one file.
pub(super) struct ReadRevision {
    pub(super) revision: String,
    pub(super) down_revision: Vec<String>,
    pub(super) depends_on: Vec<String>,
    pub(super) labels: Labels,
}

impl ParsedFile {
    /// Applies Alembic's rules for a file in the versions directory: it must declare `revision`
    /// (or, as Alembic's legacy rule, be named by a hexadecimal id) and `down_revision`.
    pub(super) fn revision_of(self, file: &Path) -> std::result::Result<ReadRevision, String> {
        let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let revision = match self.revision {
            Value::Strings(ids) => match ids.as_slice() {
                [one] if !one.is_empty() => one.clone(),
                _ => return Err("`revision` must be one non-empty string".into()),
            },
            Value::Expression(e) => {
                return Err(format!(
                    "`revision = {e}` is an expression the engine does not evaluate; write the id as a string literal"
                ))
            }
            Value::Absent => match name.strip_suffix(".py") {
                Some(stem) if !stem.is_empty() && stem.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) => stem.to_string(),
                _ => {
                    return Err("it does not assign `revision = \"…\"`, and alembic refuses such a file in the versions directory too (\"Could not determine revision id\"); move helper modules out of the versions directory".into())
                }
            },
        };
        let needed = |field: &str, v: Value, required: bool| {
            match v {
            Value::Strings(ids) => Ok(ids),
            Value::Absent if !required => Ok(Vec::new()),
            Value::Absent => Err(format!(
                "it does not assign `{field}` (alembic fails on it too); write `{field} = None` for a first revision"
            )),
            Value::Expression(e) => Err(format!(
                "`{field} = {e}` is an expression the engine does not evaluate, and the revision graph needs it; write it as None, a string, or a tuple of strings"
            )),
        }
        };
        Ok(ReadRevision {
            revision,
            down_revision: needed("down_revision", self.down_revision, true)?,
            depends_on: needed("depends_on", self.depends_on, false)?,
            labels: match self.branch_labels {
                Value::Strings(l) => Labels::Known(l),
                Value::Absent => Labels::Known(Vec::new()),
                Value::Expression(e) => Labels::Unknown(e),
            },
        })
    }
}

/// The module-level assignments of `revision`, `down_revision`, `depends_on` and
/// `branch_labels`.
pub(super) fn parse_revision_file(text: &str) -> std::result::Result<ParsedFile, String> {
    let mut parsed = ParsedFile {
        revision: Value::Absent,
        down_revision: Value::Absent,
        depends_on: Value::Absent,
        branch_labels: Value::Absent,
    };
    for line in logical_lines(text)? {
        if line.indented {
            continue;
        }
        let Some((target, value)) = assignment(&line.tokens) else {
            continue;
        };
        let slot = match target {
            "revision" => &mut parsed.revision,
            "down_revision" => &mut parsed.down_revision,
            "depends_on" => &mut parsed.depends_on,
            "branch_labels" => &mut parsed.branch_labels,
            _ => continue,
        };
        *slot = match string_list(value) {
            Some(ids) => Value::Strings(ids),
            None => Value::Expression(show_tokens(value)),
        };
    }
    Ok(parsed)
}

/// Tokens as source-like text, for messages.
fn show_tokens(tokens: &[Token]) -> String {
    let mut out = String::new();
    for t in tokens {
        match t {
            Token::Name(n) => {
                if out.ends_with(|c: char| c.is_alphanumeric() || c == '_') {
                    out.push(' ');
                }
                out.push_str(n);
            }
            Token::Str(s) => out.push_str(&format!("{s:?}")),
            Token::Op(o) if o == "," => out.push_str(", "),
            Token::Op(o) => {
                if matches!(o.as_str(), ")" | "]" | "}") {
                    out.truncate(out.trim_end().len());
                }
                out.push_str(o);
            }
        }
    }
    out.trim_end().to_string()
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Name(String),
    Str(String),
    Op(String),
}

/// A Python logical line: brackets and backslashes join physical lines.
struct Line {
    indented: bool,
    tokens: Vec<Token>,
}

/// Just enough of Python's tokenizer to find module-level assignments: strings (all quote forms,
/// with prefixes), comments, bracket nesting and line continuation. Anything else becomes an
/// operator token that the assignment matcher ignores.
fn logical_lines(text: &str) -> std::result::Result<Vec<Line>, String> {
    let chars: Vec<char> = text.chars().collect();
    let mut lines = Vec::new();
    let mut tokens = Vec::new();
    let mut depth = 0usize;
    let mut at_line_start = true;
    let mut indented = false;
    let mut i = 0;
    let mut lineno = 1;
    while i < chars.len() {
        let c = chars[i];
        if at_line_start {
            if c == ' ' || c == '\t' || c == '\x0c' {
                indented = true;
                i += 1;
                continue;
            }
            at_line_start = false;
        }
        match c {
            '\n' => {
                lineno += 1;
                i += 1;
                if depth == 0 {
                    if !tokens.is_empty() {
                        lines.push(Line {
                            indented,
                            tokens: std::mem::take(&mut tokens),
                        });
                    }
                    at_line_start = true;
                    indented = false;
                }
            }
            '#' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '\\' if chars.get(i + 1) == Some(&'\n') => {
                lineno += 1;
                i += 2;
            }
            '\\' if chars.get(i + 1) == Some(&'\r') && chars.get(i + 2) == Some(&'\n') => {
                lineno += 1;
                i += 3;
            }
            '\'' | '"' => {
                let (s, next, lines_in) = read_string(&chars, i, lineno)?;
                lineno += lines_in;
                tokens.push(Token::Str(s));
                i = next;
            }
            c if c.is_alphabetic() || c == '_' => {
                let start = i;
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                // A string prefix (r"", b'', u"", f"", rb"" …) glued to its quote.
                if word.len() <= 2
                    && word.chars().all(|p| "rRbBuUfF".contains(p))
                    && matches!(chars.get(i), Some('\'') | Some('"'))
                {
                    let (s, next, lines_in) = read_string(&chars, i, lineno)?;
                    lineno += lines_in;
                    tokens.push(Token::Str(s));
                    i = next;
                } else {
                    tokens.push(Token::Name(word));
                }
            }
            '(' | '[' | '{' => {
                depth += 1;
                tokens.push(Token::Op(c.to_string()));
                i += 1;
            }
            ')' | ']' | '}' => {
                depth = depth.saturating_sub(1);
                tokens.push(Token::Op(c.to_string()));
                i += 1;
            }
            c if c.is_whitespace() => i += 1,
            c => {
                // `==`, `<=`, `:=` … must not read as an assignment.
                if "=<>!:+-*/%&|^@".contains(c) && chars.get(i + 1) == Some(&'=') {
                    tokens.push(Token::Op(format!("{c}=")));
                    i += 2;
                } else {
                    tokens.push(Token::Op(c.to_string()));
                    i += 1;
                }
            }
        }
    }
    if !tokens.is_empty() {
        lines.push(Line { indented, tokens });
    }
    Ok(lines)
}

/// Reads the string literal whose opening quote is at `start`; returns its value (escapes kept
/// verbatim except `\\`, `\'` and `\"`, which is all a revision id could need), the index after
/// it and the number of newlines inside.
fn read_string(
    chars: &[char],
    start: usize,
    lineno: usize,
) -> std::result::Result<(String, usize, usize), String> {
    let quote = chars[start];
    let triple = chars.get(start + 1) == Some(&quote) && chars.get(start + 2) == Some(&quote);
    let mut i = start + if triple { 3 } else { 1 };
    let mut value = String::new();
    let mut newlines = 0;
    loop {
        let Some(&c) = chars.get(i) else {
            return Err(format!("unterminated string starting on line {lineno}"));
        };
        if c == '\\' {
            match chars.get(i + 1) {
                Some(&n) if n == '\\' || n == '\'' || n == '"' => value.push(n),
                Some('\n') => newlines += 1,
                Some(&n) => {
                    value.push('\\');
                    value.push(n);
                }
                None => return Err(format!("unterminated string starting on line {lineno}")),
            }
            i += 2;
            continue;
        }
        if c == quote {
            if !triple {
                return Ok((value, i + 1, newlines));
            }
            if chars.get(i + 1) == Some(&quote) && chars.get(i + 2) == Some(&quote) {
                return Ok((value, i + 3, newlines));
            }
        }
        if c == '\n' {
            if !triple {
                return Err(format!("unterminated string on line {}", lineno + newlines));
            }
            newlines += 1;
        }
        value.push(c);
        i += 1;
    }
}

/// `name = value` or `name: annotation = value`: the target and the value's tokens.
fn assignment(tokens: &[Token]) -> Option<(&str, &[Token])> {
    let Some(Token::Name(target)) = tokens.first() else {
        return None;
    };
    let mut depth = 0i32;
    let rest = &tokens[1..];
    match rest.first() {
        Some(Token::Op(op)) if op == "=" || op == ":" => {}
        _ => return None,
    }
    for (i, t) in rest.iter().enumerate() {
        if let Token::Op(op) = t {
            match op.as_str() {
                "(" | "[" | "{" => depth += 1,
                ")" | "]" | "}" => depth -= 1,
                "=" if depth == 0 => return Some((target, &rest[i + 1..])),
                _ => {}
            }
        }
    }
    None
}

/// `None`, a string, or a tuple/list of strings (trailing comma allowed), as a list. Adjacent
/// literals concatenate, as in Python.
fn string_list(value: &[Token]) -> Option<Vec<String>> {
    // A trailing `;` ends the statement.
    let value = match value.last() {
        Some(Token::Op(op)) if op == ";" => &value[..value.len() - 1],
        _ => value,
    };
    match value {
        [Token::Name(n)] if n == "None" => return Some(Vec::new()),
        [Token::Op(open), inner @ .., Token::Op(close)]
            if (open == "(" && close == ")") || (open == "[" && close == "]") =>
        {
            return items(inner);
        }
        _ => {}
    }
    // A bare tuple: `down_revision = "a", "b"`.
    items(value)
}

fn items(tokens: &[Token]) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for t in tokens {
        match t {
            Token::Str(s) => current.get_or_insert_with(String::new).push_str(s),
            Token::Op(op) if op == "," => out.push(current.take()?),
            _ => return None,
        }
    }
    if let Some(last) = current {
        out.push(last);
    }
    Some(out)
}
