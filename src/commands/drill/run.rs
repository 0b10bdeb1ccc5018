//! One run of a drill: build the hosts, start the VM and the clients,
//! inject the faults when their time comes, then check from the clients'
//! side what the drill expects.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use rand::{RngExt, SeedableRng};
use serde::Serialize;

use super::procs::{output, Proc, WaitError, WaitResult};
use super::scenario::{ClientKind, CountedFrom, FaultKind, Scenario, Trigger, WorkloadKind};

mod arbiter;
mod console;
mod failover;
mod lag;
mod partition;
use super::topo::{LinkSpec, Topology, TAP};

/// The guest's MAC (its RARP announcements after a migration carry it).
const MAC: &str = "52:54:00:d1:11:01";
/// The longest a VM may take to boot, a receiver to listen, a migration
/// to switch over: generous bounds that only turn a hang into a failure.
const BOOT: Duration = Duration::from_secs(180);
const STEP: Duration = Duration::from_secs(120);
/// The client script (Python smtplib/poplib), shipped in the repository.
const CLIENT: &str = include_str!("../../../tests/mail_client.py");

/// What the run saw of the messages.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Messages {
    /// Messages the clients started to send.
    pub sent: u32,
    /// Messages the server acknowledged (250 after DATA).
    pub acknowledged: u32,
    /// Messages in the mailbox afterwards, byte for byte as sent.
    pub found: u32,
    /// Acknowledged but not found (or not intact).
    pub lost: u32,
    /// Found but different from what was sent.
    pub corrupted: u32,
    /// Found although never acknowledged (the one in flight at a reset).
    pub found_unacknowledged: u32,
    /// Messages no client sent.
    pub foreign: u32,
}

/// One fault as it happened.
#[derive(Debug, Clone, Serialize)]
pub struct FaultReport {
    pub kind: String,
    /// Does the secondary go live after it (its gap is a failover gap)?
    pub fails_over: bool,
    /// Its trigger, as drawn for this run.
    pub trigger: Trigger,
    /// Acknowledged messages when it fired.
    pub at_messages: u32,
    /// Time since the clients started (ms) when it fired.
    pub at_ms: f64,
    /// Hosts involved (migrate: from, to).
    pub detail: String,
    /// How long the fault's own work took (migrate: the whole migration).
    pub took_ms: f64,
    /// The VM's downtime (migrate: what `tandem migrate` measured).
    pub downtime_ms: Option<f64>,
    /// The longest pause a client saw across it: from its last
    /// acknowledgement before the fault to its next one.
    pub client_gap_ms: Option<f64>,
    /// A failover: the new primary's own measure, from the old one's
    /// last sign of life to its first guest output (ms).
    pub vmm_gap_ms: Option<f64>,
    /// A partition that made the arbiter decide: who won it
    /// (`primary`: it runs on alone; `secondary`: it went live), the
    /// other side stopped.
    pub winner: Option<String>,
    /// What went wrong (the fault did not happen as planned).
    pub error: Option<String>,
}

impl FaultReport {
    /// A fault of `kind` that fired at `trigger`, `at_messages` and
    /// `at_ms` into the run; the rest is filled in as it happens.
    fn new(kind: FaultKind, trigger: Trigger, at_messages: u32, at_ms: f64) -> FaultReport {
        FaultReport {
            kind: kind.name().into(),
            fails_over: kind.fails_over(),
            trigger,
            at_messages,
            at_ms,
            detail: String::new(),
            took_ms: 0.0,
            downtime_ms: None,
            client_gap_ms: None,
            vmm_gap_ms: None,
            winner: None,
            error: None,
        }
    }
}

/// A protected VM's numbers, from its primary's and secondary's own
/// reports at the end of the run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Protection {
    /// Log bytes streamed to the secondary.
    pub log_bytes: u64,
    /// Their rate over the run (bit/s).
    pub log_bit_s: f64,
    /// Outputs (frames, console) released after the secondary's
    /// acknowledgement.
    pub outputs_released: u64,
    /// Latency the Output Rule added to them (ms).
    pub added_latency_p50_ms: f64,
    pub added_latency_p99_ms: f64,
    /// The final state digests of the primary and the secondary.
    pub primary_digest: Option<String>,
    pub secondary_digest: Option<String>,
}

/// One expectation, checked.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    /// What was seen.
    pub seen: String,
}

/// Everything one run saw.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub run: u32,
    pub seed: u64,
    pub passed: bool,
    pub messages: Messages,
    pub connections: u32,
    pub connections_reset: u32,
    /// What each reset connection reported.
    pub resets: Vec<String>,
    /// VM copies running (serving) when the drill ended.
    pub live_copies: u32,
    /// What lockstep protection cost and kept (a protected VM).
    pub protection: Option<Protection>,
    /// A console workload: what its console showed.
    pub console: Option<console::ConsoleReport>,
    /// A protected VM: its secondaries' lag and log bandwidth, from their
    /// `tandem status` every 100 ms.
    pub secondary: Option<lag::SecondaryStats>,
    /// Longest pause between two acknowledgements of one connection (ms).
    pub max_gap_ms: f64,
    pub faults: Vec<FaultReport>,
    pub checks: Vec<Check>,
    /// Why the run could not be completed (setup or a step failed).
    pub error: Option<String>,
    /// The run's directory (consoles, logs, disks), when kept.
    pub dir: Option<String>,
    pub duration_s: f64,
}

/// What a run needs from the command.
pub struct Ctx<'a> {
    pub scn: &'a Scenario,
    pub tandem: PathBuf,
    pub wan: Option<PathBuf>,
    pub stop: &'a AtomicBool,
    pub keep: bool,
    pub progress: &'a dyn Fn(&str),
    /// Hosts as processes over loopback, not namespaces (not root: a
    /// console workload only).
    pub loopback: bool,
    /// A console workload: the unfailed run's console.
    pub reference: Option<Vec<u8>>,
}

/// A client connection: its process and what it printed.
struct Conn {
    proc: Proc,
}

impl Conn {
    /// (seed, time) of each acknowledged message.
    fn acks(&self) -> Vec<(u32, Instant)> {
        let l = self.proc.out.lock().unwrap_or_else(|e| e.into_inner());
        l.iter()
            .filter_map(|(t, line)| Some((line.strip_prefix("sent ")?.trim().parse().ok()?, *t)))
            .collect()
    }
    fn count(&self, prefix: &str) -> u32 {
        let l = self.proc.out.lock().unwrap_or_else(|e| e.into_inner());
        l.iter()
            .filter(|(_, line)| line.starts_with(prefix))
            .count() as u32
    }
    fn error(&self) -> Option<String> {
        let l = self.proc.out.lock().unwrap_or_else(|e| e.into_inner());
        l.iter()
            .find_map(|(_, line)| line.strip_prefix("error ").map(str::to_string))
    }
}

/// The state of one run.
struct Run<'a> {
    ctx: &'a Ctx<'a>,
    dir: PathBuf,
    /// The VMM running the VM now, its host and control socket.
    vm: Option<Proc>,
    at: usize,
    sock: PathBuf,
    /// The secondary of a protected VM, its host and control socket.
    secondary: Option<Proc>,
    secondary_at: usize,
    secondary_sock: PathBuf,
    /// A fault killed it.
    secondary_killed: bool,
    /// VMMs that ran the VM before (a migrated source ends).
    retired: Vec<Proc>,
    /// Secondaries that stopped after losing the arbiter (a partition).
    stopped: Vec<Proc>,
    /// Asks the secondary for its lag.
    sampler: Option<lag::Sampler>,
    /// The etcd arbiter (a drill with `[arbiter] kind = "etcd"`).
    etcd: Option<Proc>,
    conns: Vec<Conn>,
    started: Instant,
    /// When each fault started and ended.
    fault_times: Vec<(Instant, Instant)>,
    spawned: u32,
    /// Last: dropped after every process in it was killed.
    topo: Topology,
}

fn host_index(scn: &Scenario, name: &str) -> usize {
    scn.hosts
        .iter()
        .position(|h| h.name == name)
        .expect("validated host name")
}

/// Run the drill once with `seed`; Err only when interrupted.
pub fn run_once(ctx: &Ctx, run: u32, seed: u64) -> Result<RunReport, ()> {
    let t0 = Instant::now();
    let dir = std::env::temp_dir().join(format!("tandem-drill-{}-{run}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut report = RunReport {
        run,
        seed,
        passed: false,
        messages: Messages::default(),
        connections: ctx.scn.client.as_ref().map_or(0, |c| c.connections),
        connections_reset: 0,
        resets: Vec::new(),
        live_copies: 0,
        protection: None,
        console: None,
        secondary: None,
        max_gap_ms: 0.0,
        faults: Vec::new(),
        checks: Vec::new(),
        error: None,
        dir: None,
        duration_s: 0.0,
    };
    let interrupted = match drive(ctx, run, seed, &dir, &mut report) {
        Ok(()) => false,
        Err(WaitError::Interrupted) => true,
        Err(WaitError::Failed(e)) => {
            report.error = Some(e);
            false
        }
    };
    report.passed = report.error.is_none() && report.checks.iter().all(|c| c.passed);
    if interrupted && !ctx.keep {
        let _ = std::fs::remove_dir_all(&dir);
    } else if ctx.keep || !report.passed {
        report.dir = Some(dir.display().to_string());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    report.duration_s = t0.elapsed().as_secs_f64();
    if interrupted {
        Err(())
    } else {
        Ok(report)
    }
}

fn drive(ctx: &Ctx, run: u32, seed: u64, dir: &Path, report: &mut RunReport) -> WaitResult<()> {
    let scn = ctx.scn;
    std::fs::create_dir_all(dir)
        .map_err(|e| WaitError::Failed(format!("creating {}: {e}", dir.display())))?;
    (ctx.progress)("building the hosts");
    let links: Vec<LinkSpec> = scn
        .links
        .iter()
        .map(|l| LinkSpec {
            a: host_index(scn, &l.between[0]),
            b: host_index(scn, &l.between[1]),
            rtt_ms: l.rtt_ms,
            loss_percent: l.loss_percent,
            rate: l.rate.clone(),
        })
        .collect();
    let topo = if ctx.loopback {
        Topology::loopback(scn.hosts.len())
    } else {
        Topology::build(
            &run.to_string(),
            scn.hosts.len(),
            &links,
            ctx.wan.as_deref(),
            seed,
        )
        .map_err(WaitError::Failed)?
    };
    let at = host_index(scn, &scn.vm.host);
    let mut r = Run {
        ctx,
        dir: dir.to_path_buf(),
        topo,
        vm: None,
        at,
        sock: dir.join("vm0.sock"),
        secondary: None,
        secondary_at: 0,
        secondary_sock: dir.join("secondary.sock"),
        secondary_killed: false,
        retired: Vec::new(),
        stopped: Vec::new(),
        sampler: None,
        etcd: None,
        conns: Vec::new(),
        started: Instant::now(),
        fault_times: Vec::new(),
        spawned: 0,
    };
    let result = r.go(seed, report);
    report.secondary = r.sampler.as_mut().and_then(lag::Sampler::finish);
    r.save_outputs();
    result
}

impl Run<'_> {
    fn tandem(&self) -> Command {
        Command::new(&self.ctx.tandem)
    }

    fn in_host(&self, h: usize) -> Command {
        Topology::command(&self.topo.hosts[h], &self.ctx.tandem)
    }

    fn creds(&self, h: usize) -> Vec<String> {
        let pki = self.dir.join("pki");
        let name = &self.ctx.scn.hosts[h].name;
        vec![
            "--ca".into(),
            pki.join("ca.pem").display().to_string(),
            "--cert".into(),
            pki.join(format!("{name}.pem")).display().to_string(),
            "--key".into(),
            pki.join(format!("{name}.key")).display().to_string(),
        ]
    }

    fn run_ok(&self, mut cmd: Command, what: &str) -> WaitResult<String> {
        cmd.env_remove("TANDEM_LOG");
        let (code, out, err) = output(cmd).map_err(WaitError::Failed)?;
        if code != 0 {
            return Err(WaitError::Failed(format!(
                "{what} failed (status {code}): {}",
                err.trim()
            )));
        }
        Ok(out)
    }

    fn disk(&self, k: u32) -> WaitResult<PathBuf> {
        let p = self.dir.join(format!("disk{k}.img"));
        let f = std::fs::File::create(&p)
            .and_then(|f| f.set_len(self.ctx.scn.vm.disk_mib << 20).map(|_| f));
        f.map_err(|e| WaitError::Failed(format!("creating {}: {e}", p.display())))?;
        Ok(p)
    }

    fn go(&mut self, seed: u64, report: &mut RunReport) -> WaitResult<()> {
        let scn = self.ctx.scn;
        let stop = self.ctx.stop;
        // Certificates: one CA, one certificate per host naming its
        // link addresses.
        let pki = self.dir.join("pki");
        let mut c = self.tandem();
        c.args(["certs", "init", "--dir"]).arg(&pki);
        self.run_ok(c, "tandem certs init")?;
        for (h, host) in scn.hosts.iter().enumerate() {
            let mut c = self.tandem();
            c.args(["certs", "issue", "--dir"])
                .arg(&pki)
                .args(["--name", &host.name]);
            for a in self.topo.addrs_of(h) {
                c.args(["--san", &a]);
            }
            self.run_ok(c, "tandem certs issue")?;
        }

        if let Some(h) = self.etcd_host() {
            (self.ctx.progress)(&format!(
                "starting etcd (the arbiter) on host {}",
                scn.hosts[h].name
            ));
            self.start_arbiter()?;
        }

        let mail = scn.workload() == WorkloadKind::Mail;
        (self.ctx.progress)(&format!(
            "booting the {} VM on host {}",
            if mail { "mail" } else { "console" },
            scn.vm.host
        ));
        let mut c = self.in_host(self.at);
        c.args(["run", "--cmdline", &scn.vm.workload]);
        // A protected VM that migrates switches over to its secondary
        // (`tandem switchover`): it needs the full control socket of a VM
        // protected while it runs (`tandem protect`), right after boot.
        let switching =
            scn.vm.secondary.is_some() && scn.faults.iter().any(|f| f.kind == FaultKind::Migrate);
        if let (Some(sec), false) = (&scn.vm.secondary, switching) {
            let addr = self.start_secondary(host_index(scn, sec))?;
            c.args(["--protect-to", &addr]).args(self.creds(self.at));
            c.args(self.arbiter_args(self.at)?);
        }
        // A protected primary with a control socket is seeded before its
        // first instruction (its end report is then the seeded one's, and
        // SIGTERM ends it without one): only a drill whose test failover
        // needs the socket gets one.
        if scn.vm.secondary.is_none()
            || switching
            || scn.faults.iter().any(|f| f.kind == FaultKind::Failover)
        {
            c.arg("--api-socket").arg(&self.sock);
        }
        if mail {
            let disk = self.disk(0)?;
            c.args(["--net", &format!("tap={TAP},mac={MAC}"), "--disk"])
                .arg(&disk);
        }
        c.args(["--mem-mib", &scn.vm.mem_mib.to_string()])
            .env_remove("TANDEM_LOG");
        let what = format!("the VM on host {}", scn.vm.host);
        let mut vm = Proc::spawn(&what, c).map_err(WaitError::Failed)?;
        if let (Some(sec), true) = (&scn.vm.secondary, switching) {
            let start = Instant::now();
            while !self.sock.exists() && vm.ended().is_none() && start.elapsed() < STEP {
                std::thread::sleep(Duration::from_millis(5));
            }
            self.protect_vm(host_index(scn, sec))?;
        }
        if !mail {
            // The console is the client: counting starts at its first line.
            vm.wait_line("", false, BOOT, stop)?;
            self.started = Instant::now();
            self.vm = Some(vm);
            return self.faults_then_check(seed, report, None);
        }
        vm.wait_line("mail ready", false, BOOT, stop)?;
        self.vm = Some(vm);
        let client = scn.mail_client();

        (self.ctx.progress)("clients sending");
        let script = self.dir.join("mail_client.py");
        std::fs::write(&script, CLIENT)
            .map_err(|e| WaitError::Failed(format!("writing {}: {e}", script.display())))?;
        let stopfile = self.dir.join("stop-clients");
        let sizes: Vec<String> = client.sizes.iter().map(u32::to_string).collect();
        let sizes = sizes.join(",");
        self.started = Instant::now();
        for k in 1..=client.connections {
            let mut c = Topology::command(&self.topo.client_ns, Path::new("python3"));
            c.arg(&script)
                .args([
                    match client.kind {
                        ClientKind::Smtplib => "drill",
                        ClientKind::Swaks => "swaks",
                    },
                    &k.to_string(),
                    &sizes,
                ])
                .arg(&stopfile)
                .args([&client.messages.to_string(), &client.pace_ms.to_string()]);
            let proc =
                Proc::spawn(&format!("client connection {k}"), c).map_err(WaitError::Failed)?;
            self.conns.push(Conn { proc });
        }
        self.faults_then_check(seed, report, Some((&script, &sizes)))
    }

    /// Inject the faults when their time comes, then let the work finish
    /// and check it (`mail`: the client script and the sizes it sends).
    fn faults_then_check(
        &mut self,
        seed: u64,
        report: &mut RunReport,
        mail: Option<(&Path, &str)>,
    ) -> WaitResult<()> {
        let scn = self.ctx.scn;
        let stop = self.ctx.stop;

        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut pick = |lo: u64, hi: u64| {
            if lo == hi {
                lo
            } else {
                rng.random_range(lo..=hi)
            }
        };
        let mut base_msgs = 0;
        let mut base_t = self.started;
        let mut next = 0;
        'faults: while next < scn.faults.len() {
            let f = &scn.faults[next];
            // The partitions that overlap this one (each counted from the
            // start of the one before) are carried out with it.
            let overlapping = &scn.faults[next + 1..][..scn.faults[next + 1..]
                .iter()
                .take_while(|g| g.counted_from == CountedFrom::Start)
                .count()];
            next += 1 + overlapping.len();
            for _ in 0..f.repeat {
                let trigger = f.when.resolve(&mut pick);
                loop {
                    let acked = self.work_seen();
                    let due = match trigger {
                        Trigger::Messages(n) | Trigger::Lines(n) => acked >= base_msgs + n,
                        Trigger::Ms(ms) => base_t.elapsed() >= Duration::from_millis(ms),
                    };
                    if due {
                        break;
                    }
                    if self.work_done() {
                        let at = ms(self.started.elapsed());
                        report.faults.push(FaultReport {
                            error: Some(format!(
                                "never fired: the work was done after {acked} {}",
                                if mail.is_some() {
                                    "acknowledged messages"
                                } else {
                                    "console lines"
                                }
                            )),
                            ..FaultReport::new(f.kind, trigger, acked, at)
                        });
                        break 'faults;
                    }
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        return Err(WaitError::Interrupted);
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                let at_messages = self.work_seen();
                let start = Instant::now();
                (self.ctx.progress)(&format!("fault {}", f.kind.name()));
                let mut fr =
                    FaultReport::new(f.kind, trigger, at_messages, ms(start - self.started));
                let done = match f.kind {
                    FaultKind::Migrate => {
                        let to = host_index(scn, f.to.as_deref().unwrap_or_default());
                        // A repeated migration goes back and forth.
                        let to = if to == self.at {
                            host_index(scn, &scn.vm.host)
                        } else {
                            to
                        };
                        fr.detail = format!(
                            "host {} -> host {}",
                            scn.hosts[self.at].name, scn.hosts[to].name
                        );
                        if self.secondary.is_some() {
                            self.switch_over(to, &mut fr)
                        } else {
                            self.migrate(to).map(|d| fr.downtime_ms = d)
                        }
                    }
                    FaultKind::KillSecondary => {
                        fr.detail = "SIGKILL; the primary runs on".into();
                        self.kill_secondary()
                    }
                    FaultKind::Reprotect => {
                        let to = host_index(scn, f.to.as_deref().unwrap_or_default());
                        self.reprotect(to, &mut fr)
                    }
                    FaultKind::Partition => {
                        let mut cuts = Vec::with_capacity(1 + overlapping.len());
                        for (i, g) in std::iter::once(f).chain(overlapping).enumerate() {
                            let [x, y] = g.between.clone().unwrap_or_default();
                            let after_ms = match (i, g.when.resolve(&mut pick)) {
                                (0, _) => 0,
                                (_, Trigger::Ms(ms)) => ms,
                                // Checked when the drill was loaded.
                                (_, other) => unreachable!("a time, not {other:?}"),
                            };
                            let duration_ms = g.duration_ms.unwrap_or_default();
                            cuts.push(partition::Cut {
                                x,
                                y,
                                after_ms,
                                duration_ms,
                            });
                        }
                        let mut frs = vec![(fr, start)];
                        let done = self.partitions(&cuts, &mut frs);
                        let end = Instant::now();
                        let last = frs.len() - 1;
                        let mut bad = false;
                        for (i, (mut fr, at)) in frs.into_iter().enumerate() {
                            if let (true, Err(WaitError::Failed(e))) = (i == last, &done) {
                                fr.error = Some(e.clone());
                            }
                            fr.took_ms = ms(end - at);
                            bad |= fr.error.is_some();
                            self.fault_times.push((at, end));
                            report.faults.push(fr);
                        }
                        if let Err(WaitError::Interrupted) = done {
                            return Err(WaitError::Interrupted);
                        }
                        if bad {
                            break 'faults;
                        }
                        base_msgs = self.work_seen();
                        base_t = Instant::now();
                        continue;
                    }
                    FaultKind::KillPrimary | FaultKind::PullPlug | FaultKind::Failover => {
                        self.fail_over(f.kind, &mut fr)
                    }
                };
                match done {
                    Ok(()) => {}
                    Err(WaitError::Interrupted) => return Err(WaitError::Interrupted),
                    Err(WaitError::Failed(e)) => fr.error = Some(e),
                }
                fr.took_ms = ms(start.elapsed());
                self.fault_times.push((start, Instant::now()));
                let bad = fr.error.is_some();
                report.faults.push(fr);
                if bad {
                    break 'faults;
                }
                base_msgs = self.work_seen();
                base_t = Instant::now();
            }
        }

        let Some((script, sizes)) = mail else {
            (self.ctx.progress)("the guest finishing");
            let vm = self.vm.as_mut().expect("a VM runs");
            vm.wait_end(BOOT, stop)?;
            self.evaluate_console(report);
            return Ok(());
        };
        let client = scn.mail_client();
        (self.ctx.progress)("clients finishing");
        let limit = Duration::from_secs(60)
            + Duration::from_millis((client.messages as u64) * (2000 + client.pace_ms));
        for conn in &mut self.conns {
            conn.proc.wait_end(limit, stop)?;
        }

        (self.ctx.progress)("reading the mailbox over POP3");
        let mut c = Topology::command(&self.topo.client_ns, Path::new("python3"));
        c.arg(script).args(["mailbox", sizes]);
        let (code, out, err) = output(c).map_err(WaitError::Failed)?;
        let mailbox_ok = code == 0 && out.lines().any(|l| l.starts_with("count "));
        self.evaluate(report, &out, mailbox_ok.then_some(()).ok_or(err));
        (self.ctx.progress)("stopping the VM");
        self.shutdown(report);
        Ok(())
    }

    /// Kill the secondary (SIGKILL); the primary must find it lost, win
    /// the arbiter and run on.
    fn kill_secondary(&mut self) -> WaitResult<()> {
        let stop = self.ctx.stop;
        let sec = self
            .secondary
            .as_mut()
            .ok_or_else(|| WaitError::Failed("no secondary to kill".into()))?;
        sec.signal(libc::SIGKILL);
        sec.wait_end(STEP, stop)?;
        self.secondary_killed = true;
        let vm = self.vm.as_mut().expect("a VM runs");
        vm.wait_line("won the arbiter and runs on UNPROTECTED", true, STEP, stop)?;
        Ok(())
    }

    /// Start the secondary on host `h`; the address it listens on.
    fn start_secondary(&mut self, h: usize) -> WaitResult<String> {
        let addr = self
            .topo
            .addr_towards(h, self.at)
            .ok_or_else(|| WaitError::Failed("no link to the secondary".into()))?
            .to_string();
        self.spawned += 1;
        let disk = self.disk(self.spawned)?;
        // Its own socket: after going live it is the VM's control socket.
        self.secondary_sock = self.dir.join(format!("sec{}.sock", self.spawned));
        let mut c = self.in_host(h);
        c.args(["secondary", "--listen", &format!("{addr}:0")])
            .args(self.creds(h))
            .args(self.arbiter_args(h)?)
            .arg("--api-socket")
            .arg(&self.secondary_sock)
            .env_remove("TANDEM_LOG");
        if self.ctx.scn.workload() == WorkloadKind::Mail {
            c.args(["--net", &format!("tap={TAP}"), "--disk"])
                .arg(&disk);
        }
        self.secondary_at = h;
        let name = &self.ctx.scn.hosts[h].name;
        let mut p =
            Proc::spawn(&format!("the secondary on host {name}"), c).map_err(WaitError::Failed)?;
        let listen = p.wait_line("waiting for a primary on ", true, STEP, self.ctx.stop)?;
        self.secondary = Some(p);
        match &self.sampler {
            Some(s) => {
                *s.sock.lock().unwrap_or_else(|e| e.into_inner()) = self.secondary_sock.clone()
            }
            None => self.sampler = Some(lag::Sampler::start(self.secondary_sock.clone())),
        }
        Ok(listen)
    }

    /// Migrate the VM to host `to`; its downtime.
    fn migrate(&mut self, to: usize) -> WaitResult<Option<f64>> {
        let stop = self.ctx.stop;
        let from = self.at;
        let addr = self
            .topo
            .addr_towards(to, from)
            .ok_or_else(|| WaitError::Failed("no link to migrate over".into()))?
            .to_string();
        self.spawned += 1;
        let k = self.spawned;
        let disk = self.disk(k)?;
        let sock = self.dir.join(format!("vm{k}.sock"));
        let mut c = self.in_host(to);
        c.args(["receive", "--listen", &format!("{addr}:0")])
            .args(self.creds(to))
            .args(["--net", &format!("tap={TAP}"), "--disk"])
            .arg(&disk)
            .arg("--api-socket")
            .arg(&sock)
            .env_remove("TANDEM_LOG");
        let name = &self.ctx.scn.hosts[to].name;
        let mut recv =
            Proc::spawn(&format!("the receiver on host {name}"), c).map_err(WaitError::Failed)?;
        let listen = recv.wait_line("waiting for a VM on ", true, STEP, stop)?;
        let mut c = self.tandem();
        c.args(["migrate", "--api"])
            .arg(&self.sock)
            .args(["--to", &listen])
            .args(self.creds(from))
            .arg("--json")
            .env_remove("TANDEM_LOG");
        let (code, out, err) = output(c).map_err(WaitError::Failed)?;
        if code != 0 {
            recv.stop(Duration::from_secs(5));
            self.retired.push(recv);
            return Err(WaitError::Failed(format!(
                "tandem migrate failed (status {code}): {}",
                err.trim()
            )));
        }
        let downtime = out
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find_map(|v| find_number(&v, "downtime_ms"));
        recv.wait_line("running it", true, STEP, stop)?;
        let mut old = self.vm.take().expect("a VM runs");
        let ended = old.wait_end(STEP, stop);
        self.retired.push(old);
        ended?;
        self.vm = Some(recv);
        self.at = to;
        self.sock = sock;
        Ok(downtime)
    }

    fn acked(&self) -> u32 {
        self.conns.iter().map(|c| c.count("sent ")).sum()
    }

    /// The work the clients saw so far: acknowledged messages, or the
    /// console lines of a console workload.
    fn work_seen(&self) -> u32 {
        match self.ctx.scn.workload() {
            WorkloadKind::Mail => self.acked(),
            WorkloadKind::Console => console::lines_seen(&self.primaries()),
        }
    }

    /// The clients (mail) or the guest (console) are done.
    fn work_done(&mut self) -> bool {
        match self.ctx.scn.workload() {
            WorkloadKind::Mail => self.conns.iter_mut().all(|c| c.proc.ended().is_some()),
            WorkloadKind::Console => self.vm.as_mut().is_none_or(|v| v.ended().is_some()),
        }
    }

    /// Every VMM that ran the VM as its primary, in order.
    fn primaries(&self) -> Vec<&Proc> {
        let mut v: Vec<&Proc> = self.retired.iter().collect();
        v.extend(self.vm.iter());
        v
    }

    fn evaluate(&mut self, report: &mut RunReport, mailbox: &str, read: Result<(), String>) {
        let scn = self.ctx.scn;
        let client = scn.mail_client();
        let e = &scn.expect;
        let mut acked = std::collections::BTreeSet::new();
        let mut tried = 0;
        let mut max_gap = 0.0f64;
        for c in &self.conns {
            let acks = c.acks();
            tried += c.count("try ");
            for w in acks.windows(2) {
                max_gap = max_gap.max(ms(w[1].1 - w[0].1));
            }
            acked.extend(acks.iter().map(|(s, _)| *s));
            if let Some(err) = c.error() {
                report.resets.push(format!("{}: {err}", c.proc.what));
            }
        }
        // Across a fault: the longest pause between two acknowledgements
        // of one connection that overlaps the fault's time.
        for (i, (start, end)) in self.fault_times.iter().enumerate() {
            let gap = self
                .conns
                .iter()
                .flat_map(|c| {
                    let acks = c.acks();
                    acks.windows(2)
                        .filter(|w| w[1].1 > *start && w[0].1 < *end)
                        .map(|w| ms(w[1].1 - w[0].1))
                        .collect::<Vec<_>>()
                })
                .fold(None, |m: Option<f64>, g| Some(m.map_or(g, |m| m.max(g))));
            if let Some(f) = report.faults.get_mut(i) {
                f.client_gap_ms = gap;
            }
        }
        report.max_gap_ms = max_gap;
        report.connections_reset = report.resets.len() as u32;
        let mut found_ok = std::collections::BTreeSet::new();
        let mut m = Messages {
            sent: tried,
            acknowledged: acked.len() as u32,
            ..Messages::default()
        };
        for line in mailbox.lines() {
            let w: Vec<&str> = line.split_whitespace().collect();
            match w.as_slice() {
                ["have", seed, state] => {
                    let Ok(seed) = seed.parse::<u32>() else {
                        continue;
                    };
                    if *state == "ok" {
                        found_ok.insert(seed);
                        m.found += 1;
                        if !acked.contains(&seed) {
                            m.found_unacknowledged += 1;
                        }
                    } else {
                        m.corrupted += 1;
                    }
                }
                ["foreign", _] => m.foreign += 1,
                _ => {}
            }
        }
        let missing: Vec<u32> = acked.difference(&found_ok).copied().collect();
        m.lost = missing.len() as u32;
        report.messages = m.clone();
        report.live_copies = self.live_copies();

        let mut checks = self.fault_checks(report);
        let mut check = |name: &str, passed: bool, seen: String| {
            checks.push(Check {
                name: name.into(),
                passed,
                seen,
            })
        };
        check(
            "mailbox readable over POP3",
            read.is_ok(),
            match &read {
                Ok(()) => format!("{} messages", m.found + m.corrupted + m.foreign),
                Err(e) => e.trim().lines().last().unwrap_or("no answer").to_string(),
            },
        );
        if e.no_acknowledged_lost {
            let first: Vec<String> = missing.iter().take(5).map(|s| format!("m{s}")).collect();
            check(
                "no acknowledged message lost",
                read.is_ok() && missing.is_empty() && m.corrupted == 0,
                format!(
                    "{} acknowledged, {} found intact, {} lost{}, {} corrupted",
                    m.acknowledged,
                    m.found - m.found_unacknowledged,
                    m.lost,
                    if first.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", first.join(", "))
                    },
                    m.corrupted
                ),
            );
        }
        if e.no_connection_reset {
            check(
                "no connection reset",
                report.resets.is_empty(),
                if report.resets.is_empty() {
                    format!("{} connections, none reset", report.connections)
                } else {
                    report.resets.join("; ")
                },
            );
        }
        if e.one_live_copy {
            check(
                "exactly one live copy",
                report.live_copies == 1,
                format!("{} live copies", report.live_copies),
            );
        }
        if let Some(limit) = e.max_gap_ms {
            // The gap a fault caused (the failover gap, what a client felt
            // of a migration); a drill without faults: the longest gap. A
            // pause elsewhere in the run is the host's load, reported as
            // the longest gap but not the fault's.
            let across: Vec<f64> = report
                .faults
                .iter()
                .filter_map(|f| f.client_gap_ms)
                .collect();
            let (worst, what) = if across.is_empty() {
                (max_gap, "longest gap")
            } else {
                (
                    across.iter().copied().fold(0.0, f64::max),
                    "longest gap across a fault",
                )
            };
            check(
                &format!("client-seen gap under {limit} ms"),
                worst < limit as f64 && report.resets.is_empty(),
                format!("{what} {worst:.0} ms (in the whole run {max_gap:.0} ms)"),
            );
        }
        if let Some(limit) = e.max_migration_downtime_ms {
            let worst = report
                .faults
                .iter()
                .filter_map(|f| f.downtime_ms)
                .fold(0.0f64, f64::max);
            check(
                &format!("migration downtime under {limit} ms"),
                worst < limit,
                format!("worst {worst:.1} ms"),
            );
        }
        if e.same_result_as_unfailed {
            let exact = read.is_ok()
                && found_ok == acked
                && m.corrupted == 0
                && m.foreign == 0
                && tried == m.acknowledged
                && m.acknowledged == client.connections * client.messages;
            check(
                "same result as an unfailed run",
                exact,
                format!(
                    "{} of {} messages sent and acknowledged, mailbox holds {} intact + {} corrupted + {} foreign",
                    m.acknowledged,
                    client.connections * client.messages,
                    m.found,
                    m.corrupted,
                    m.foreign
                ),
            );
        }
        report.checks = checks;
    }

    /// "every fault happened as planned" (when the drill has faults).
    fn fault_checks(&self, report: &RunReport) -> Vec<Check> {
        let fired = report.faults.iter().filter(|f| f.error.is_none()).count();
        let planned: u32 = self.ctx.scn.faults.iter().map(|f| f.repeat).sum();
        let fault_errors: Vec<String> = report
            .faults
            .iter()
            .filter_map(|f| Some(format!("{}: {}", f.kind, f.error.as_ref()?)))
            .collect();
        if planned == 0 && fault_errors.is_empty() {
            return Vec::new();
        }
        vec![Check {
            name: "every fault happened as planned".into(),
            passed: fault_errors.is_empty() && fired as u32 == planned,
            seen: if fault_errors.is_empty() {
                format!("{fired} of {planned}")
            } else {
                fault_errors.join("; ")
            },
        }]
    }

    /// Copies of the VM live now: every VMM that ran it as its primary and
    /// still runs, and a secondary that went live on its own (it says
    /// `going LIVE`). For a console workload, whose guest has ended by
    /// now, a VMM that ran the guest to its end (status 0) counts too.
    fn live_copies(&mut self) -> u32 {
        let console = self.ctx.scn.workload() == WorkloadKind::Console;
        let live = |p: &mut Proc| match p.ended() {
            None => 1,
            Some(st) => (console && st.success()) as u32,
        };
        let mut n = 0;
        if let Some(vm) = self.vm.as_mut() {
            n += live(vm);
        }
        for p in &mut self.retired {
            n += live(p);
        }
        for p in &mut self.stopped {
            if Proc::text(&p.err).contains("going LIVE") {
                n += live(p);
            }
        }
        if let Some(sec) = self.secondary.as_mut() {
            if Proc::text(&sec.err).contains("going LIVE") {
                n += live(sec);
            }
        }
        n
    }

    fn shutdown(&mut self, report: &mut RunReport) {
        if let Some(vm) = self.vm.as_mut() {
            if vm.stop(Duration::from_secs(30)).is_none() {
                report.error = Some("the VM did not stop".into());
            }
        }
        let Some(sec) = self.secondary.as_mut() else {
            return;
        };
        if self.secondary_killed {
            return;
        }
        // The primary's end ends the log stream, and with it the secondary.
        if sec.wait_end(STEP, self.ctx.stop).is_err() {
            sec.stop(Duration::from_secs(10));
        }
        let pri = self
            .vm
            .as_ref()
            .map(|p| Proc::text(&p.err))
            .unwrap_or_default();
        let sec = Proc::text(&sec.err);
        // The last one: a VM that went live after a switchover printed its
        // replay's digest at the handover first.
        let digest = |text: &str| {
            text.lines()
                .rev()
                .find_map(|l| l.strip_prefix("tandem: final state digest "))
                .map(|d| d.trim().to_string())
        };
        let mut p = protection_numbers(&pri);
        p.primary_digest = digest(&pri);
        p.secondary_digest = digest(&sec);
        let same = p.primary_digest.is_some() && p.primary_digest == p.secondary_digest;
        report.checks.push(Check {
            name: "the secondary kept an exact copy".into(),
            passed: same,
            seen: format!(
                "final state digests: primary {}, secondary {}",
                p.primary_digest.as_deref().unwrap_or("none"),
                p.secondary_digest.as_deref().unwrap_or("none")
            ),
        });
        report.protection = Some(p);
    }

    /// Every process's output into the run's directory.
    fn save_outputs(&mut self) {
        std::fs::write(self.dir.join("stop-clients"), b"").ok();
        let mut all: Vec<&Proc> = self.retired.iter().collect();
        all.extend(self.stopped.iter());
        all.extend(self.vm.iter());
        all.extend(self.secondary.iter());
        all.extend(self.conns.iter().map(|c| &c.proc));
        all.extend(self.etcd.iter());
        for (i, p) in all.iter().enumerate() {
            let text = format!(
                "{}\n--- stdout ---\n{}--- stderr ---\n{}",
                p.what,
                Proc::text(&p.out),
                Proc::text(&p.err)
            );
            let _ = std::fs::write(self.dir.join(format!("proc{i}.txt")), text);
        }
    }
}

/// The numbers of the primary's `protected run ended at exit ...` line.
fn protection_numbers(stderr: &str) -> Protection {
    let mut p = Protection::default();
    let Some(line) = stderr
        .lines()
        .find(|l| l.contains("protected run ended at exit"))
    else {
        return p;
    };
    let words: Vec<&str> = line.split_whitespace().collect();
    let before = |w: &str| {
        words
            .iter()
            .position(|x| x.trim_start_matches('(') == w)
            .and_then(|i| i.checked_sub(1))
            .map(|i| words[i].trim_start_matches('('))
    };
    let after = |w: &str| {
        words
            .iter()
            .position(|x| *x == w)
            .and_then(|i| words.get(i + 1))
            .map(|x| x.trim_end_matches(','))
    };
    p.log_bytes = before("log").and_then(|x| x.parse().ok()).unwrap_or(0);
    p.log_bit_s = before("bit/s),")
        .and_then(|x| x.parse().ok())
        .unwrap_or(0.0);
    p.outputs_released = before("outputs").and_then(|x| x.parse().ok()).unwrap_or(0);
    p.added_latency_p50_ms = after("p50").and_then(|x| x.parse().ok()).unwrap_or(0.0);
    p.added_latency_p99_ms = after("p99").and_then(|x| x.parse().ok()).unwrap_or(0.0);
    p
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The first number under `key` anywhere in `v`.
fn find_number(v: &serde_json::Value, key: &str) -> Option<f64> {
    match v {
        serde_json::Value::Object(m) => m
            .get(key)
            .and_then(serde_json::Value::as_f64)
            .or_else(|| m.values().find_map(|x| find_number(x, key))),
        serde_json::Value::Array(a) => a.iter().find_map(|x| find_number(x, key)),
        _ => None,
    }
}
