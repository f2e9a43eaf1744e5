//! The engine reads Alembic histories as Alembic does: fixture histories written in the forms
//! real projects use (typed assignments, `u''` ids, merges of two and three, `depends_on` across
//! branches and by label, branch labels from an imported constant, release subfolders, two heads)
//! are read by the engine and by Alembic's own `ScriptDirectory`, and both must give the same
//! revisions, the same heads, and the same answer to "is this applied?" for every revision and
//! name in every state of `alembic_version`.

use crate::support::{block_on, TestDb};
use backfill::migrator::alembic::RevisionGraph;
use backfill::migrator::history::{History, Tool};
use std::path::{Path, PathBuf};

fn histories() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/alembic_histories")
}

#[derive(serde::Deserialize)]
struct Oracle {
    ids: Vec<String>,
    heads: Vec<String>,
    answers: Vec<Answer>,
}

#[derive(serde::Deserialize)]
struct Answer {
    state: Vec<String>,
    name: String,
    answer: String,
}

/// What Alembic answers for the history in `fixture` (see oracle.py).
fn alembic_answers(fixture: &str, recursive: bool, names: &[&str]) -> Oracle {
    let root = histories().join(fixture);
    let spec = serde_json::json!({
        "script_location": root,
        "versions": root.join("versions"),
        "recursive": recursive,
        "import_path": root,
        "names": names,
    });
    let out = crate::tools::python_command()
        .arg(histories().join("oracle.py"))
        .arg(spec.to_string())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("python could not be started");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "alembic's ScriptDirectory failed on {fixture}: {stderr}"
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("oracle output: {e}; {stderr}"))
}

/// Asks the engine every question Alembic answered, through `alembic_version` on a real
/// PostgreSQL, and returns the questions where the two differ.
fn compare(fixture: &str, recursive: bool, names: &[&str]) -> usize {
    let oracle = alembic_answers(fixture, recursive, names);
    let versions = histories().join(fixture).join("versions");
    let graph = RevisionGraph::load(&versions, recursive).unwrap();
    assert_eq!(graph.heads(), oracle.heads, "{fixture}: heads");
    for id in &oracle.ids {
        assert!(
            graph.contains(id),
            "{fixture}: the engine misses revision {id}"
        );
    }
    let db = TestDb::new();
    db.exec(
        "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL,
             CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))",
    );
    let history = History {
        tool: Tool::Alembic,
        table: None,
        alembic_dir: Some(versions),
        alembic_recursive: recursive,
    };
    let mut differ = Vec::new();
    block_on(async {
        let client = db.connect().await;
        let mut state: Vec<String> = Vec::new();
        for a in &oracle.answers {
            if a.state != state {
                state = a.state.clone();
                client
                    .execute("DELETE FROM alembic_version", &[])
                    .await
                    .unwrap();
                for head in &state {
                    client
                        .execute("INSERT INTO alembic_version VALUES ($1)", &[head])
                        .await
                        .unwrap();
                }
            }
            let engine = match history.is_applied(&client, &a.name).await {
                Ok(x) if x.applied => "applied".to_string(),
                Ok(_) => "not applied".to_string(),
                Err(_) => "error".to_string(),
            };
            if engine != a.answer {
                differ.push(format!(
                    "heads {:?}, {}: alembic says {}, the engine {engine}",
                    a.state, a.name, a.answer
                ));
            }
        }
    });
    assert!(
        differ.is_empty(),
        "{fixture}: {} of {} answers differ from alembic's:\n{}",
        differ.len(),
        oracle.answers.len(),
        differ.join("\n")
    );
    oracle.answers.len()
}

#[test]
fn the_engine_answers_as_alembic_on_a_history_in_every_template_form() {
    let names = [
        "audit",
        "expand",
        "contract",
        "expand@head",
        "contract@head",
        "audit@head",
        "expa",
        "cont",
        "3a00",
        "0b00",
        "ffff",
        "abc",
    ];
    let asked = compare("mixed", false, &names);
    assert!(asked > 150, "{asked} questions");
}

#[test]
fn the_engine_answers_as_alembic_on_release_subfolders_with_labels_from_a_module() {
    let asked = compare("releases_by_branch", true, &["a1e5", "c0de0000aa0", "firs"]);
    assert!(asked > 100, "{asked} questions");
    // The labels are expressions: naming one is an error that says which files and why.
    let versions = histories().join("releases_by_branch/versions");
    let graph = RevisionGraph::load(&versions, true).unwrap();
    let m = graph.resolve("expand@head").unwrap_err().to_string();
    assert!(
        m.contains("cli.EXPAND_BRANCH") && m.contains("a1e5c0ffee01_expand_step.py"),
        "{m}"
    );
    // Without recursion, as Alembic without recursive_version_locations, only the top level
    // is read.
    let top = RevisionGraph::load(&versions, false).unwrap();
    assert_eq!(top.heads(), vec!["first"]);
}
