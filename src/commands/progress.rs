//! What `tandem migrate` shows while it waits, and its Ctrl-C.
//!
//! Progress: a live status line (indicatif) when stderr is a terminal;
//! otherwise plain lines on stdout, one per round or phase and at most one
//! a second in between; with `--json` every progress event as a line.
//!
//! Ctrl-C (SIGINT): the first asks the VM, on a second connection to its
//! control socket, to cancel the migration; the VM stops it before the
//! switchover and the guest goes on at the source as it was. The command
//! then reports the outcome. A second Ctrl-C ends the command at once
//! (status 130) without waiting for that report.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use primary::migration::Progress;
use signal_hook::consts::SIGINT;
use signal_hook::SigId;

use crate::api::{self, Event, Request};

/// Plain progress lines come at most this often within one round.
const LINE_EVERY: Duration = Duration::from_secs(1);

enum Mode {
    Json,
    Bar(ProgressBar),
    Lines,
}

/// The progress display of one `tandem migrate`.
pub struct Display {
    mode: Mode,
    last_line: Option<Instant>,
    last_key: Option<(String, u32)>,
    noted: bool,
}

impl Display {
    pub fn new(json: bool) -> Self {
        use std::io::IsTerminal;
        let mode = if json {
            Mode::Json
        } else if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template("{spinner} {elapsed:>4} {wide_msg}") {
                bar.set_style(style);
            }
            bar.enable_steady_tick(Duration::from_millis(100));
            Mode::Bar(bar)
        } else {
            Mode::Lines
        };
        Display {
            mode,
            last_line: None,
            last_key: None,
            noted: false,
        }
    }

    /// A progress event; `line` is its human form.
    pub fn progress(&mut self, p: &Progress, line: &str) {
        if let (Some(note), false) = (&p.note, self.noted) {
            self.noted = true;
            let text = format!("tandem: note: {note}");
            match &self.mode {
                Mode::Json => {}
                Mode::Bar(bar) => bar.println(text),
                Mode::Lines => eprintln!("{text}"),
            }
        }
        match &self.mode {
            Mode::Json => println!(
                "{}",
                serde_json::to_string(&Event::Progress(p.clone())).unwrap_or_default()
            ),
            Mode::Bar(bar) => bar.set_message(line.trim_start().to_string()),
            Mode::Lines => {
                let key = (p.phase.clone(), p.round);
                let due = self.last_line.is_none_or(|t| t.elapsed() >= LINE_EVERY);
                if self.last_key.as_ref() != Some(&key) || due {
                    println!("{line}");
                    self.last_key = Some(key);
                    self.last_line = Some(Instant::now());
                }
            }
        }
    }

    /// The end: the live line goes away.
    pub fn finish(&mut self) {
        if let Mode::Bar(bar) = &self.mode {
            bar.finish_and_clear();
        }
    }
}

/// Ctrl-C handling for the duration of one `tandem migrate`.
pub struct CtrlC {
    hit: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
    ids: Vec<SigId>,
    watcher: Option<JoinHandle<()>>,
}

impl CtrlC {
    /// From now on the first Ctrl-C cancels the `what` ("migration") of
    /// the VM at `sock`; a second one exits with status 130.
    pub fn install(sock: &Path, what: &'static str) -> std::io::Result<CtrlC> {
        let hit = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        // Order matters: the exit only once the flag is already set.
        let ids = vec![
            signal_hook::flag::register_conditional_shutdown(SIGINT, 130, hit.clone())?,
            signal_hook::flag::register(SIGINT, hit.clone())?,
        ];
        let sock = sock.to_path_buf();
        let (h, d) = (hit.clone(), done.clone());
        let watcher = std::thread::Builder::new()
            .name("ctrl-c".into())
            .spawn(move || watch(&sock, what, &h, &d))?;
        Ok(CtrlC {
            hit,
            done,
            ids,
            watcher: Some(watcher),
        })
    }

    /// The command has its answer: stop watching. Returns whether Ctrl-C
    /// was pressed.
    pub fn finish(mut self) -> bool {
        self.done.store(true, Ordering::SeqCst);
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
        self.hit.load(Ordering::SeqCst)
    }
}

/// Wait for Ctrl-C, then ask the VM to cancel until it accepts (a request
/// just sent may not have started its migration yet).
fn watch(sock: &Path, what: &str, hit: &AtomicBool, done: &AtomicBool) {
    while !hit.load(Ordering::SeqCst) {
        if done.load(Ordering::SeqCst) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("tandem: cancelling the {what} (Ctrl-C again to stop waiting)");
    while !done.load(Ordering::SeqCst) {
        let mut accepted = false;
        let _ = api::call(sock, &Request::Cancel, |ev| {
            accepted = matches!(ev, Event::Ok);
            false
        });
        if accepted {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
