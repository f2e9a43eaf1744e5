//! The programs some tests drive besides PostgreSQL, provisioned by the tests themselves so that
//! `cargo test` passes on a fresh machine with nothing installed by hand:
//!
//! - the Python migrators (Alembic, Django, psycopg2, pinned with their dependencies in
//!   `tests/fixtures/python-requirements.txt`) go into a virtual environment of the tests' own,
//!   `target/test-tools/venv`, created on first use and reused afterwards (no network then),
//!   never into the system's Python, and isolated from whatever that Python has installed;
//! - system programs (`prometheus`, `promtool`, `openssl`) come from Debian's packages: installed
//!   with apt-get when the tests run as root, else — or with `BACKFILL_TEST_NO_INSTALL=1` — the
//!   run stops before any test with the exact command to run ([`preflight`]).
//!
//! A missing tool never lets a test pass: it is installed, or the test fails saying how to.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// Programs the tests run, each with the Debian package that provides it.
const SYSTEM_TOOLS: &[(&str, &str)] = &[
    ("prometheus", "prometheus"),
    ("promtool", "prometheus"),
    ("openssl", "openssl"),
];

/// The pinned migrators; the copy kept in the venv tells whether the venv still matches.
const REQUIREMENTS: &str = include_str!("../fixtures/python-requirements.txt");

fn requirements_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/python-requirements.txt")
}

/// `target/test-tools`: beside the build, so `cargo clean` or a fresh `CARGO_TARGET_DIR` starts
/// from nothing, and nothing outside the checkout is written.
pub fn tools_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("CARGO_TARGET_TMPDIR is inside the target directory")
        .join("test-tools")
}

/// Tells the person at the terminal what takes a while. Written to the real stderr, which the
/// test harness does not capture, so it shows while a test is waiting for it.
fn notice(msg: &str) {
    let _ = writeln!(std::io::stderr(), "backfill tests: {msg}");
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn find_in(path: &OsStr, program: &str) -> Option<PathBuf> {
    std::env::split_paths(path)
        .map(|dir| dir.join(program))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Whether this process may install Debian packages itself: as root, with apt-get, unless
/// `BACKFILL_TEST_NO_INSTALL` says not to.
fn may_install() -> bool {
    let forbidden =
        std::env::var_os("BACKFILL_TEST_NO_INSTALL").is_some_and(|v| !v.is_empty() && v != "0");
    is_root()
        && !forbidden
        && find_in(&std::env::var_os("PATH").unwrap_or_default(), "apt-get").is_some()
}

/// The command a person types to install `packages`.
pub fn apt_command(packages: &[&str]) -> String {
    let sudo = if is_root() { "" } else { "sudo " };
    format!(
        "{sudo}apt-get install -y --no-install-recommends {}",
        packages.join(" ")
    )
}

fn describe(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout).trim_end(),
        String::from_utf8_lossy(&out.stderr).trim_end()
    )
}

/// Installs Debian packages when `allowed`; otherwise, or when that fails, the error says exactly
/// what to run.
fn apt_install(packages: &[&str], why: &str, allowed: bool) -> Result<(), String> {
    let command = apt_command(packages);
    if !allowed {
        return Err(format!(
            "{why}: install with `{command}` (Debian/Ubuntu), then run the tests again"
        ));
    }
    notice(&format!(
        "{why}: running `apt-get update` and `{command}` (once)"
    ));
    let install: Vec<&str> = ["install", "-y", "-qq", "--no-install-recommends"]
        .into_iter()
        .chain(packages.iter().copied())
        .collect();
    for args in [vec!["update", "-qq"], install] {
        // Other test processes (or people) may be using apt at the same moment: wait for its lock.
        let out = Command::new("apt-get")
            .args(["-o", "DPkg::Lock::Timeout=600"])
            .args(&args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .map_err(|e| format!("{why}: apt-get could not be started ({e}); run `{command}`"))?;
        if !out.status.success() {
            return Err(format!(
                "{why}: `apt-get {}` failed ({}); run `{command}` by hand, then the tests again\n{}",
                args.join(" "),
                out.status,
                describe(&out)
            ));
        }
    }
    Ok(())
}

/// Makes sure every program in SYSTEM_TOOLS is on `path`, installing the missing ones' packages
/// when `allowed`.
pub fn ensure_system_tools(path: &OsStr, allowed: bool) -> Result<(), String> {
    let missing = |path: &OsStr| -> Vec<(&str, &str)> {
        SYSTEM_TOOLS
            .iter()
            .copied()
            .filter(|(program, _)| find_in(path, program).is_none())
            .collect()
    };
    let before = missing(path);
    if before.is_empty() {
        return Ok(());
    }
    let programs: Vec<&str> = before.iter().map(|(p, _)| *p).collect();
    let mut packages: Vec<&str> = before.iter().map(|(_, p)| *p).collect();
    packages.dedup();
    apt_install(
        &packages,
        &format!("the tests need {}, not found on PATH", programs.join(", ")),
        allowed,
    )?;
    let after = missing(path);
    if !after.is_empty() {
        let programs: Vec<&str> = after.iter().map(|(p, _)| *p).collect();
        return Err(format!(
            "{} still not on PATH after installing {}: add its directory to PATH",
            programs.join(", "),
            packages.join(" ")
        ));
    }
    Ok(())
}

/// Run before the first test: where the tests may not install what is missing (not root, or
/// `BACKFILL_TEST_NO_INSTALL`), the whole run stops at once with the one command that installs
/// it, rather than test by test. Where they may, nothing is done here: each tool is installed
/// when a test first needs it.
pub fn preflight() -> Result<(), String> {
    if may_install() {
        return Ok(());
    }
    ensure_system_tools(&std::env::var_os("PATH").unwrap_or_default(), false)
}

/// The path of `program` (one of SYSTEM_TOOLS). The first call installs every missing one at
/// once, or learns the one command that would; a test fails only if its own program is missing.
pub fn system_tool(program: &str) -> PathBuf {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    let path = std::env::var_os("PATH").unwrap_or_default();
    let ready = READY.get_or_init(|| ensure_system_tools(&path, may_install()));
    match (find_in(&path, program), ready) {
        (Some(found), _) => found,
        (None, Err(e)) => panic!("{e}"),
        (None, Ok(())) => panic!("{program} is not one of the programs the tests provision"),
    }
}

/// A command running the tests' own Python, with the pinned migrators importable and nothing of
/// the caller's Python settings.
pub fn python_command() -> Command {
    static VENV: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let python = VENV
        .get_or_init(|| provision_venv(&tools_dir().join("venv"), may_install()))
        .clone()
        .unwrap_or_else(|e| panic!("{e}"));
    isolated(&python)
}

fn isolated(python: &Path) -> Command {
    let mut c = Command::new(python);
    c.env_remove("PYTHONPATH")
        .env_remove("PYTHONHOME")
        .env("PYTHONNOUSERSITE", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1");
    c
}

fn imports_migrators(python: &Path) -> bool {
    isolated(python)
        .args(["-c", "import alembic, django, psycopg2"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether `python3` can make a virtual environment with pip in it (Debian splits `venv` and
/// `ensurepip` into the python3-venv package).
fn can_make_venvs() -> bool {
    Command::new("python3")
        .args(["-c", "import venv, ensurepip"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Creates the virtual environment at `venv` with the pinned migrators, or reuses it when it was
/// completed for the same requirements and still imports them. Returns its interpreter.
pub fn provision_venv(venv: &Path, allowed: bool) -> Result<PathBuf, String> {
    let parent = venv.parent().expect("the venv has a parent directory");
    std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    // Test processes sharing a target directory provision one at a time; the others then reuse.
    let lock_path = parent.join("venv.lock");
    let lock = File::create(&lock_path).map_err(|e| format!("{}: {e}", lock_path.display()))?;
    // SAFETY: flock on a descriptor we own; it is released when `lock` is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(format!(
            "{}: {}",
            lock_path.display(),
            std::io::Error::last_os_error()
        ));
    }
    let python = venv.join("bin").join("python");
    // Written last, so a venv whose creation was interrupted has none and is made again.
    let stamp = venv.join("backfill-requirements.txt");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == REQUIREMENTS)
        && imports_migrators(&python)
    {
        return Ok(python);
    }
    match std::fs::remove_dir_all(venv) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}; remove it by hand", venv.display())),
    }
    if !can_make_venvs() {
        apt_install(
            &["python3", "python3-venv"],
            "the migrator tests need `python3 -m venv` with pip, and it is missing",
            allowed,
        )?;
        if !can_make_venvs() {
            return Err(
                "`python3 -m venv` is still unavailable after installing python3-venv: \
                 put a Python 3 with the venv and ensurepip modules first on PATH"
                    .to_string(),
            );
        }
    }
    notice(&format!(
        "creating {} with Alembic, Django and psycopg2 from PyPI (once; about a minute)",
        venv.display()
    ));
    let out = Command::new("python3")
        .args(["-m", "venv"])
        .arg(venv)
        .env_remove("PYTHONPATH")
        .env_remove("PYTHONHOME")
        .output()
        .map_err(|e| format!("python3 could not be started ({e}): install Python 3"))?;
    if !out.status.success() {
        return Err(format!(
            "`python3 -m venv {}` failed ({}):\n{}",
            venv.display(),
            out.status,
            describe(&out)
        ));
    }
    let out = isolated(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            "--quiet",
            "-r",
        ])
        .arg(requirements_file())
        .output()
        .map_err(|e| format!("{}: {e}", python.display()))?;
    if !out.status.success() {
        return Err(format!(
            "the migrator tests need Alembic, Django and psycopg2, and pip could not install them \
             into {} ({}): they come from PyPI on first use, so check the network or pip's \
             configuration, then run the tests again\n{}",
            venv.display(),
            out.status,
            describe(&out)
        ));
    }
    if !imports_migrators(&python) {
        return Err(format!(
            "{} does not import alembic, django and psycopg2 after installing them",
            python.display()
        ));
    }
    std::fs::write(&stamp, REQUIREMENTS).map_err(|e| format!("{}: {e}", stamp.display()))?;
    Ok(python)
}

#[test]
fn the_migrators_are_the_pinned_ones_from_an_isolated_venv_that_is_reused() {
    let mut c = python_command();
    let python = PathBuf::from(c.get_program());
    assert!(
        python.starts_with(tools_dir()),
        "{} is not the tests' own venv",
        python.display()
    );
    // Exactly the pinned versions, and nothing from the system's or the user's site-packages.
    let check = "import sys, importlib.metadata as m\n\
        assert sys.prefix != sys.base_prefix, 'not a virtual environment'\n\
        leaks = [p for p in sys.path if 'packages' in p and not p.startswith(sys.prefix)]\n\
        assert not leaks, leaks\n\
        pins = [l.strip().split('==') for l in open(sys.argv[1]) if l.strip() and not l.startswith('#')]\n\
        wrong = [(n, v, m.version(n)) for n, v in pins if m.version(n) != v]\n\
        assert not wrong, wrong\n\
        print(len(pins))";
    let out = c
        .arg("-c")
        .arg(check)
        .arg(requirements_file())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "9");

    // A second provisioning (as in the next `cargo test`) reuses it: no pip, no network.
    let venv = tools_dir().join("venv");
    let stamp = venv.join("backfill-requirements.txt");
    let made = std::fs::metadata(&stamp).unwrap().modified().unwrap();
    assert_eq!(provision_venv(&venv, false).unwrap(), python);
    assert_eq!(std::fs::metadata(&stamp).unwrap().modified().unwrap(), made);
}

#[test]
fn a_missing_system_program_fails_with_the_command_that_installs_it() {
    let empty = tools_dir().join(format!("empty-path-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let err = ensure_system_tools(empty.as_os_str(), false).unwrap_err();
    let _ = std::fs::remove_dir_all(&empty);
    assert!(
        err.contains("the tests need prometheus, promtool, openssl, not found on PATH"),
        "{err}"
    );
    assert!(
        err.contains(&format!("`{}`", apt_command(&["prometheus", "openssl"]))),
        "{err}"
    );
    // With the real PATH every program is there (installed by now if it was missing).
    for (program, _) in SYSTEM_TOOLS {
        assert!(system_tool(program).is_file());
    }
}
