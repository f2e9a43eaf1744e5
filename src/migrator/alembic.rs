//! Alembic's revision graph, read from the `.py` files of a versions directory.
//!
//! `alembic_version` holds only the current head(s), so "is revision R applied?" cannot be answered
//! from the database alone: R is applied when some head is R or descends from it, and descent is
//! written down only in the revision files (`down_revision`, `depends_on`). This module reads those
//! assignments with a small tokenizer — never by running Python — and answers ancestry questions.
//! It does not touch the database; `history` does.

use crate::error::{Error, Result};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};

/// One revision file.
#[derive(Debug, Clone)]
struct Revision {
    file: PathBuf,
    /// `down_revision`: the revisions this one follows (two or more at a merge point).
    down: Vec<String>,
    /// `depends_on`, resolved to revision ids: applied before this one, but not its parents.
    depends: Vec<String>,
}

/// Every revision found under a versions directory, with its parents.
#[derive(Debug, Clone)]
pub struct RevisionGraph {
    dir: PathBuf,
    revisions: BTreeMap<String, Revision>,
}

impl RevisionGraph {
    /// Reads every `*.py` file under `dir` (recursively, as with `recursive_version_locations`).
    pub fn load(dir: &Path) -> Result<RevisionGraph> {
        let shown = dir.display();
        let mut files = Vec::new();
        collect_py(dir, &mut files).map_err(|e| {
            Error::Usage(format!(
                "cannot read the alembic versions directory {shown}: {e}; point `alembic_dir` at the directory holding the revision files (e.g. migrations/versions)"
            ))
        })?;
        files.sort();

        let mut revisions: BTreeMap<String, Revision> = BTreeMap::new();
        // depends_on may name a branch label or a partial id, resolvable only once all files are read.
        let mut pending_depends: Vec<(String, Vec<String>)> = Vec::new();
        let mut labels: BTreeMap<String, String> = BTreeMap::new();
        for file in files {
            let text = std::fs::read_to_string(&file).map_err(|e| {
                Error::Usage(format!(
                    "cannot read alembic revision file {}: {e}",
                    file.display()
                ))
            })?;
            let Some(parsed) = parse_revision_file(&text).map_err(|e| {
                Error::Usage(format!("alembic revision file {}: {e}", file.display()))
            })?
            else {
                continue;
            };
            if let Some(other) = revisions.get(&parsed.revision) {
                return Err(Error::Usage(format!(
                    "alembic revision {} is defined twice, in {} and in {}; remove or renumber one of them",
                    parsed.revision,
                    other.file.display(),
                    file.display()
                )));
            }
            for label in parsed.branch_labels {
                labels.insert(label, parsed.revision.clone());
            }
            pending_depends.push((parsed.revision.clone(), parsed.depends_on));
            revisions.insert(
                parsed.revision,
                Revision {
                    file,
                    down: parsed.down_revision,
                    depends: Vec::new(),
                },
            );
        }
        if revisions.is_empty() {
            return Err(Error::Usage(format!(
                "no alembic revisions found under {shown}: no .py file assigns `revision = \"…\"`; point `alembic_dir` at the versions directory (e.g. migrations/versions)"
            )));
        }
        for rev in revisions.values() {
            if let Some(missing) = rev.down.iter().find(|d| !revisions.contains_key(*d)) {
                return Err(Error::Usage(format!(
                    "alembic revision file {} has down_revision {missing}, which no file under {shown} defines; is a revision file missing from the checkout?",
                    rev.file.display()
                )));
            }
        }
        let mut graph = RevisionGraph {
            dir: dir.to_path_buf(),
            revisions,
        };
        for (id, wanted) in pending_depends {
            let mut resolved = Vec::new();
            for w in wanted {
                let target = match labels.get(&w) {
                    Some(labelled) if !graph.revisions.contains_key(&w) => labelled.clone(),
                    _ => graph.resolve(&w).map_err(|e| {
                        e.context(format!(
                            "depends_on in {}",
                            graph.revisions[&id].file.display()
                        ))
                    })?,
                };
                resolved.push(target);
            }
            if let Some(rev) = graph.revisions.get_mut(&id) {
                rev.depends = resolved;
            }
        }
        Ok(graph)
    }

    /// The directory the graph was read from, for messages.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file that defines `id`, if any.
    pub fn file_of(&self, id: &str) -> Option<&Path> {
        self.revisions.get(id).map(|r| r.file.as_path())
    }

    /// Whether `id` is a revision of this directory (exact id).
    pub fn contains(&self, id: &str) -> bool {
        self.revisions.contains_key(id)
    }

    /// An exact revision id, or a unique prefix of one, as `alembic upgrade <rev>` accepts.
    pub fn resolve(&self, id: &str) -> Result<String> {
        let id = id.trim();
        if self.revisions.contains_key(id) {
            return Ok(id.to_string());
        }
        let dir = self.dir.display();
        if id.is_empty() {
            return Err(Error::Usage(format!(
                "empty alembic revision; name one of the revisions under {dir}"
            )));
        }
        // Alembic matches prefixes only against ids longer than three characters.
        let candidates: Vec<&String> = self
            .revisions
            .keys()
            .filter(|r| r.len() > 3 && r.starts_with(id))
            .collect();
        match candidates.as_slice() {
            [one] => Ok((*one).clone()),
            [] => {
                let hint = if id.len() < 4 {
                    " (a partial revision id needs at least four characters)"
                } else {
                    ""
                };
                Err(Error::Usage(format!(
                    "no alembic revision {id} under {dir}{hint}; check the revision id, or pull the revision files it is in"
                )))
            }
            many => Err(Error::Usage(format!(
                "alembic revision prefix {id} is ambiguous under {dir}: it matches {}; give more characters",
                many.iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// Whether `ancestor` is `of` itself or must have been applied before it: reachable from `of`
    /// through `down_revision` and `depends_on`.
    pub fn is_ancestor_or_self(&self, ancestor: &str, of: &str) -> bool {
        if !self.revisions.contains_key(of) || !self.revisions.contains_key(ancestor) {
            return false;
        }
        let mut seen: HashSet<&str> = HashSet::new();
        let mut stack = vec![of];
        while let Some(r) = stack.pop() {
            if r == ancestor {
                return true;
            }
            if !seen.insert(r) {
                continue;
            }
            if let Some(rev) = self.revisions.get(r) {
                stack.extend(rev.down.iter().map(String::as_str));
                stack.extend(rev.depends.iter().map(String::as_str));
            }
        }
        false
    }

    /// The revisions no other revision follows, sorted. Like Alembic, only `down_revision` makes a
    /// revision stop being a head: a dependency does not merge branches.
    pub fn heads(&self) -> Vec<String> {
        let followed: BTreeSet<&str> = self
            .revisions
            .values()
            .flat_map(|r| r.down.iter().map(String::as_str))
            .collect();
        self.revisions
            .keys()
            .filter(|k| !followed.contains(k.as_str()))
            .cloned()
            .collect()
    }
}

fn collect_py(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path.is_dir() {
            if name.starts_with('.') || name == "__pycache__" {
                continue;
            }
            collect_py(&path, out)?;
        } else if name.ends_with(".py") {
            out.push(path);
        }
    }
    Ok(())
}

/// The assignments of one revision file that matter here.
#[derive(Debug, Default, PartialEq)]
struct ParsedFile {
    revision: String,
    down_revision: Vec<String>,
    depends_on: Vec<String>,
    branch_labels: Vec<String>,
}

/// `Ok(None)` for a file without a module-level `revision` (env.py, `__init__.py`, helpers).
fn parse_revision_file(text: &str) -> std::result::Result<Option<ParsedFile>, String> {
    let mut revision: Option<std::result::Result<String, String>> = None;
    let mut parsed = ParsedFile::default();
    // A helper module may assign these names in other shapes; that matters only in a revision file.
    let mut problem = None;
    for line in logical_lines(text)? {
        if line.indented {
            continue;
        }
        let Some((target, value)) = assignment(&line.tokens) else {
            continue;
        };
        let ids = string_list(value);
        match (target, ids) {
            ("revision", Some(ids)) => {
                revision = Some(match ids.as_slice() {
                    [one] if !one.is_empty() => Ok(one.clone()),
                    _ => Err("`revision` must be one non-empty string".to_string()),
                })
            }
            ("revision", None) => {
                revision = Some(Err("`revision` must be one string literal".to_string()))
            }
            ("down_revision", Some(ids)) => parsed.down_revision = ids,
            ("depends_on", Some(ids)) => parsed.depends_on = ids,
            ("branch_labels", Some(ids)) => parsed.branch_labels = ids,
            (field @ ("down_revision" | "depends_on" | "branch_labels"), None) => {
                problem.get_or_insert(format!(
                    "`{field}` must be None, a string, or a tuple or list of strings"
                ));
            }
            _ => {}
        }
    }
    let Some(revision) = revision else {
        return Ok(None);
    };
    let revision = revision?;
    if let Some(p) = problem {
        return Err(p);
    }
    Ok(Some(ParsedFile { revision, ..parsed }))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static N: AtomicUsize = AtomicUsize::new(0);

    /// A fresh directory holding `files` (relative path, contents); removed on drop.
    struct Tree(PathBuf);

    impl Tree {
        fn new(files: &[(&str, &str)]) -> Tree {
            let dir = std::env::temp_dir().join(format!(
                "backfill-alembic-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            for (path, text) in files {
                let p = dir.join(path);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(p, text).unwrap();
            }
            std::fs::create_dir_all(&dir).unwrap();
            Tree(dir)
        }

        fn load(&self) -> Result<RevisionGraph> {
            RevisionGraph::load(&self.0)
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn rev(id: &str, down: &str) -> String {
        format!(
            "\"\"\"generated\n\nRevision ID: {id}\nRevises: whatever\n\"\"\"\nfrom alembic import op\nimport sqlalchemy as sa\n\n# revision identifiers, used by Alembic.\nrevision = '{id}'\ndown_revision = {down}\nbranch_labels = None\ndepends_on = None\n\n\ndef upgrade():\n    revision = 'not-this-one'\n    op.execute(\"SELECT 1\")\n"
        )
    }

    fn usage(r: Result<impl std::fmt::Debug>) -> String {
        match r {
            Err(Error::Usage(m)) => m,
            other => panic!("expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn linear_chain() {
        let t = Tree::new(&[
            ("env.py", "from alembic import context\n"),
            ("versions/__init__.py", ""),
            ("versions/a1_init.py", &rev("a1a1a1", "None")),
            ("versions/b2_more.py", &rev("b2b2b2", "'a1a1a1'")),
            ("versions/c3_last.py", &rev("c3c3c3", "\"b2b2b2\"")),
            (
                "versions/__pycache__/c3_last.cpython-312.pyc",
                "revision = 'zzzz'",
            ),
            ("versions/README", "revision = 'zzzz'"),
        ]);
        let g = t.load().unwrap();
        assert_eq!(g.heads(), vec!["c3c3c3"]);
        assert!(g.is_ancestor_or_self("a1a1a1", "c3c3c3"));
        assert!(g.is_ancestor_or_self("b2b2b2", "b2b2b2"));
        assert!(!g.is_ancestor_or_self("c3c3c3", "a1a1a1"));
        assert!(!g.is_ancestor_or_self("nope", "c3c3c3"));
        assert!(g.file_of("b2b2b2").unwrap().ends_with("b2_more.py"));
    }

    #[test]
    fn branch_and_merge() {
        let t = Tree::new(&[
            ("base.py", &rev("base0001", "None")),
            ("left.py", &rev("left0001", "'base0001'")),
            ("right.py", &rev("right0001", "'base0001'")),
            ("more_right.py", &rev("right0002", "'right0001'")),
        ]);
        let g = t.load().unwrap();
        assert_eq!(g.heads(), vec!["left0001", "right0002"]);
        assert!(g.is_ancestor_or_self("base0001", "left0001"));
        assert!(!g.is_ancestor_or_self("right0001", "left0001"));
        assert!(!g.is_ancestor_or_self("left0001", "right0002"));

        let t = Tree::new(&[
            ("base.py", &rev("base0001", "None")),
            ("left.py", &rev("left0001", "'base0001'")),
            ("right.py", &rev("right0001", "'base0001'")),
            ("merge.py", &rev("merge0001", "('left0001', 'right0001')")),
        ]);
        let g = t.load().unwrap();
        assert_eq!(g.heads(), vec!["merge0001"]);
        assert!(g.is_ancestor_or_self("left0001", "merge0001"));
        assert!(g.is_ancestor_or_self("right0001", "merge0001"));
        assert!(g.is_ancestor_or_self("base0001", "merge0001"));
        assert!(!g.is_ancestor_or_self("merge0001", "left0001"));
    }

    #[test]
    fn typed_annotations() {
        let text = r#"
"""add status

Revision ID: 3f2a1b
"""
from typing import Sequence, Union

revision: str = "3f2a1b9c"
down_revision: Union[str, Sequence[str], None] = 'a1b2c3d4'  # the previous one
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None
"#;
        let p = parse_revision_file(text).unwrap().unwrap();
        assert_eq!(p.revision, "3f2a1b9c");
        assert_eq!(p.down_revision, vec!["a1b2c3d4"]);
        assert!(p.depends_on.is_empty());
    }

    #[test]
    fn multi_line_tuple_with_comments_and_trailing_comma() {
        let text = "revision = 'merge01'\n\
                    down_revision = (\n    'left01',  # one side\n    # a comment line\n    \"right01\",\n)\n\
                    if False:\n    down_revision = 'ignored'\n\
                    x = revision == 'nope'\n";
        let p = parse_revision_file(text).unwrap().unwrap();
        assert_eq!(p.revision, "merge01");
        assert_eq!(p.down_revision, vec!["left01", "right01"]);

        let list = "revision = 'm'\ndown_revision = [\"a\",\n  'b']\n";
        assert_eq!(
            parse_revision_file(list).unwrap().unwrap().down_revision,
            vec!["a", "b"]
        );
        assert_eq!(parse_revision_file("import os\nX = 1\n").unwrap(), None);
        assert_eq!(
            parse_revision_file("depends_on = compute()\n").unwrap(),
            None
        );
        assert!(parse_revision_file("revision = 'r1'\ndepends_on = compute()\n").is_err());
        assert!(parse_revision_file("revision = make_id()\n").is_err());
    }

    #[test]
    fn depends_on_counts_as_ancestor() {
        let t = Tree::new(&[
            ("a.py", &rev("aaaa0001", "None")),
            (
                "b.py",
                &rev("bbbb0001", "None")
                    .replace("branch_labels = None", "branch_labels = ('billing',)"),
            ),
            (
                "sub/c.py",
                &rev("cccc0001", "'aaaa0001'")
                    .replace("depends_on = None", "depends_on = ('bbbb0001',)"),
            ),
            (
                "sub/d.py",
                &rev("dddd0001", "'cccc0001'")
                    .replace("depends_on = None", "depends_on = 'billing'"),
            ),
        ]);
        let g = t.load().unwrap();
        assert!(g.is_ancestor_or_self("bbbb0001", "cccc0001"));
        assert!(g.is_ancestor_or_self("bbbb0001", "dddd0001"));
        assert!(g.is_ancestor_or_self("aaaa0001", "dddd0001"));
        // A dependency is applied first but does not merge branches.
        assert_eq!(g.heads(), vec!["bbbb0001", "dddd0001"]);
    }

    #[test]
    fn prefix_resolution() {
        let t = Tree::new(&[
            ("1.py", &rev("3f2a1b9c", "None")),
            ("2.py", &rev("3f2a77aa", "'3f2a1b9c'")),
            ("3.py", &rev("abc", "'3f2a77aa'")),
        ]);
        let g = t.load().unwrap();
        assert_eq!(g.resolve("3f2a1b9c").unwrap(), "3f2a1b9c");
        assert_eq!(g.resolve("3f2a1").unwrap(), "3f2a1b9c");
        assert_eq!(g.resolve("abc").unwrap(), "abc");
        let m = usage(g.resolve("3f2a"));
        assert!(
            m.contains("ambiguous") && m.contains("3f2a1b9c") && m.contains("3f2a77aa"),
            "{m}"
        );
        assert!(m.contains(&t.0.display().to_string()), "{m}");
        let m = usage(g.resolve("ffff"));
        assert!(m.contains("no alembic revision ffff"), "{m}");
        // Short ids are matched only exactly.
        assert!(usage(g.resolve("ab")).contains("four characters"));
    }

    #[test]
    fn duplicate_ids_name_both_files() {
        let t = Tree::new(&[
            ("one.py", &rev("dup00001", "None")),
            ("two.py", &rev("dup00001", "None")),
        ]);
        let m = usage(t.load());
        assert!(
            m.contains("one.py") && m.contains("two.py") && m.contains("dup00001"),
            "{m}"
        );
    }

    #[test]
    fn unknown_down_revision_names_the_file() {
        let t = Tree::new(&[
            ("ok.py", &rev("good0001", "None")),
            ("bad.py", &rev("bad00001", "'gone0001'")),
        ]);
        let m = usage(t.load());
        assert!(m.contains("bad.py") && m.contains("gone0001"), "{m}");
    }

    #[test]
    fn missing_or_empty_directory() {
        let m = usage(RevisionGraph::load(Path::new(
            "/nonexistent/backfill/versions",
        )));
        assert!(m.contains("/nonexistent/backfill/versions"), "{m}");
        let t = Tree::new(&[("__init__.py", ""), ("env.py", "import alembic\n")]);
        assert!(usage(t.load()).contains("no alembic revisions found"));
    }
}
