//! Alembic's revision graph, read from the `.py` files of a versions directory.
//!
//! `alembic_version` holds only the current head(s), so "is revision R applied?" cannot be answered
//! from the database alone: R is applied when some head is R or descends from it, and descent is
//! written down only in the revision files (`down_revision`, `depends_on`). This module reads those
//! assignments ([`pyfile`], a small tokenizer — never by running Python) and answers ancestry questions
//! by Alembic's own rules: which files are read (`recursive_version_locations`), what a file must
//! declare, how duplicates, branch labels, `label@head` and partial ids resolve. Ancestry needs
//! only `revision`, `down_revision` and `depends_on`; any other value the tokenizer cannot
//! evaluate (a `branch_labels` imported from a module, say) is kept as unknown and matters only
//! when a job names a label. It does not touch the database; `history` does.

mod pyfile;

use crate::error::{Error, Result};
use pyfile::{parse_revision_file, Labels};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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
    /// Branch label -> the revision that declares it.
    labels: BTreeMap<String, String>,
    /// Files whose `branch_labels` is an expression the tokenizer cannot evaluate, with it.
    unknown_labels: Vec<(PathBuf, String)>,
    /// What Alembic would warn about (a revision id defined twice), for messages.
    warnings: Vec<String>,
}

/// What each revision declares besides its parents: (id, branch labels, `depends_on` as written).
type Declared = Vec<(String, Vec<String>, Vec<String>)>;

/// Graphs already read by this process, by directory and recursion: each revision file is read
/// once per command, however many revisions the command asks about.
static LOADED: Mutex<Vec<(PathBuf, bool, Arc<RevisionGraph>)>> = Mutex::new(Vec::new());

impl RevisionGraph {
    /// The graph of `dir`, read once per process (see [`RevisionGraph::reload`] for a fresh one).
    pub fn cached(dir: &Path, recursive: bool) -> Result<Arc<RevisionGraph>> {
        let loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, _, g)) = loaded.iter().find(|(d, r, _)| d == dir && *r == recursive) {
            return Ok(g.clone());
        }
        drop(loaded);
        Self::reload(dir, recursive)
    }

    /// Reads the directory again (its files may have changed, e.g. while a run waits for its
    /// expand revision) and caches the result.
    pub fn reload(dir: &Path, recursive: bool) -> Result<Arc<RevisionGraph>> {
        let graph = Arc::new(Self::load(dir, recursive)?);
        let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
        loaded.retain(|(d, r, _)| !(d == dir && *r == recursive));
        loaded.push((dir.to_path_buf(), recursive, graph.clone()));
        Ok(graph)
    }

    /// Reads the revision files of `dir` as Alembic does: the `.py` files directly in it, or with
    /// `recursive` (Alembic's `recursive_version_locations`) those of its subdirectories too.
    pub fn load(dir: &Path, recursive: bool) -> Result<RevisionGraph> {
        let shown = dir.display();
        let mut files = Vec::new();
        list_revision_files(dir, recursive, &mut files).map_err(|e| {
            Error::Usage(format!(
                "cannot read the alembic versions directory {shown}: {e}; point `alembic_dir` at the directory holding the revision files (e.g. migrations/versions)"
            ))
        })?;

        let mut graph = RevisionGraph {
            dir: dir.to_path_buf(),
            revisions: BTreeMap::new(),
            labels: BTreeMap::new(),
            unknown_labels: Vec::new(),
            warnings: Vec::new(),
        };
        let declared = graph.read_files(files)?;
        if graph.revisions.is_empty() {
            let hint = if recursive {
                ""
            } else {
                " (subdirectories are read only with recursive_version_locations = true, as in alembic)"
            };
            return Err(Error::Usage(format!(
                "no alembic revisions found in {shown}{hint}: no .py file assigns `revision = \"…\"`; point `alembic_dir` at the versions directory (e.g. migrations/versions)"
            )));
        }
        graph.add_labels(&declared)?;
        graph.link(declared, recursive)?;
        Ok(graph)
    }

    /// Reads each revision file into the graph's revisions; returns what each declares beyond its
    /// parents (labels, `depends_on`), for once every file is known.
    fn read_files(&mut self, files: Vec<PathBuf>) -> Result<Declared> {
        let mut declared: Declared = Vec::new();
        for file in files {
            let text = std::fs::read_to_string(&file).map_err(|e| {
                Error::Usage(format!(
                    "cannot read alembic revision file {}: {e}",
                    file.display()
                ))
            })?;
            let bad =
                |e: String| Error::Usage(format!("alembic revision file {}: {e}", file.display()));
            let parsed = parse_revision_file(&text).map_err(bad)?;
            let read = parsed.revision_of(&file).map_err(bad)?;
            if let Some(earlier) = self.revisions.get(&read.revision) {
                // Alembic warns and keeps the file it read last.
                self.warnings.push(format!(
                    "revision {} is defined in {} and again in {}; alembic uses the later one",
                    read.revision,
                    earlier.file.display(),
                    file.display()
                ));
                declared.retain(|(id, _, _)| *id != read.revision);
            }
            match read.labels {
                Labels::Known(labels) => {
                    declared.push((read.revision.clone(), labels, read.depends_on))
                }
                Labels::Unknown(expr) => {
                    self.unknown_labels.push((file.clone(), expr));
                    declared.push((read.revision.clone(), Vec::new(), read.depends_on));
                }
            }
            self.revisions.insert(
                read.revision,
                Revision {
                    file,
                    down: read.down_revision,
                    depends: Vec::new(),
                },
            );
        }
        Ok(declared)
    }

    /// Registers each branch label; a label used twice (or equal to a revision id) is refused,
    /// as Alembic refuses it.
    fn add_labels(&mut self, declared: &Declared) -> Result<()> {
        for (id, labels, _) in declared {
            for label in labels {
                let taken = self
                    .labels
                    .get(label)
                    .cloned()
                    .or_else(|| self.revisions.contains_key(label).then(|| label.clone()));
                if let Some(other) = taken {
                    return Err(Error::Usage(format!(
                        "alembic branch label `{label}` of revision {id} ({}) is already used by revision {other}; alembic refuses this history too",
                        self.revisions[id].file.display()
                    )));
                }
                self.labels.insert(label.clone(), id.clone());
            }
        }
        Ok(())
    }

    /// Checks that every `down_revision` is defined and resolves each `depends_on` to an id.
    fn link(&mut self, declared: Declared, recursive: bool) -> Result<()> {
        let shown = self.dir.display().to_string();
        for rev in self.revisions.values() {
            if let Some(missing) = rev.down.iter().find(|d| !self.revisions.contains_key(*d)) {
                let hint = if recursive {
                    ""
                } else {
                    " (if it is in a subdirectory, set recursive_version_locations = true in [migration], as in alembic.ini)"
                };
                return Err(Error::Usage(format!(
                    "alembic revision file {} has down_revision {missing}, which no file in {shown} defines{hint}; is a revision file missing from the checkout?",
                    rev.file.display()
                )));
            }
        }
        for (id, _, wanted) in declared {
            let mut resolved = Vec::new();
            for w in wanted {
                // Alembic looks depends_on up exactly: a revision id or a branch label.
                let target = match (self.revisions.contains_key(&w), self.labels.get(&w)) {
                    (true, _) => w,
                    (false, Some(labelled)) => labelled.clone(),
                    (false, None) => {
                        return Err(Error::Usage(format!(
                            "alembic revision file {}: depends_on names {w}, which is neither a revision id nor a branch label in {shown}{}",
                            self.revisions[&id].file.display(),
                            self.unknown_labels_hint()
                        )))
                    }
                };
                resolved.push(target);
            }
            if let Some(rev) = self.revisions.get_mut(&id) {
                rev.depends = resolved;
            }
        }
        Ok(())
    }

    /// The directory the graph was read from, for messages.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What Alembic would warn about when reading this directory.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The file that defines `id`, if any.
    pub fn file_of(&self, id: &str) -> Option<&Path> {
        self.revisions.get(id).map(|r| r.file.as_path())
    }

    /// Whether `id` is a revision of this directory (exact id).
    pub fn contains(&self, id: &str) -> bool {
        self.revisions.contains_key(id)
    }

    fn unknown_labels_hint(&self) -> String {
        if self.unknown_labels.is_empty() {
            return String::new();
        }
        let files: Vec<String> = self
            .unknown_labels
            .iter()
            .map(|(f, expr)| format!("{} (branch_labels = {expr})", f.display()))
            .collect();
        format!(
            "; the branch labels of {} are expressions the engine does not evaluate: name the revision id instead",
            files.join(", ")
        )
    }

    /// A revision as a job may name it, with Alembic's meaning: an exact revision id, a branch
    /// label (the revision that declares it), a unique prefix of at least four characters of
    /// either, or `label@head` (the one head on that branch).
    pub fn resolve(&self, name: &str) -> Result<String> {
        let name = name.trim();
        let dir = self.dir.display();
        if let Some((branch, what)) = name.split_once('@') {
            if what != "head" {
                return Err(Error::Usage(format!(
                    "alembic revision `{name}`: of the `branch@…` forms only `{branch}@head` is accepted"
                )));
            }
            return self.branch_head(branch);
        }
        if self.revisions.contains_key(name) {
            return Ok(name.to_string());
        }
        if let Some(rev) = self.labels.get(name) {
            return Ok(rev.clone());
        }
        if name.is_empty() {
            return Err(Error::Usage(format!(
                "empty alembic revision; name one of the revisions in {dir}"
            )));
        }
        // Alembic matches prefixes only against names longer than three characters, ids and
        // branch labels alike.
        let candidates: BTreeSet<&String> = self
            .revisions
            .keys()
            .filter(|r| r.len() > 3 && r.starts_with(name))
            .chain(
                self.labels
                    .iter()
                    .filter(|(l, _)| l.len() > 3 && l.starts_with(name))
                    .map(|(_, rev)| rev),
            )
            .collect();
        let candidates: Vec<&String> = candidates.into_iter().collect();
        match candidates.as_slice() {
            [one] => Ok((*one).clone()),
            [] => {
                let hint = if name.len() < 4 {
                    " (a partial revision id needs at least four characters)"
                } else {
                    ""
                };
                Err(Error::Usage(format!(
                    "no alembic revision or branch label {name} in {dir}{hint}{}; check the revision id, or pull the revision files it is in",
                    self.unknown_labels_hint()
                )))
            }
            many => Err(Error::Usage(format!(
                "alembic revision prefix {name} is ambiguous in {dir}: it matches {}; give more characters",
                many.iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// `branch@head`: the one head that descends from the branch's revision or precedes it
    /// (through `down_revision` only, as Alembic's lineage filter).
    fn branch_head(&self, branch: &str) -> Result<String> {
        let base = self
            .resolve(branch)
            .map_err(|e| e.context(format!("alembic revision `{branch}@head`")))?;
        let heads: Vec<String> = self
            .heads()
            .into_iter()
            .filter(|h| self.follows(h, &base) || self.follows(&base, h))
            .collect();
        match heads.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(Error::Usage(format!(
                "alembic revision `{branch}@head`: no head of {} shares a line with {base}",
                self.dir.display()
            ))),
            many => Err(Error::Usage(format!(
                "alembic revision `{branch}@head`: the branch has several heads ({}); name one of them",
                many.join(", ")
            ))),
        }
    }

    /// Whether `later` is `earlier` or descends from it through `down_revision` alone.
    fn follows(&self, later: &str, earlier: &str) -> bool {
        self.reaches(later, earlier, false)
    }

    /// Whether `ancestor` is `of` itself or must have been applied before it: reachable from `of`
    /// through `down_revision` and `depends_on`.
    pub fn is_ancestor_or_self(&self, ancestor: &str, of: &str) -> bool {
        self.reaches(of, ancestor, true)
    }

    fn reaches(&self, from: &str, to: &str, with_depends: bool) -> bool {
        if !self.revisions.contains_key(from) || !self.revisions.contains_key(to) {
            return false;
        }
        let mut seen: HashSet<&str> = HashSet::new();
        let mut stack = vec![from];
        while let Some(r) = stack.pop() {
            if r == to {
                return true;
            }
            if !seen.insert(r) {
                continue;
            }
            if let Some(rev) = self.revisions.get(r) {
                stack.extend(rev.down.iter().map(String::as_str));
                if with_depends {
                    stack.extend(rev.depends.iter().map(String::as_str));
                }
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

/// The files Alembic reads as revisions, in its order: a directory's files by name (every `.py`
/// but `__init__*` and editor lock files `.#*`), then, when recursive, each subdirectory's by
/// name, depth first; nothing inside `__pycache__`.
fn list_revision_files(dir: &Path, recursive: bool, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut files = Vec::new();
    let mut dirs = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if path.is_dir() {
            dirs.push(path);
        } else {
            files.push(path);
        }
    }
    files.sort();
    dirs.sort();
    let in_cache = dir
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with("__pycache__"));
    if !in_cache {
        out.extend(files.into_iter().filter(|f| {
            let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.ends_with(".py") && !name.starts_with("__init__") && !name.starts_with(".#")
        }));
    }
    if recursive {
        for d in dirs {
            list_revision_files(&d, recursive, out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::pyfile::Value;
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
            RevisionGraph::load(&self.0, false)
        }

        fn load_recursive(&self) -> Result<RevisionGraph> {
            RevisionGraph::load(&self.0, true)
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
            Err(e) if e.kind() == crate::error::ErrorKind::Usage => e.to_string(),
            other => panic!("expected a usage error, got {other:?}"),
        }
    }

    fn strings(v: &[&str]) -> Value {
        Value::Strings(v.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn linear_chain() {
        let t = Tree::new(&[
            ("__init__.py", ""),
            (".#a1_init.py", "lock file of an editor"),
            ("a1_init.py", &rev("a1a1a1", "None")),
            ("b2_more.py", &rev("b2b2b2", "'a1a1a1'")),
            ("c3_last.py", &rev("c3c3c3", "\"b2b2b2\"")),
            ("__pycache__/c3_last.cpython-312.pyc", "revision = 'zzzz'"),
            ("README", "revision = 'zzzz'"),
        ]);
        let g = t.load().unwrap();
        assert_eq!(g.heads(), vec!["c3c3c3"]);
        assert!(g.is_ancestor_or_self("a1a1a1", "c3c3c3"));
        assert!(g.is_ancestor_or_self("b2b2b2", "b2b2b2"));
        assert!(!g.is_ancestor_or_self("c3c3c3", "a1a1a1"));
        assert!(!g.is_ancestor_or_self("nope", "c3c3c3"));
        assert!(g.file_of("b2b2b2").unwrap().ends_with("b2_more.py"));
        assert!(g.warnings().is_empty());
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
    fn typed_annotations_and_string_prefixes() {
        let text = r#"
"""add status

Revision ID: 3f2a1b
"""
from typing import Sequence, Union

revision: str = u"3f2a1b9c"
down_revision: Union[str, Sequence[str], None] = 'a1b2c3d4'  # the previous one
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None
"#;
        let p = parse_revision_file(text).unwrap();
        assert_eq!(p.revision, strings(&["3f2a1b9c"]));
        assert_eq!(p.down_revision, strings(&["a1b2c3d4"]));
        assert_eq!(p.depends_on, strings(&[]));
    }

    #[test]
    fn multi_line_tuple_with_comments_and_trailing_comma() {
        let text = "revision = 'merge01'\n\
                    down_revision = (\n    'left01',  # one side\n    # a comment line\n    \"right01\",\n)\n\
                    if False:\n    down_revision = 'ignored'\n\
                    x = revision == 'nope'\n";
        let p = parse_revision_file(text).unwrap();
        assert_eq!(p.revision, strings(&["merge01"]));
        assert_eq!(p.down_revision, strings(&["left01", "right01"]));

        let list = "revision = 'm'\ndown_revision = [\"a\",\n  'b']\n";
        assert_eq!(
            parse_revision_file(list).unwrap().down_revision,
            strings(&["a", "b"])
        );
        let p = parse_revision_file("import os\nX = 1\n").unwrap();
        assert_eq!(p.revision, Value::Absent);
        let p = parse_revision_file("revision = 'r1'\ndepends_on = compute()\n").unwrap();
        assert_eq!(p.depends_on, Value::Expression("compute()".into()));
        let p = parse_revision_file("branch_labels = (cli.EXPAND_BRANCH,)\nrevision = make_id()\n")
            .unwrap();
        assert_eq!(
            p.branch_labels,
            Value::Expression("(cli.EXPAND_BRANCH,)".into())
        );
        assert_eq!(p.revision, Value::Expression("make_id()".into()));
    }

    #[test]
    fn what_a_revision_file_must_declare() {
        // No `revision`: an error, as in alembic, unless the file is named by a hexadecimal id.
        let t = Tree::new(&[
            ("a.py", &rev("aaaa0001", "None")),
            ("helpers.py", "def f():\n    pass\n"),
        ]);
        let m = usage(t.load());
        assert!(m.contains("helpers.py") && m.contains("revision"), "{m}");
        let t = Tree::new(&[
            ("a.py", &rev("aaaa0001", "None")),
            ("0badcafe.py", "down_revision = 'aaaa0001'\n"),
        ]);
        let g = t.load().unwrap();
        assert_eq!(g.heads(), vec!["0badcafe"]);
        // A missing down_revision is an error, as in alembic; None is a first revision.
        let t = Tree::new(&[("a.py", "revision = 'aaaa0001'\n")]);
        let m = usage(t.load());
        assert!(m.contains("a.py") && m.contains("down_revision"), "{m}");
        // down_revision and depends_on must be readable: the graph needs them.
        let t = Tree::new(&[("a.py", "revision = 'aaaa0001'\ndown_revision = PREVIOUS\n")]);
        assert!(usage(t.load()).contains("down_revision = PREVIOUS"));
        let t = Tree::new(&[("a.py", "revision = make_id()\ndown_revision = None\n")]);
        assert!(usage(t.load()).contains("revision = make_id()"));
    }

    #[test]
    fn depends_on_counts_as_ancestor_and_takes_exact_ids_or_labels() {
        let files = [
            ("a.py", rev("aaaa0001", "None")),
            (
                "b.py",
                rev("bbbb0001", "None")
                    .replace("branch_labels = None", "branch_labels = ('billing',)"),
            ),
            (
                "sub/c.py",
                rev("cccc0001", "'aaaa0001'")
                    .replace("depends_on = None", "depends_on = ('bbbb0001',)"),
            ),
            (
                "sub/d.py",
                rev("dddd0001", "'cccc0001'")
                    .replace("depends_on = None", "depends_on = 'billing'"),
            ),
        ];
        let refs: Vec<(&str, &str)> = files.iter().map(|(p, t)| (*p, t.as_str())).collect();
        let t = Tree::new(&refs);
        let g = t.load_recursive().unwrap();
        assert!(g.is_ancestor_or_self("bbbb0001", "cccc0001"));
        assert!(g.is_ancestor_or_self("bbbb0001", "dddd0001"));
        assert!(g.is_ancestor_or_self("aaaa0001", "dddd0001"));
        // A dependency is applied first but does not merge branches.
        assert_eq!(g.heads(), vec!["bbbb0001", "dddd0001"]);
        // Alembic looks depends_on up exactly: a prefix is an error.
        let t = Tree::new(&[
            ("a.py", &rev("aaaa0001", "None")),
            (
                "b.py",
                &rev("bbbb0001", "None").replace("depends_on = None", "depends_on = 'aaaa'"),
            ),
        ]);
        let m = usage(t.load());
        assert!(m.contains("b.py") && m.contains("aaaa"), "{m}");
    }

    #[test]
    fn subdirectories_are_read_only_when_recursive() {
        let t = Tree::new(&[
            ("a.py", &rev("aaaa0001", "None")),
            ("2024/b.py", &rev("bbbb0001", "'aaaa0001'")),
            ("2025/q1/c.py", &rev("cccc0001", "'bbbb0001'")),
        ]);
        let g = t.load().unwrap();
        assert_eq!(g.heads(), vec!["aaaa0001"]);
        assert!(!g.contains("bbbb0001"));
        let g = t.load_recursive().unwrap();
        assert_eq!(g.heads(), vec!["cccc0001"]);
        // A parent only in a subdirectory says how to read it.
        let t = Tree::new(&[
            ("2024/a.py", &rev("aaaa0001", "None")),
            ("b.py", &rev("bbbb0001", "'aaaa0001'")),
        ]);
        assert!(usage(t.load()).contains("recursive_version_locations"));
    }

    #[test]
    fn names_resolve_as_alembic_resolves_them() {
        let t = Tree::new(&[
            ("1.py", &rev("3f2a1b9c", "None")),
            ("2.py", &rev("3f2a77aa", "'3f2a1b9c'")),
            ("3.py", &rev("abc", "'3f2a77aa'")),
            (
                "4.py",
                &rev("e0e0e0e0", "'abc'")
                    .replace("branch_labels = None", "branch_labels = ('expand',)"),
            ),
            ("5.py", &rev("e1e1e1e1", "'e0e0e0e0'")),
            (
                "6.py",
                &rev("c0c0c0c0", "'abc'")
                    .replace("branch_labels = None", "branch_labels = 'contract'"),
            ),
        ]);
        let g = t.load().unwrap();
        assert_eq!(g.resolve("3f2a1b9c").unwrap(), "3f2a1b9c");
        assert_eq!(g.resolve("3f2a1").unwrap(), "3f2a1b9c");
        assert_eq!(g.resolve("abc").unwrap(), "abc");
        // A label names the revision that declares it; `label@head` the head of its branch.
        assert_eq!(g.resolve("expand").unwrap(), "e0e0e0e0");
        assert_eq!(g.resolve("expand@head").unwrap(), "e1e1e1e1");
        assert_eq!(g.resolve("contract@head").unwrap(), "c0c0c0c0");
        assert_eq!(g.resolve("expa").unwrap(), "e0e0e0e0");
        // The shared trunk has two heads.
        assert!(usage(g.resolve("abc@head")).contains("several heads"));
        let m = usage(g.resolve("3f2a"));
        assert!(
            m.contains("ambiguous") && m.contains("3f2a1b9c") && m.contains("3f2a77aa"),
            "{m}"
        );
        assert!(m.contains(&t.0.display().to_string()), "{m}");
        let m = usage(g.resolve("ffff"));
        assert!(
            m.contains("no alembic revision or branch label ffff"),
            "{m}"
        );
        // Short ids are matched only exactly.
        assert!(usage(g.resolve("ab")).contains("four characters"));
    }

    #[test]
    fn a_label_the_engine_cannot_read_only_matters_when_named() {
        let t = Tree::new(&[
            ("a.py", &rev("aaaa0001", "None")),
            (
                "b.py",
                &rev("bbbb0001", "'aaaa0001'").replace(
                    "branch_labels = None",
                    "branch_labels = (cli.EXPAND_BRANCH,)",
                ),
            ),
            ("c.py", &rev("cccc0001", "'bbbb0001'")),
        ]);
        let g = t.load().unwrap();
        assert!(g.is_ancestor_or_self("aaaa0001", "cccc0001"));
        assert_eq!(g.resolve("bbbb0001").unwrap(), "bbbb0001");
        let m = usage(g.resolve("expand@head"));
        assert!(
            m.contains("b.py") && m.contains("cli.EXPAND_BRANCH") && m.contains("revision id"),
            "{m}"
        );
    }

    #[test]
    fn a_duplicate_id_keeps_the_later_file_with_a_warning() {
        let t = Tree::new(&[
            ("one.py", &rev("dup00001", "None")),
            ("two.py", &rev("dup00001", "None")),
        ]);
        let g = t.load().unwrap();
        assert!(g.file_of("dup00001").unwrap().ends_with("two.py"));
        let w = g.warnings().join("; ");
        assert!(
            w.contains("one.py") && w.contains("two.py") && w.contains("dup00001"),
            "{w}"
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
    fn each_directory_is_read_once_per_process_unless_reloaded() {
        let t = Tree::new(&[("a.py", &rev("aaaa0001", "None"))]);
        let first = RevisionGraph::cached(&t.0, false).unwrap();
        std::fs::write(t.0.join("b.py"), rev("bbbb0001", "'aaaa0001'")).unwrap();
        let again = RevisionGraph::cached(&t.0, false).unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        assert!(!again.contains("bbbb0001"));
        let fresh = RevisionGraph::reload(&t.0, false).unwrap();
        assert!(fresh.contains("bbbb0001"));
        assert!(Arc::ptr_eq(
            &fresh,
            &RevisionGraph::cached(&t.0, false).unwrap()
        ));
    }

    #[test]
    fn missing_or_empty_directory() {
        let m = usage(RevisionGraph::load(
            Path::new("/nonexistent/backfill/versions"),
            false,
        ));
        assert!(m.contains("/nonexistent/backfill/versions"), "{m}");
        let t = Tree::new(&[("__init__.py", "")]);
        assert!(usage(t.load()).contains("no alembic revisions found"));
    }
}
