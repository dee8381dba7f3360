//! `mqtls completions` and `mqtls man`: shell completion scripts and manual pages, generated from the very
//! clap definitions that parse the command line, so that they cannot drift from it. The Debian package runs
//! these at build time; nothing here is written by hand.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use clap::Command;
use clap_complete::Shell;

/// The manual that the pages say they belong to (the centre of the page footer).
const MANUAL: &str = "mqtls manual";

/// Prints the completion script for `shell`.
pub fn completions(cmd: Command, shell: Shell) -> ExitCode {
    print(&completion_script(cmd, shell))
}

/// Prints mqtls(1), or with `out` writes every page into that directory and names each file written.
pub fn man(cmd: Command, out: Option<&Path>) -> ExitCode {
    let mut pages = match pages(cmd) {
        Ok(p) => p,
        Err(e) => return failed(&format!("cannot render the manual pages: {e}")),
    };
    let Some(dir) = out else {
        let (_, top) = pages.swap_remove(0);
        return print(&top);
    };
    if let Err(e) = std::fs::create_dir_all(dir) {
        return failed(&format!("{}: cannot create the directory: {e}", dir.display()));
    }
    for (name, text) in &pages {
        let path = dir.join(name);
        if let Err(e) = std::fs::write(&path, text) {
            return failed(&format!("{}: cannot write: {e}", path.display()));
        }
        println!("{}", path.display());
    }
    ExitCode::SUCCESS
}

/// The completion script for `shell`, completing the binary named `mqtls`.
pub fn completion_script(mut cmd: Command, shell: Shell) -> Vec<u8> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, "mqtls", &mut script);
    script
}

/// Every manual page as (file name, roff text): mqtls.1 first, then one per subcommand at any depth
/// (`mqtls-certs-issue.1`), named as clap names the command in usage lines.
pub fn pages(cmd: Command) -> std::io::Result<Vec<(String, Vec<u8>)>> {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let mut pages = Vec::new();
    add_pages(&cmd, &mut pages)?;
    Ok(pages)
}

fn add_pages(cmd: &Command, pages: &mut Vec<(String, Vec<u8>)>) -> std::io::Result<()> {
    let man = clap_mangen::Man::new(cmd.clone()).manual(MANUAL);
    let mut text = Vec::new();
    man.render(&mut text)?;
    pages.push((man.get_filename(), text));
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        add_pages(sub, pages)?;
    }
    Ok(())
}

/// Writes to stdout; a reader that went away (`mqtls man | head`) is not an error worth a panic.
fn print(bytes: &[u8]) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => failed(&format!("cannot write to stdout: {e}")),
    }
}

fn failed(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every command reachable from `mqtls`, as the words typed to reach it (`[]`, `["certs", "issue"]`...),
    /// with the command itself.
    fn commands() -> Vec<(Vec<String>, Command)> {
        fn walk(path: Vec<String>, cmd: &Command, out: &mut Vec<(Vec<String>, Command)>) {
            out.push((path.clone(), cmd.clone()));
            for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
                let mut p = path.clone();
                p.push(sub.get_name().to_string());
                walk(p, sub, out);
            }
        }
        let mut cmd = crate::Cli::command().disable_help_subcommand(true);
        cmd.build();
        let mut out = Vec::new();
        walk(Vec::new(), &cmd, &mut out);
        out
    }

    /// The long flags a command accepts (`--help` and `--version` included where clap adds them).
    fn long_flags(cmd: &Command) -> Vec<String> {
        cmd.get_arguments()
            .filter(|a| !a.is_hide_set())
            .filter_map(|a| a.get_long())
            .map(|l| format!("--{l}"))
            .collect()
    }

    fn subcommand_names(cmd: &Command) -> Vec<String> {
        cmd.get_subcommands()
            .filter(|s| !s.is_hide_set())
            .map(|s| s.get_name().to_string())
            .collect()
    }

    /// What bash completion offers for `mqtls <words> <current>`, with the generated script loaded.
    fn bash_offers(script: &Path, words: &[String], current: &str) -> Vec<String> {
        let mut line: Vec<String> = vec!["mqtls".into()];
        line.extend(words.iter().cloned());
        line.push(current.into());
        let quoted: Vec<String> = line.iter().map(|w| format!("'{w}'")).collect();
        let program = format!(
            "source '{}'\nCOMP_WORDS=({})\nCOMP_CWORD={}\nCOMP_LINE=\"${{COMP_WORDS[*]}}\"\nCOMP_POINT=${{#COMP_LINE}}\n\
             _mqtls mqtls '{current}' '{}'\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n",
            script.display(),
            quoted.join(" "),
            line.len() - 1,
            line[line.len() - 2],
        );
        let out = std::process::Command::new("bash")
            .args(["--norc", "--noprofile", "-c", &program])
            .output()
            .expect("run bash");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let mut offers: Vec<String> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        offers.sort();
        offers
    }

    #[test]
    fn bash_completes_every_subcommand_and_every_flag_of_each() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("mqtls.bash");
        std::fs::write(&script, completion_script(crate::Cli::command(), Shell::Bash)).unwrap();
        for (path, cmd) in commands() {
            let mut flags = long_flags(&cmd);
            flags.sort();
            assert_eq!(
                bash_offers(&script, &path, "--"),
                flags,
                "flags of `mqtls {}`",
                path.join(" ")
            );
            let offered = bash_offers(&script, &path, "");
            for sub in subcommand_names(&cmd) {
                assert!(
                    offered.contains(&sub),
                    "`mqtls {} <TAB>` does not offer {sub}: {offered:?}",
                    path.join(" ")
                );
            }
        }
    }

    #[test]
    fn every_completion_script_names_every_subcommand_and_flag() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish, Shell::Elvish, Shell::PowerShell] {
            let script = String::from_utf8(completion_script(crate::Cli::command(), shell)).unwrap();
            for (path, cmd) in commands() {
                for word in subcommand_names(&cmd).iter().chain(&long_flags(&cmd)) {
                    let bare = word.trim_start_matches('-');
                    assert!(
                        script.contains(bare),
                        "{shell} completions lack {word} of `mqtls {}`",
                        path.join(" ")
                    );
                }
            }
        }
    }

    #[test]
    fn every_subcommand_has_a_page_that_lists_each_of_its_flags() {
        let pages = pages(crate::Cli::command()).unwrap();
        let commands = commands();
        assert_eq!(pages.len(), commands.len(), "one page per command");
        for (path, cmd) in commands {
            let name = std::iter::once("mqtls".to_string())
                .chain(path.iter().cloned())
                .collect::<Vec<_>>();
            let file = format!("{}.1", name.join("-"));
            let (_, text) = pages
                .iter()
                .find(|(f, _)| *f == file)
                .unwrap_or_else(|| panic!("no page {file}"));
            let text = String::from_utf8(text.clone()).unwrap();
            assert!(text.contains("\n.TH "), "{file} is not a man page");
            for flag in long_flags(&cmd) {
                // roff escapes the dashes: \-\-out
                let roff = flag.replace('-', "\\-");
                assert!(text.contains(&roff), "{file} lacks {flag}");
            }
            for sub in subcommand_names(&cmd) {
                let page = format!("{}-{sub}(1)", name.join("-")).replace('-', "\\-");
                assert!(text.contains(&page), "{file} does not refer to {sub}");
            }
        }
    }
}
