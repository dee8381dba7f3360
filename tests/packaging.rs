//! What a user meets first, tested on the binary: `--version` with its commit, the generated manual pages
//! and completion scripts, and the demo stopped with Ctrl-C the way the README says to stop it.
//! (`scripts/package-test.sh` tests the Debian package itself; it needs root and a Debian tree.)

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_mqtls");

/// How long a step may take on a loaded machine before the test gives up (never a pass condition).
const GUARD: Duration = Duration::from_secs(90);

fn mqtls(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().expect("run mqtls")
}

fn stdout(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("UTF-8")
}

/// The commit `git` reports for this source tree, if it is a git work tree of its own.
fn git_head() -> Option<String> {
    let dir = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| {
        let out = Command::new("git").args(args).current_dir(dir).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let top = PathBuf::from(git(&["rev-parse", "--show-toplevel"])?);
    if top.canonicalize().ok()? != PathBuf::from(dir).canonicalize().ok()? {
        return None;
    }
    git(&["rev-parse", "--short=12", "HEAD"])
}

#[test]
fn version_names_the_release_and_the_commit_it_was_built_from() {
    let text = stdout(&mqtls(&["--version"]));
    let expected = match option_env!("MQTLS_COMMIT")
        .filter(|c| !c.is_empty())
        .map(String::from)
        .or_else(git_head)
    {
        Some(commit) => format!("mqtls {} (git {commit})\n", env!("CARGO_PKG_VERSION")),
        None => format!("mqtls {}\n", env!("CARGO_PKG_VERSION")),
    };
    assert_eq!(text, expected);
}

#[test]
fn man_writes_one_page_per_command_and_prints_the_main_page() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("man1");
    let listed = stdout(&mqtls(&["man", "--out", out.to_str().unwrap()]));
    let mut written: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    written.sort();
    for page in [
        "mqtls.1",
        "mqtls-run.1",
        "mqtls-check.1",
        "mqtls-certs.1",
        "mqtls-certs-init-ca.1",
        "mqtls-certs-issue.1",
        "mqtls-certs-csr.1",
        "mqtls-certs-list.1",
        "mqtls-completions.1",
        "mqtls-man.1",
    ] {
        assert!(written.iter().any(|w| w == page), "no {page} in {written:?}");
        assert!(
            listed.contains(&out.join(page).display().to_string()),
            "{page} not listed:\n{listed}"
        );
    }
    assert!(
        !written.iter().any(|w| w.contains("help")),
        "a page for clap's help: {written:?}"
    );
    let main = stdout(&mqtls(&["man"]));
    assert_eq!(main.as_bytes(), std::fs::read(out.join("mqtls.1")).unwrap());
}

#[test]
fn bash_accepts_the_completion_script_and_it_completes_subcommands() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("mqtls.bash");
    std::fs::write(&script, stdout(&mqtls(&["completions", "bash"]))).unwrap();
    let program = format!(
        "source '{}' && COMP_WORDS=(mqtls c) && COMP_CWORD=1 && _mqtls mqtls c mqtls && echo \"${{COMPREPLY[*]}}\"",
        script.display()
    );
    let out = Command::new("bash")
        .args(["--norc", "--noprofile", "-c", &program])
        .output()
        .unwrap();
    assert_eq!(stdout(&out).trim(), "check certs completions");
}

#[test]
fn completions_for_an_unknown_shell_is_a_usage_error() {
    let out = mqtls(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("possible values: bash"));
}

/// The demo binary that `scripts/demo.sh` runs, built as that script builds it (`cargo test --all-targets`
/// compiles examples as test harnesses, not as the program; cargo holds no lock while tests run).
fn demo_binary() -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(["build", "--locked", "--quiet", "--example", "demo"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo");
    assert!(
        out.status.success(),
        "cargo build --example demo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let demo = PathBuf::from(BIN).with_file_name("examples").join("demo");
    assert!(demo.exists(), "cargo built no {}", demo.display());
    demo
}

/// The demo's stdout, line by line, from a thread.
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Reads lines into `seen` until `done(seen)` holds.
fn read_until(lines: &mpsc::Receiver<String>, seen: &mut Vec<String>, what: &str, done: impl Fn(&[String]) -> bool) {
    let deadline = Instant::now() + GUARD;
    while !done(seen) {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => panic!("never: {what}; the demo printed:\n{}", seen.join("\n")),
        }
    }
}

/// Everything the demo's summary checks has happened: boiler-1 published, mqtls reloaded boiler-2's
/// rotated certificate, and boiler-2 published after that.
fn everything_happened(seen: &[String]) -> bool {
    let reloaded = seen
        .iter()
        .position(|l| l.contains("configuration reloaded") && l.contains("renewed=boiler-2"));
    let boiler1 = seen.iter().any(|l| l.contains("observer <- sensors/boiler-1/"));
    let boiler2_after = reloaded.is_some_and(|at| {
        seen[at..]
            .iter()
            .any(|l| l.contains("observer <- sensors/boiler-2/") && !l.contains("spoof"))
    });
    boiler1 && boiler2_after
}

#[test]
fn demo_stopped_with_ctrl_c_prints_its_summary_and_exits_0() {
    // Its own process group, as a shell gives a foreground job: Ctrl-C is SIGINT to the whole group.
    let mut child = Command::new(demo_binary())
        .env("MQTLS_BIN", BIN)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the demo");
    let group = child.id() as i32;
    let lines = lines_of(&mut child);
    let mut seen = Vec::new();
    read_until(&lines, &mut seen, "the demo says how to stop it", |s| {
        s.iter().any(|l| l.contains("Ctrl-C stops the demo"))
    });
    read_until(&lines, &mut seen, "everything the summary checks", everything_happened);

    // SAFETY: kill(2) with a negative pid signals that process group; no memory is involved.
    assert_eq!(unsafe { libc::kill(-group, libc::SIGINT) }, 0, "kill -INT -{group}");
    read_until(&lines, &mut seen, "the demo's last line", |s| {
        s.last().is_some_and(|l| l.contains("nothing left running"))
    });
    let deadline = Instant::now() + GUARD;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the demo did not exit after its summary");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    let text = seen.join("\n");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(text.contains("Ctrl-C: stopping the demo"), "{text}");
    let summary = &text[text.find("== summary ==").expect("a summary")..];
    assert!(!summary.contains("FAILED"), "{summary}\n{stderr}");
    assert!(summary.contains("[ok] mqtls stopped cleanly (exit 0)"), "{summary}");
    assert!(status.success(), "{status:?}\n{text}\n{stderr}");
}

#[test]
fn certs_list_shows_the_client_id_each_device_is_matched_by() {
    let dir = tempfile::tempdir().unwrap();
    let path = |p: &str| dir.path().join(p).to_str().unwrap().to_string();
    stdout(&mqtls(&["certs", "init-ca", "--out", &path("ca")]));
    let (ca, devices) = (path("ca"), path("devices"));
    let issue = |name: &str, extra: &[&str]| {
        let mut args = vec!["certs", "issue", "--ca", &ca, "--out", &devices];
        args.extend_from_slice(extra);
        args.push(name);
        stdout(&Command::new(BIN).args(&args).output().unwrap());
    };
    issue("boiler-7", &["--client-id", "BOILER 7 legacy"]);
    issue("meter-3", &[]);
    stdout(&mqtls(&["certs", "csr", "--out", &path("devices"), "waiting"]));

    let table = stdout(&mqtls(&["certs", "list", "--dir", &path("devices")]));
    let header = table.lines().next().unwrap();
    assert!(
        header.starts_with("NAME") && header.contains("  CLIENT ID  "),
        "{table}"
    );
    let column = header.find("CLIENT ID").unwrap();
    let client_id = |name: &str| {
        let line = table.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap();
        line[column..].split("  ").next().unwrap().to_string()
    };
    assert_eq!(client_id("boiler-7"), "BOILER 7 legacy", "{table}");
    assert_eq!(client_id("meter-3"), "meter-3", "{table}");
    assert_eq!(client_id("waiting"), "waiting", "{table}");

    let json = stdout(&mqtls(&["certs", "list", "--dir", &path("devices"), "--json"]));
    let rows: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    let ids: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r["name"].as_str().unwrap(), r["client_id"].as_str().unwrap()))
        .collect();
    assert_eq!(
        ids,
        [
            ("boiler-7", "BOILER 7 legacy"),
            ("meter-3", "meter-3"),
            ("waiting", "waiting")
        ]
    );
}
