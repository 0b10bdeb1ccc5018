//! Every command shown in README.md's `sh` blocks runs, so that none of
//! them can rot.
//!
//! The commands run in order in one empty directory, `tandem` being the
//! binary cargo built. A command the test does not know how to run fails
//! it: each kind is handled by a rule below, and the few changes made to a
//! command are listed in [`SUBSTITUTIONS`] with the reason:
//!
//! * the first two lines (`cargo run --release -- drill`, `cargo test
//!   --workspace --release`) are checked to be there; the first runs as
//!   `tandem drill` (the built-in pull-the-plug drill, a few seconds) and
//!   must pass; the second is the suite this test is part of;
//! * `cargo bench --bench NAME`: the benchmark must exist (`benches/NAME.rs`
//!   and a `[[bench]]` in Cargo.toml); benchmarks are not run by tests;
//! * `truncate -s SIZE FILE` and `mkdir DIR` run as is;
//! * `tandem ...` runs and must end with status 0; a line ending in `&`
//!   runs in the background (a `receive` or `secondary` until it printed
//!   its address, a `run --api-socket S` until S answers) and is stopped
//!   when the test ends; the receiver must have received the VM and the
//!   secondary must have gone live (after the README's test failover);
//! * `tandem run --kernel vmlinux ...` boots the Debian kernel that
//!   `scripts/fetch-linux.sh` fetches (as `tests/linux_boot.rs` does) until
//!   its `Linux version` banner appears: a whole boot takes minutes on the
//!   emulating development machines. It is its own test.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::Proc;
use common::{TempDir, TANDEM, TIMEOUT};

/// (README text, what the test runs instead, why).
const SUBSTITUTIONS: &[(&str, &str, &str)] = &[
    (
        "--listen 0.0.0.0:4444",
        "--listen 127.0.0.1:0",
        "a fixed port may be taken on the test machine: listen on a free loopback port",
    ),
    (
        "--listen 0.0.0.0:4445",
        "--listen 127.0.0.1:0",
        "a fixed port may be taken on the test machine: listen on a free loopback port",
    ),
    (
        "HOST:4445",
        "{secondary}",
        "the address the README's `tandem secondary` printed",
    ),
    (
        "HOST:4444",
        "{receiver}",
        "the address the README's `tandem receive` printed",
    ),
    (
        "--kernel vmlinux",
        "--kernel {vmlinux}",
        "the kernel scripts/fetch-linux.sh fetched",
    ),
];

/// The commands of README.md's `sh` blocks: comments stripped, `\`
/// continuations joined, empty lines left out.
fn readme_commands() -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let mut cmds = Vec::new();
    let mut in_sh = false;
    let mut pending = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("```") {
            in_sh = !in_sh && t == "```sh";
            continue;
        }
        if !in_sh {
            continue;
        }
        let code = strip_comment(line).trim().to_string();
        if let Some(head) = code.strip_suffix('\\') {
            pending.push_str(head.trim());
            pending.push(' ');
            continue;
        }
        pending.push_str(&code);
        let cmd = std::mem::take(&mut pending).trim().to_string();
        if !cmd.is_empty() {
            cmds.push(cmd);
        }
    }
    assert!(!in_sh, "README.md: an unterminated sh block");
    cmds
}

/// The line without its `# comment` (a `#` outside double quotes).
fn strip_comment(line: &str) -> &str {
    let mut quoted = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '#' if !quoted => return &line[..i],
            _ => {}
        }
    }
    line
}

/// Split a command into words: whitespace separates, double quotes group.
/// Anything else a shell would interpret fails the test.
fn words(cmd: &str) -> Vec<String> {
    if let Some(c) = cmd
        .chars()
        .find(|c| matches!(c, '\'' | '$' | '`' | '|' | ';' | '<' | '>' | '*' | '\\'))
    {
        panic!("README command {cmd:?}: the test cannot run shell syntax {c:?}");
    }
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in cmd.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    assert!(!quoted, "README command {cmd:?}: unbalanced quotes");
    if any {
        out.push(cur);
    }
    out
}

/// Apply [`SUBSTITUTIONS`]; `{receiver}` and `{vmlinux}` from `vars`.
fn substitute(cmd: &str, vars: &[(&str, &str)]) -> String {
    let mut out = cmd.to_string();
    for (from, to, _why) in SUBSTITUTIONS {
        if !out.contains(from) {
            continue;
        }
        let mut to = to.to_string();
        for (k, v) in vars {
            to = to.replace(&format!("{{{k}}}"), v);
        }
        assert!(
            !to.contains('{'),
            "README command {cmd:?}: {from:?} needs a value the test does not have yet"
        );
        out = out.replace(from, &to);
    }
    out
}

/// Every README command the built-in guest can run, in one directory.
#[test]
fn readme_commands_run() {
    let cmds = readme_commands();
    let first: Vec<&str> = cmds.iter().take(2).map(String::as_str).collect();
    assert_eq!(
        first,
        [
            "cargo run --release -- drill",
            "cargo test --workspace --release"
        ],
        "README.md must begin with Tandem's main job on its default, then the tests"
    );
    let dir = TempDir::new("readme");
    let out = Command::new(TANDEM)
        .arg("drill")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 of 1 runs passed"),
        "README's first command, tandem drill: {}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut background: Vec<(String, Proc)> = Vec::new();
    let mut receiver: Option<String> = None;
    let mut secondary: Option<String> = None;
    let mut ran = 0;
    for cmd in &cmds[2..] {
        let w = words(cmd);
        match w[0].as_str() {
            "cargo" if w.len() == 4 && w[1] == "bench" && w[2] == "--bench" => {
                bench_exists(&w[3]);
            }
            "truncate" | "mkdir" => {
                let st = Command::new(&w[0])
                    .args(&w[1..])
                    .current_dir(dir.path())
                    .status()
                    .unwrap();
                assert!(st.success(), "{cmd}: {st}");
            }
            "tandem" if w.get(1).map(String::as_str) == Some("run") && cmd.contains("--kernel") => {
                // The Linux boot test below.
                assert!(
                    cmd.contains("--kernel vmlinux"),
                    "unknown kernel in {cmd:?}"
                );
            }
            "tandem" => {
                let mut vars = Vec::new();
                if let Some(r) = &receiver {
                    vars.push(("receiver", r.as_str()));
                }
                if let Some(r) = &secondary {
                    vars.push(("secondary", r.as_str()));
                }
                let line = substitute(cmd, &vars);
                if let Some(line) = line.strip_suffix('&') {
                    let args = &words(line)[1..];
                    let mut p = start_background(dir.path(), args);
                    match args[0].as_str() {
                        "receive" => receiver = Some(listening_on(&mut p, "waiting for a VM on ")),
                        "secondary" => {
                            secondary =
                                Some(listening_on(&mut p, "secondary waiting for a primary on "))
                        }
                        _ => {}
                    }
                    background.push((args[0].clone(), p));
                } else {
                    run_tandem_ok(dir.path(), cmd, &words(&line)[1..]);
                }
            }
            _ => panic!("README command {cmd:?}: the test does not know how to run it"),
        }
        ran += 1;
    }
    assert!(ran > 10, "only {ran} README commands found");
    for f in ["disk.img", "vm.snap", "run.tlog", "new.img", "b.img"] {
        assert!(dir.file(f).is_file(), "the README's commands made no {f}");
    }
    // The receiver got the VM and runs it; after the test failover the
    // secondary won the arbiter and runs the VM.
    for (kind, mut p) in background {
        match kind.as_str() {
            "receive" => {
                p.wait_for("VM received from a", true);
            }
            "secondary" => {
                p.wait_for("going LIVE at exit", true);
            }
            _ => {}
        }
    }
}

/// The Linux line of the README, with the fetched kernel, until the
/// kernel's banner appears.
#[test]
fn readme_linux_command_boots() {
    let cmds = readme_commands();
    let linux: Vec<&String> = cmds
        .iter()
        .filter(|c| c.starts_with("tandem run") && c.contains("--kernel"))
        .collect();
    assert_eq!(linux.len(), 1, "README's Linux commands: {linux:?}");
    let vmlinux = fetch_vmlinux();
    let line = substitute(linux[0], &[("vmlinux", vmlinux.to_str().unwrap())]);
    let dir = TempDir::new("readme-linux");
    let args: Vec<String> = words(&line)[1..].to_vec();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut p = Proc::spawn(&[], &args);
    let _ = dir;
    // Under an emulating /dev/kvm the banner takes ~25 s of CPU.
    let start = Instant::now();
    while !p.out().contains("Linux version") {
        if let Ok(Some(st)) = p.child.try_wait() {
            panic!("ended ({st}) before the banner\n{}", p.describe());
        }
        assert!(
            start.elapsed() < Duration::from_secs(8 * 60),
            "no Linux banner\n{}",
            p.describe()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// scripts/fetch-linux.sh's vmlinux (second line of its output).
fn fetch_vmlinux() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("bash")
        .arg(root.join("scripts/fetch-linux.sh"))
        .current_dir(root)
        .output()
        .expect("running scripts/fetch-linux.sh");
    assert!(
        out.status.success(),
        "scripts/fetch-linux.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let vmlinux = stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .nth(1)
        .expect("fetch-linux.sh printed no vmlinux path");
    PathBuf::from(vmlinux.trim())
}

fn bench_exists(name: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    assert!(
        root.join("benches").join(format!("{name}.rs")).is_file(),
        "README's `cargo bench --bench {name}`: no benches/{name}.rs"
    );
    let toml = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    assert!(
        toml.contains(&format!("name = \"{name}\"")),
        "README's `cargo bench --bench {name}`: no [[bench]] {name} in Cargo.toml"
    );
}

/// Run `tandem ARGS` in `dir`; it must end with status 0.
fn run_tandem_ok(dir: &Path, cmd: &str, args: &[String]) {
    let mut child = Command::new(TANDEM)
        .args(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            panic!("README command {cmd:?} did not end within {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "README command {cmd:?}: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The address a background `receive` or `secondary` printed after
/// `needle` (the rest of that line, once it is complete).
fn listening_on(p: &mut Proc, needle: &str) -> String {
    let start = Instant::now();
    let mut rest = p.wait_for(needle, true);
    while !rest.contains('\n') {
        assert!(start.elapsed() < TIMEOUT, "{}", p.describe());
        std::thread::sleep(Duration::from_millis(2));
        rest = p.wait_for(needle, true);
    }
    rest.lines().next().unwrap().trim().to_string()
}

/// Start a README command that ends in `&` and wait until it is ready (a
/// `receive` or `secondary`: see [`listening_on`]).
fn start_background(dir: &Path, args: &[String]) -> Proc {
    let strs: Vec<&str> = args.iter().map(String::as_str).collect();
    // In `dir`, as the foreground commands (GNU env's --chdir).
    let mut p = Proc::spawn(&["env", "-C", dir.to_str().unwrap()], &strs);
    match strs.first() {
        Some(&"receive") | Some(&"secondary") => {}
        Some(&"run") => {
            let i = strs
                .iter()
                .position(|a| *a == "--api-socket")
                .expect("a background `tandem run` needs --api-socket to be reached");
            let sock = dir.join(strs[i + 1]);
            let sock = sock.display();
            let start = Instant::now();
            while std::os::unix::net::UnixStream::connect(dir.join(strs[i + 1])).is_err() {
                if let Ok(Some(st)) = p.child.try_wait() {
                    panic!("ended ({st}) before serving {sock}\n{}", p.describe());
                }
                assert!(start.elapsed() < TIMEOUT, "no {sock}\n{}", p.describe());
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        _ => panic!("README background command {args:?}: the test does not know when it is ready"),
    }
    if strs.contains(&"--protect-to") {
        // Protected from boot: ready once its secondary holds the seed.
        p.wait_for("protected by the secondary", true);
    }
    p
}

/// README.md and docs/ point only at files of this repository, and those
/// files exist (a fresh clone has nothing outside it).
#[test]
fn docs_point_only_inside_the_repository() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut pages = vec![root.join("README.md")];
    for e in std::fs::read_dir(root.join("docs")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "md") {
            pages.push(p);
        }
    }
    assert!(
        root.join("docs/architecture.md").is_file(),
        "no docs/architecture.md"
    );
    for page in pages {
        let text = std::fs::read_to_string(&page).unwrap();
        let name = page.strip_prefix(root).unwrap().display().to_string();
        assert!(
            !text.contains("../shared") && !text.contains("shared/DESIGN"),
            "{name} points outside the repository"
        );
        // Markdown links `](target)` to local files.
        for (i, _) in text.match_indices("](") {
            let rest = &text[i + 2..];
            let Some(end) = rest.find(')') else { continue };
            let target = rest[..end].split('#').next().unwrap();
            if target.is_empty() || target.contains("://") {
                continue;
            }
            let file = page.parent().unwrap().join(target);
            assert!(
                file.exists(),
                "{name} links to {target}, which does not exist"
            );
            let canon = file.canonicalize().unwrap();
            assert!(
                canon.starts_with(root.canonicalize().unwrap()),
                "{name} links outside the repository: {target}"
            );
        }
    }
}
