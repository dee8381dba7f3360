//! Puts the git commit into `mqtls --version` (`0.1.0 (git 1a2b3c4d5e6f)`), so that a binary found on a
//! gateway says which source it was built from.
//!
//! The commit comes from `MQTLS_COMMIT` when set (a package build from a tarball can pass it), else from
//! `git rev-parse`, but only when this crate is the top of the git work tree: a crate unpacked inside
//! some other repository must not claim that repository's commit. Without either, the version is the bare
//! `CARGO_PKG_VERSION`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=MQTLS_COMMIT");
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let commit = std::env::var("MQTLS_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(|| git_commit(&manifest_dir));
    let full = match commit {
        Some(c) => format!("{version} (git {})", c.trim()),
        None => version,
    };
    println!("cargo:rustc-env=MQTLS_VERSION={full}");
}

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).current_dir(dir).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    Some(text.trim().to_string()).filter(|t| !t.is_empty())
}

fn git_commit(dir: &Path) -> Option<String> {
    let top = git(dir, &["rev-parse", "--show-toplevel"])?;
    let same = |a: &Path, b: &Path| a.canonicalize().ok() == b.canonicalize().ok();
    if !same(Path::new(&top), dir) {
        return None;
    }
    let commit = git(dir, &["rev-parse", "--short=12", "HEAD"])?;
    // Run again when HEAD moves: HEAD itself (a checkout) and the branch it points to (a commit). Both
    // paths exist, so an unchanged checkout does not rebuild.
    for name in ["HEAD", &git(dir, &["symbolic-ref", "-q", "HEAD"]).unwrap_or_default()] {
        if name.is_empty() {
            continue;
        }
        if let Some(p) = git(dir, &["rev-parse", "--git-path", name]) {
            let p = dir.join(p);
            if p.exists() {
                println!("cargo:rerun-if-changed={}", p.display());
            }
        }
    }
    Some(commit)
}
