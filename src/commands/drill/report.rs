//! What `tandem drill` prints: each run, then the total (text, or one
//! JSON object with `--json`).

use serde::Serialize;

use super::run::{Messages, RunReport};

/// p50 / p99 / max of some durations (ms).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Spread {
    pub count: usize,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(mut v: Vec<f64>) -> Option<Spread> {
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let at = |q: usize| v[((v.len() - 1) * q).div_ceil(100)];
        Some(Spread {
            count: v.len(),
            p50: at(50),
            p99: at(99),
            max: v[v.len() - 1],
        })
    }

    fn text(&self, unit: &str) -> String {
        format!(
            "p50 {:.1} {unit}  p99 {:.1} {unit}  max {:.1} {unit}  ({} samples)",
            self.p50, self.p99, self.max, self.count
        )
    }
}

/// The whole drill.
#[derive(Debug, Serialize)]
pub struct DrillReport {
    pub scenario: String,
    pub file: String,
    /// Said when the built-in drill stands in for another.
    pub note: Option<String>,
    pub runs: Vec<RunReport>,
    pub total: Total,
}

#[derive(Debug, Serialize)]
pub struct Total {
    pub runs: usize,
    pub passed: usize,
    pub failed: usize,
    pub messages: Messages,
    pub connections_reset: u32,
    /// Live copies seen at the end of each run, over all runs.
    pub live_copies: Vec<u32>,
    /// Console workloads: lines expected (unfailed runs) and seen.
    pub console_lines: Option<(u32, u32)>,
    /// The pause clients saw across each fault that fails over.
    pub failover_gap_ms: Option<Spread>,
    /// The new primaries' own measure of each failover: the old one's
    /// last sign of life to the first guest output.
    pub failover_vmm_gap_ms: Option<Spread>,
    /// The pause clients saw when the secondary died (the primary's
    /// detection and arbiter claim).
    pub secondary_loss_gap_ms: Option<Spread>,
    /// Partitions that made the arbiter decide: how often the secondary
    /// won (went live, the primary stopped) and how often the primary
    /// (ran on alone, the secondary stopped).
    pub partitions_won_by_secondary: u32,
    pub partitions_won_by_primary: u32,
    /// The pause clients saw across each partition that made the arbiter
    /// decide (a failover, or the primary's claim).
    pub partition_gap_ms: Option<Spread>,
    /// The pause clients saw across each partition that decided nothing
    /// (a host cut from the arbiter, a VM already alone).
    pub undecided_partition_gap_ms: Option<Spread>,
    /// The pause clients saw across each planned migration.
    pub migration_client_gap_ms: Option<Spread>,
    /// Each planned migration's downtime, as `tandem migrate` measured it.
    pub migration_downtime_ms: Option<Spread>,
    /// Output latency added by protection (each run's p99).
    pub added_latency_p99_ms: Option<Spread>,
    /// Log bandwidth to the secondary (each run's mean, bit/s).
    pub log_bit_s: Option<Spread>,
    /// How far the secondary's replay was behind (each run's p99, in
    /// exits and in guest ms), from its status every 100 ms.
    pub secondary_lag_exits_p99: Option<Spread>,
    pub secondary_lag_ms_p99: Option<Spread>,
    /// `--seed S --runs 1` repeats that run.
    pub failed_seeds: Vec<u64>,
}

impl DrillReport {
    pub fn new(scenario: &str, file: &str, note: Option<String>, runs: Vec<RunReport>) -> Self {
        let mut m = Messages::default();
        let mut reset = 0;
        let (mut fgap, mut mgap, mut down) = (Vec::new(), Vec::new(), Vec::new());
        let (mut sgap, mut vgap) = (Vec::new(), Vec::new());
        let (mut pgap, mut ugap, mut by_sec, mut by_pri) = (Vec::new(), Vec::new(), 0, 0);
        let mut lines: Option<(u32, u32)> = None;
        for r in &runs {
            m.sent += r.messages.sent;
            m.acknowledged += r.messages.acknowledged;
            m.found += r.messages.found;
            m.lost += r.messages.lost;
            m.corrupted += r.messages.corrupted;
            m.found_unacknowledged += r.messages.found_unacknowledged;
            m.foreign += r.messages.foreign;
            reset += r.connections_reset;
            if let Some(c) = &r.console {
                let l = lines.get_or_insert((0, 0));
                l.0 += c.expected_lines;
                l.1 += c.lines;
            }
            for f in &r.faults {
                if f.kind == "migrate" {
                    mgap.extend(f.client_gap_ms);
                    down.extend(f.downtime_ms);
                } else if f.kind == "partition" {
                    match f.winner.as_deref() {
                        Some(w) => {
                            pgap.extend(f.client_gap_ms);
                            by_sec += (w == "secondary") as u32;
                            by_pri += (w == "primary") as u32;
                        }
                        None => ugap.extend(f.client_gap_ms),
                    }
                } else if f.kind == "kill-secondary" {
                    sgap.extend(f.client_gap_ms);
                } else if f.fails_over {
                    fgap.extend(f.client_gap_ms);
                    vgap.extend(f.vmm_gap_ms);
                }
            }
        }
        let passed = runs.iter().filter(|r| r.passed).count();
        let total = Total {
            runs: runs.len(),
            passed,
            failed: runs.len() - passed,
            messages: m,
            connections_reset: reset,
            live_copies: runs.iter().map(|r| r.live_copies).collect(),
            console_lines: lines,
            failover_gap_ms: Spread::of(fgap),
            failover_vmm_gap_ms: Spread::of(vgap),
            secondary_loss_gap_ms: Spread::of(sgap),
            partitions_won_by_secondary: by_sec,
            partitions_won_by_primary: by_pri,
            partition_gap_ms: Spread::of(pgap),
            undecided_partition_gap_ms: Spread::of(ugap),
            migration_client_gap_ms: Spread::of(mgap),
            migration_downtime_ms: Spread::of(down),
            added_latency_p99_ms: Spread::of(
                runs.iter()
                    .filter_map(|r| Some(r.protection.as_ref()?.added_latency_p99_ms))
                    .collect(),
            ),
            // The primary's end report; after a failover (no such report)
            // what the secondary said.
            log_bit_s: Spread::of(
                runs.iter()
                    .filter_map(|r| {
                        r.protection
                            .as_ref()
                            .map(|p| p.log_bit_s)
                            .filter(|b| *b > 0.0)
                            .or(r.secondary.as_ref().map(|s| s.log_bit_s))
                    })
                    .collect(),
            ),
            secondary_lag_exits_p99: Spread::of(
                runs.iter()
                    .filter_map(|r| Some(r.secondary.as_ref()?.lag_exits.p99))
                    .collect(),
            ),
            secondary_lag_ms_p99: Spread::of(
                runs.iter()
                    .filter_map(|r| Some(r.secondary.as_ref()?.lag_ms.p99))
                    .collect(),
            ),
            failed_seeds: runs.iter().filter(|r| !r.passed).map(|r| r.seed).collect(),
        };
        DrillReport {
            scenario: scenario.into(),
            file: file.into(),
            note,
            runs,
            total,
        }
    }

    pub fn passed(&self) -> bool {
        self.total.failed == 0
    }

    /// One run, as text.
    pub fn run_text(&self, r: &RunReport, of: u32) -> String {
        let mut s = format!(
            "run {} of {of} (seed {}): {} in {:.1} s\n",
            r.run,
            r.seed,
            if r.passed { "PASS" } else { "FAIL" },
            r.duration_s
        );
        let m = &r.messages;
        if let Some(c) = &r.console {
            s += &format!(
                "  console      {} lines of {} (unfailed run), {} bytes produced again at the failover, {}\n  live copies  {}\n  longest gap  {:.0} ms between two console lines\n",
                c.lines,
                c.expected_lines,
                c.produced_again_bytes,
                c.result.as_deref().unwrap_or("no RESULT"),
                r.live_copies,
                r.max_gap_ms
            );
        } else {
            s += &format!(
                "  messages     sent {}  acknowledged {}  found {}  lost {}  corrupted {}\n",
                m.sent, m.acknowledged, m.found, m.lost, m.corrupted
            );
            s += &format!(
                "  connections  {}  reset {}\n  live copies  {}\n  longest gap  {:.0} ms between two acknowledgements\n",
                r.connections, r.connections_reset, r.live_copies, r.max_gap_ms
            );
        }
        if let Some(p) = &r.protection {
            s += &format!(
                "  protection   {} log bytes ({:.2} Mbit/s), {} outputs released after acknowledgement, added latency p50 {:.2} ms p99 {:.2} ms\n",
                p.log_bytes,
                p.log_bit_s / 1e6,
                p.outputs_released,
                p.added_latency_p50_ms,
                p.added_latency_p99_ms
            );
        }
        if let Some(l) = &r.secondary {
            s += &format!(
                "  secondary    lag p50 {:.0} p99 {:.0} max {:.0} exits, p99 {:.2} ms of guest time ({} samples); {} log bytes received, {:.2} Mbit/s\n",
                l.lag_exits.p50,
                l.lag_exits.p99,
                l.lag_exits.max,
                l.lag_ms.p99,
                l.samples,
                l.log_bytes,
                l.log_bit_s / 1e6
            );
        }
        for f in &r.faults {
            s += &format!("  fault {:<9}", f.kind);
            s += &format!(
                " after {} {} ({:.0} ms)",
                f.at_messages,
                if r.console.is_some() {
                    "lines"
                } else {
                    "messages"
                },
                f.at_ms
            );
            if !f.detail.is_empty() {
                s += &format!("  {}", f.detail);
            }
            if let Some(d) = f.downtime_ms {
                s += &format!("  downtime {d:.1} ms");
            }
            if let Some(g) = f.client_gap_ms {
                s += &format!("  client gap {g:.0} ms");
            }
            if let Some(g) = f.vmm_gap_ms {
                s += &format!("  (VMM: {g:.0} ms from the last sign of life to the first output)");
            }
            s += &format!("  took {:.0} ms", f.took_ms);
            if let Some(e) = &f.error {
                s += &format!("\n    error: {e}");
            }
            s.push('\n');
        }
        for c in &r.checks {
            s += &format!(
                "  [{}] {}: {}\n",
                if c.passed { "ok" } else { "FAILED" },
                c.name,
                c.seen
            );
        }
        if let Some(e) = &r.error {
            s += &format!("  error: {e}\n");
        }
        if !r.passed {
            s += &format!(
                "  repeat it: tandem drill {} --seed {} --runs 1\n",
                self.file, r.seed
            );
        }
        if let Some(d) = &r.dir {
            s += &format!("  outputs kept in {d}\n");
        }
        s
    }

    /// The total, as text.
    pub fn total_text(&self) -> String {
        let t = &self.total;
        let m = &t.messages;
        let mut s = format!(
            "drill {}: {} of {} runs passed\n",
            self.scenario, t.passed, t.runs
        );
        if let Some(n) = &self.note {
            s += &format!("  note: {n}\n");
        }
        match t.console_lines {
            Some((want, got)) => {
                s += &format!("  console lines  {got} seen of {want} (unfailed runs)\n")
            }
            None => {
                s += &format!(
                    "  messages       sent {}  acknowledged {}  found {}  lost {}\n",
                    m.sent, m.acknowledged, m.found, m.lost
                )
            }
        }
        let copies: std::collections::BTreeSet<u32> = t.live_copies.iter().copied().collect();
        let copies: Vec<String> = copies.iter().map(u32::to_string).collect();
        s += &format!(
            "  resets         {}\n  live copies    {}\n",
            t.connections_reset,
            copies.join(", ")
        );
        if let Some(g) = &t.failover_gap_ms {
            s += &format!("  failover gap   {}\n", g.text("ms"));
        }
        if let Some(g) = &t.failover_vmm_gap_ms {
            s += &format!("  failover gap (VMM's measure)  {}\n", g.text("ms"));
        }
        if let Some(g) = &t.secondary_loss_gap_ms {
            s += &format!("  gap when the secondary died  {}\n", g.text("ms"));
        }
        let decided = t.partitions_won_by_secondary + t.partitions_won_by_primary;
        if decided > 0 {
            s += &format!(
                "  partitions     {decided} made the arbiter decide: the secondary went live {} times, the primary ran on alone {} times; the other side stopped\n",
                t.partitions_won_by_secondary, t.partitions_won_by_primary
            );
        }
        if let Some(g) = &t.partition_gap_ms {
            s += &format!("  gap across a decided partition  {}\n", g.text("ms"));
        }
        if let Some(g) = &t.undecided_partition_gap_ms {
            s += &format!(
                "  gap across a partition that decided nothing  {}\n",
                g.text("ms")
            );
        }
        if let Some(d) = &t.migration_downtime_ms {
            s += &format!("  migration downtime    {}\n", d.text("ms"));
        }
        if let Some(g) = &t.migration_client_gap_ms {
            s += &format!("  migration client gap  {}\n", g.text("ms"));
        }
        if let Some(l) = &t.added_latency_p99_ms {
            s += &format!("  added output latency p99  {}\n", l.text("ms"));
        }
        if let Some(b) = &t.log_bit_s {
            let mbit = Spread {
                p50: b.p50 / 1e6,
                p99: b.p99 / 1e6,
                max: b.max / 1e6,
                ..*b
            };
            s += &format!("  log bandwidth  {}\n", mbit.text("Mbit/s"));
        }
        if let Some(l) = &t.secondary_lag_exits_p99 {
            s += &format!("  secondary lag (each run's p99)  {}\n", l.text("exits"));
        }
        if let Some(l) = &t.secondary_lag_ms_p99 {
            s += &format!(
                "  secondary lag (each run's p99)  {}\n",
                l.text("ms of guest time")
            );
        }
        if !t.failed_seeds.is_empty() {
            let seeds: Vec<String> = t.failed_seeds.iter().map(u64::to_string).collect();
            s += &format!("  failed seeds   {}\n", seeds.join(", "));
        }
        s
    }
}
