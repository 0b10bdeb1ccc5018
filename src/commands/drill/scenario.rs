//! A drill as data: the `scenarios/*.toml` schema, its validation, and
//! what this build can run.
//!
//! Every table denies unknown keys, so a misspelt key is an error naming
//! the key and the keys allowed there; enumerations (`kind`) name the
//! values allowed. Cross-references (a host a link or fault names, a fault
//! that could never fire) are checked after parsing, with the file and the
//! key in the message.

use std::collections::BTreeSet;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Largest number of hosts (namespaces) a drill may ask for.
pub const MAX_HOSTS: usize = 4;
/// Largest number of concurrent client connections.
pub const MAX_CONNECTIONS: u32 = 16;
/// Largest number of messages per connection.
pub const MAX_MESSAGES: u32 = 10_000;
/// Message sizes accepted (bytes): the guest's mail store keeps them in a
/// small disk; a few KiB is the realistic range for emulated guest code.
pub const SIZES: std::ops::RangeInclusive<u32> = 100..=65_536;

/// One drill.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name, shown in reports (e.g. `migrate-under-load`).
    pub name: String,
    /// What the drill rehearses, in a sentence or two.
    #[serde(default)]
    pub description: String,
    /// The hosts: one network namespace each.
    pub hosts: Vec<Host>,
    /// Links between hosts (the path migration and lockstep traffic take).
    #[serde(default)]
    pub links: Vec<Link>,
    /// The VM under test.
    pub vm: Vm,
    /// Who decides which copy lives when the hosts cannot agree.
    #[serde(default)]
    pub arbiter: Option<Arbiter>,
    /// The client load (the mail workload; a console workload has none:
    /// its "client" reads the console).
    #[serde(default)]
    pub client: Option<Client>,
    /// The fault schedule, in order.
    #[serde(default)]
    pub faults: Vec<Fault>,
    /// What must hold afterwards.
    #[serde(default)]
    pub expect: Expect,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Host {
    /// A short name (letters, digits, `-`), used by links and faults.
    pub name: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    /// The two hosts it joins.
    pub between: [String; 2],
    /// Round-trip time added by the link (ms; each direction half of it).
    #[serde(default)]
    pub rtt_ms: f64,
    /// Frames lost per direction, in percent (ARP exempt).
    #[serde(default)]
    pub loss_percent: f64,
    /// Bottleneck rate per direction (`100mbit`, `1gbit`); none: unlimited.
    #[serde(default)]
    pub rate: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    /// The built-in guest's workload (its command line): `mail`, or a
    /// console workload (`fill`, `dirty`, `ticks`: see [`CONSOLE_WORKLOADS`]).
    #[serde(default = "default_workload")]
    pub workload: String,
    /// The host it starts on.
    pub host: String,
    /// The host of its secondary (lockstep protection); none: unprotected.
    #[serde(default)]
    pub secondary: Option<String>,
    /// Guest memory (MiB).
    #[serde(default = "default_mem")]
    pub mem_mib: u64,
    /// Disk image size (MiB), created empty for the run.
    #[serde(default = "default_disk")]
    pub disk_mib: u64,
}

/// The test guest's workloads a drill can watch on the console: each
/// writes lines as it works and ends with `RESULT NAME CHECKSUM`.
pub const CONSOLE_WORKLOADS: &[&str] = &["fill", "dirty", "ticks"];

/// What the drill checks: a mailbox, or a console.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadKind {
    /// The guest's mail server, SMTP clients, POP3 afterwards.
    Mail,
    /// A test-guest workload whose console must continue exactly.
    Console,
}

fn default_workload() -> String {
    "mail".into()
}
fn default_mem() -> u64 {
    64
}
fn default_disk() -> u64 {
    16
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ArbiterKind {
    /// A lock file both hosts see.
    File,
    /// An etcd lease (etcd-server on its own host).
    Etcd,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Arbiter {
    pub kind: ArbiterKind,
    /// The host running it (etcd); a file arbiter needs none.
    #[serde(default)]
    pub host: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientKind {
    /// Python's smtplib (one session per connection, message after message).
    Smtplib,
    /// Debian's swaks (one session per message).
    Swaks,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Client {
    pub kind: ClientKind,
    /// Concurrent connections (smtplib) or senders (swaks).
    #[serde(default = "one")]
    pub connections: u32,
    /// Messages each connection sends.
    pub messages: u32,
    /// Message sizes in bytes, used in turn.
    #[serde(default = "default_sizes")]
    pub sizes: Vec<u32>,
    /// Pause between a connection's messages (ms).
    #[serde(default)]
    pub pace_ms: u64,
}

fn one() -> u32 {
    1
}
fn default_sizes() -> Vec<u32> {
    vec![2000]
}

/// What a fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// Planned live migration of the VM to `to`.
    Migrate,
    /// `kill -9` of the primary's VMM.
    KillPrimary,
    /// `kill -9` of the primary plus every link of its host cut.
    PullPlug,
    /// The link(s) `between` cut for `duration_ms`, then healed.
    Partition,
    /// `kill -9` of the secondary's VMM.
    KillSecondary,
    /// `tandem failover`: the operator's planned switch to the secondary.
    Failover,
    /// Protect the VM again, to `to`, after it failed over.
    Reprotect,
}

impl FaultKind {
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Migrate => "migrate",
            FaultKind::KillPrimary => "kill-primary",
            FaultKind::PullPlug => "pull-plug",
            FaultKind::Partition => "partition",
            FaultKind::KillSecondary => "kill-secondary",
            FaultKind::Failover => "failover",
            FaultKind::Reprotect => "reprotect",
        }
    }

    /// Is this a fault after which the secondary goes live?
    pub fn fails_over(self) -> bool {
        matches!(
            self,
            FaultKind::KillPrimary | FaultKind::PullPlug | FaultKind::Failover
        )
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    pub kind: FaultKind,
    /// When (exactly one of the four keys).
    pub when: When,
    /// How often: the fault fires this many times, each `when` counted
    /// from the end of the one before.
    #[serde(default = "one")]
    pub repeat: u32,
    /// What `when` counts from: the `end` of the fault before (the
    /// default: faults come one after the other) or its `start` (a
    /// partition after a partition: the cuts overlap when the first lasts
    /// longer than the wait; the runner carries them out together and
    /// waits for the arbiter's decision over all of them).
    #[serde(default)]
    pub counted_from: CountedFrom,
    /// The destination host (migrate, reprotect).
    #[serde(default)]
    pub to: Option<String>,
    /// The two ends cut apart (partition): host names or `arbiter`.
    #[serde(default)]
    pub between: Option<[String; 2]>,
    /// How long the cut lasts (partition), ms.
    #[serde(default)]
    pub duration_ms: Option<u64>,
}

/// What a fault's `when` counts from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CountedFrom {
    /// The end of the fault before (or the clients' start).
    #[default]
    End,
    /// The start of the fault before (overlapping partitions).
    Start,
}

/// When a fault fires: after a number of acknowledged messages (counted
/// over all connections) or a time since the clients started, fixed or
/// drawn from a window with the run's seed.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct When {
    #[serde(default)]
    pub at_message: Option<u32>,
    #[serde(default)]
    pub between_messages: Option<[u32; 2]>,
    #[serde(default)]
    pub at_ms: Option<u64>,
    #[serde(default)]
    pub between_ms: Option<[u64; 2]>,
    /// Console workloads: after this many console lines.
    #[serde(default)]
    pub at_line: Option<u32>,
    #[serde(default)]
    pub between_lines: Option<[u32; 2]>,
}

/// A resolved `when`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// After this many acknowledged messages.
    Messages(u32),
    /// This long after the clients started (ms).
    Ms(u64),
    /// After this many console lines (a console workload).
    Lines(u32),
}

impl When {
    /// The trigger, drawing from a window with `pick(lo, hi)`.
    pub fn resolve(&self, mut pick: impl FnMut(u64, u64) -> u64) -> Trigger {
        match (
            self.at_message,
            self.between_messages,
            self.at_ms,
            self.between_ms,
        ) {
            (Some(n), ..) => Trigger::Messages(n),
            (_, Some([lo, hi]), ..) => Trigger::Messages(pick(lo as u64, hi as u64) as u32),
            (_, _, Some(ms), _) => Trigger::Ms(ms),
            (_, _, _, Some([lo, hi])) => Trigger::Ms(pick(lo, hi)),
            _ => match (self.at_line, self.between_lines) {
                (Some(n), _) => Trigger::Lines(n),
                (_, Some([lo, hi])) => Trigger::Lines(pick(lo as u64, hi as u64) as u32),
                _ => Trigger::Messages(0),
            },
        }
    }

    /// The latest message count it can wait for (None: time-based).
    fn max_messages(&self) -> Option<u32> {
        self.at_message.or(self.between_messages.map(|[_, hi]| hi))
    }
}

/// What must hold afterwards; each check is reported.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// Every message the server acknowledged (250 after DATA) is in the
    /// mailbox afterwards, byte for byte (POP3, from the client network).
    #[serde(default = "yes")]
    pub no_acknowledged_lost: bool,
    /// No client connection was reset or refused.
    #[serde(default = "yes")]
    pub no_connection_reset: bool,
    /// Exactly one copy of the VM is live afterwards.
    #[serde(default = "yes")]
    pub one_live_copy: bool,
    /// The longest pause a client saw between two acknowledgements (the
    /// failover gap when a fault fails over) stays under this (ms).
    #[serde(default)]
    pub max_gap_ms: Option<u64>,
    /// The result is what an unfailed run gives: the mailbox holds exactly
    /// the messages sent, each once and byte for byte, nothing else.
    #[serde(default)]
    pub same_result_as_unfailed: bool,
    /// Every planned migration's downtime stays under this (ms).
    #[serde(default)]
    pub max_migration_downtime_ms: Option<f64>,
}

fn yes() -> bool {
    true
}

impl Default for Expect {
    fn default() -> Self {
        Expect {
            no_acknowledged_lost: true,
            no_connection_reset: true,
            one_live_copy: true,
            max_gap_ms: None,
            same_result_as_unfailed: false,
            max_migration_downtime_ms: None,
        }
    }
}

/// Why a scenario file is not a drill: the message names the file, the
/// key and what is allowed.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {msg}")]
pub struct ScenarioError {
    pub file: String,
    pub msg: String,
}

impl Scenario {
    /// Read and validate a scenario file.
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ScenarioError {
            file: file.clone(),
            msg: format!("cannot read it: {e}"),
        })?;
        Scenario::parse(&file, &text)
    }

    /// Parse and validate `text` (read from `file`, named in errors).
    pub fn parse(file: &str, text: &str) -> Result<Scenario, ScenarioError> {
        let err = |msg: String| ScenarioError {
            file: file.to_string(),
            msg,
        };
        let s: Scenario = toml::from_str(text).map_err(|e| err(describe_toml_error(&e, text)))?;
        s.validate().map_err(err)?;
        Ok(s)
    }

    fn host_known(&self, key: &str, name: &str) -> Result<(), String> {
        if self.hosts.iter().any(|h| h.name == name) {
            return Ok(());
        }
        let names: Vec<&str> = self.hosts.iter().map(|h| h.name.as_str()).collect();
        Err(format!(
            "{key} = {name:?}: no such host (hosts: {})",
            names.join(", ")
        ))
    }

    fn validate(&self) -> Result<(), String> {
        if self.name.trim().is_empty() {
            return Err("name = \"\": give the drill a name".into());
        }
        if self.hosts.is_empty() || self.hosts.len() > MAX_HOSTS {
            return Err(format!(
                "hosts: {} given; a drill has 1 to {MAX_HOSTS} [[hosts]]",
                self.hosts.len()
            ));
        }
        let mut seen = BTreeSet::new();
        for (i, h) in self.hosts.iter().enumerate() {
            let ok = !h.name.is_empty()
                && h.name.len() <= 8
                && h.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
            if !ok {
                return Err(format!(
                    "hosts[{i}].name = {:?}: 1 to 8 characters of a-z, 0-9 and -",
                    h.name
                ));
            }
            if h.name == "arbiter" {
                return Err(format!(
                    "hosts[{i}].name = \"arbiter\": that name is reserved for the arbiter"
                ));
            }
            if !seen.insert(h.name.as_str()) {
                return Err(format!("hosts[{i}].name = {:?}: given twice", h.name));
            }
        }
        let mut pairs = BTreeSet::new();
        for (i, l) in self.links.iter().enumerate() {
            for end in &l.between {
                self.host_known(&format!("links[{i}].between"), end)?;
            }
            if l.between[0] == l.between[1] {
                return Err(format!(
                    "links[{i}].between = [{:?}, {:?}]: a link joins two different hosts",
                    l.between[0], l.between[1]
                ));
            }
            let mut key = l.between.clone();
            key.sort();
            if !pairs.insert(key) {
                return Err(format!(
                    "links[{i}].between: hosts {} and {} are already linked",
                    l.between[0], l.between[1]
                ));
            }
            if !(0.0..=10_000.0).contains(&l.rtt_ms) {
                return Err(format!("links[{i}].rtt_ms = {}: 0 to 10000 ms", l.rtt_ms));
            }
            if !(0.0..=50.0).contains(&l.loss_percent) {
                return Err(format!(
                    "links[{i}].loss_percent = {}: 0 to 50 (percent)",
                    l.loss_percent
                ));
            }
            if let Some(r) = &l.rate {
                let digits = r.trim_end_matches(|c: char| c.is_ascii_alphabetic());
                let unit = &r[digits.len()..];
                if digits.parse::<u64>().is_err() || !["", "kbit", "mbit", "gbit"].contains(&unit) {
                    return Err(format!(
                        "links[{i}].rate = {r:?}: a number with kbit, mbit or gbit (e.g. \"100mbit\")"
                    ));
                }
            }
        }
        self.host_known("vm.host", &self.vm.host)?;
        if let Some(s) = &self.vm.secondary {
            self.host_known("vm.secondary", s)?;
            if *s == self.vm.host {
                return Err(format!(
                    "vm.secondary = {s:?}: the secondary runs on another host than vm.host"
                ));
            }
        }
        let first = self.vm.workload.split_whitespace().next().unwrap_or("");
        if first != "mail" && !CONSOLE_WORKLOADS.contains(&first) {
            return Err(format!(
                "vm.workload = {:?}: \"mail\" (a mailbox checked over POP3) or a console workload of the test guest ({})",
                self.vm.workload,
                CONSOLE_WORKLOADS.join(", ")
            ));
        }
        if !(16..=1024).contains(&self.vm.mem_mib) {
            return Err(format!("vm.mem_mib = {}: 16 to 1024", self.vm.mem_mib));
        }
        if !(1..=1024).contains(&self.vm.disk_mib) {
            return Err(format!("vm.disk_mib = {}: 1 to 1024", self.vm.disk_mib));
        }
        if let Some(a) = &self.arbiter {
            if let Some(h) = &a.host {
                self.host_known("arbiter.host", h)?;
            } else if a.kind == ArbiterKind::Etcd {
                return Err("arbiter.host: an etcd arbiter runs on a host; name it".into());
            }
            if let (ArbiterKind::Etcd, Some(h)) = (a.kind, &a.host) {
                // Every host a VMM runs on reaches etcd over its own link.
                let vmm_hosts = std::iter::once(&self.vm.host)
                    .chain(self.vm.secondary.iter())
                    .chain(self.faults.iter().filter_map(|f| f.to.as_ref()))
                    .filter(|v| self.hosts.iter().any(|x| x.name == **v));
                for v in vmm_hosts {
                    if v == h {
                        return Err(format!(
                            "arbiter.host = {h:?}: the VM runs on that host; etcd runs on a host of its own"
                        ));
                    }
                    if !self.linked(v, h) {
                        return Err(format!(
                            "arbiter.host = {h:?}: no [[links]] between {v} (a VMM runs there) and {h}: the VMM could not reach etcd"
                        ));
                    }
                }
            }
        }
        let total = match (self.workload(), &self.client) {
            (WorkloadKind::Mail, Some(c)) => {
                self.validate_client(c)?;
                Some(c.connections * c.messages)
            }
            (WorkloadKind::Mail, None) => {
                return Err("[client]: the mail workload needs its clients (a [client] table)".into())
            }
            (WorkloadKind::Console, Some(_)) => {
                return Err(format!(
                    "[client]: vm.workload = {:?} is a console workload: its output is the console, it takes no [client]",
                    self.vm.workload
                ))
            }
            (WorkloadKind::Console, None) => None,
        };
        for (i, f) in self.faults.iter().enumerate() {
            self.validate_fault(i, f, total)?;
        }
        Ok(())
    }

    /// Mail or console (validated: the first word of `vm.workload`).
    pub fn workload(&self) -> WorkloadKind {
        if self.vm.workload.split_whitespace().next() == Some("mail") {
            WorkloadKind::Mail
        } else {
            WorkloadKind::Console
        }
    }

    /// The mail clients (a mail drill has them: validated).
    pub fn mail_client(&self) -> &Client {
        self.client
            .as_ref()
            .expect("validated: a mail drill has [client]")
    }

    fn validate_client(&self, c: &Client) -> Result<(), String> {
        if !(1..=MAX_CONNECTIONS).contains(&c.connections) {
            return Err(format!(
                "client.connections = {}: 1 to {MAX_CONNECTIONS}",
                c.connections
            ));
        }
        if !(1..=MAX_MESSAGES).contains(&c.messages) {
            return Err(format!(
                "client.messages = {}: 1 to {MAX_MESSAGES} per connection",
                c.messages
            ));
        }
        if c.sizes.is_empty() {
            return Err("client.sizes = []: give at least one size".into());
        }
        if let Some(s) = c.sizes.iter().find(|s| !SIZES.contains(s)) {
            return Err(format!(
                "client.sizes: {s} bytes: each size is {} to {} bytes",
                SIZES.start(),
                SIZES.end()
            ));
        }
        if c.pace_ms > 60_000 {
            return Err(format!("client.pace_ms = {}: at most 60000", c.pace_ms));
        }
        Ok(())
    }

    fn validate_fault(&self, i: usize, f: &Fault, total: Option<u32>) -> Result<(), String> {
        let key = format!("faults[{i}]");
        let w = &f.when;
        let given = [
            w.at_message.is_some(),
            w.between_messages.is_some(),
            w.at_ms.is_some(),
            w.between_ms.is_some(),
            w.at_line.is_some(),
            w.between_lines.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if given != 1 {
            return Err(format!(
                "{key}.when: give exactly one of at_message, between_messages, at_line, between_lines, at_ms, between_ms ({given} given)"
            ));
        }
        let by_lines = w.at_line.is_some() || w.between_lines.is_some();
        let by_messages = w.at_message.is_some() || w.between_messages.is_some();
        match self.workload() {
            WorkloadKind::Mail if by_lines => {
                return Err(format!(
                    "{key}.when: at_line and between_lines count console lines; the mail workload counts messages (at_message, between_messages)"
                ))
            }
            WorkloadKind::Console if by_messages => {
                return Err(format!(
                    "{key}.when: a console workload sends no messages; count its console lines (at_line, between_lines) or time (at_ms, between_ms)"
                ))
            }
            _ => {}
        }
        if let Some([lo, hi]) = w.between_lines {
            if lo > hi {
                return Err(format!(
                    "{key}.when.between_lines = [{lo}, {hi}]: the window's start is after its end"
                ));
            }
        }
        if let Some([lo, hi]) = w.between_messages {
            if lo > hi {
                return Err(format!(
                    "{key}.when.between_messages = [{lo}, {hi}]: the window's start is after its end"
                ));
            }
        }
        if let Some([lo, hi]) = w.between_ms {
            if lo > hi {
                return Err(format!(
                    "{key}.when.between_ms = [{lo}, {hi}]: the window's start is after its end"
                ));
            }
        }
        if let (Some(n), Some(total)) = (w.max_messages(), total) {
            if n.saturating_mul(f.repeat) >= total {
                return Err(format!(
                    "{key}.when: message {n} (x{} repeats) is not before the last of the {total} messages the clients send: it would never fire under load",
                    f.repeat
                ));
            }
        }
        if !(1..=100).contains(&f.repeat) {
            return Err(format!("{key}.repeat = {}: 1 to 100", f.repeat));
        }
        let needs_to = matches!(f.kind, FaultKind::Migrate | FaultKind::Reprotect);
        match (&f.to, needs_to) {
            (Some(to), true) => self.host_known(&format!("{key}.to"), to)?,
            (None, true) => {
                return Err(format!(
                    "{key}.to: fault {} needs the destination host",
                    f.kind.name()
                ))
            }
            (Some(_), false) => {
                return Err(format!(
                    "{key}.to: only migrate and reprotect take a destination, not {}",
                    f.kind.name()
                ))
            }
            (None, false) => {}
        }
        if f.kind == FaultKind::Partition {
            let Some(ends) = &f.between else {
                return Err(format!(
                    "{key}.between: a partition names its two ends (hosts or \"arbiter\")"
                ));
            };
            for end in ends {
                if end != "arbiter" {
                    self.host_known(&format!("{key}.between"), end)?;
                    continue;
                }
                match &self.arbiter {
                    None => {
                        return Err(format!(
                            "{key}.between: \"arbiter\" but the drill has no [arbiter]"
                        ))
                    }
                    Some(a) if a.kind == ArbiterKind::File => {
                        return Err(format!(
                            "{key}.between: \"arbiter\" with a file arbiter: it is storage both hosts reach, nothing to cut (an etcd arbiter runs on a host of its own)"
                        ))
                    }
                    Some(_) => {}
                }
            }
            if ends[0] == ends[1] {
                return Err(format!("{key}.between: two different ends"));
            }
            // The host an end stands for ("arbiter": etcd's host).
            let etcd = self.arbiter.as_ref().and_then(|a| a.host.as_deref());
            let host = |e: &str| {
                if e == "arbiter" {
                    etcd.unwrap_or_default().to_string()
                } else {
                    e.to_string()
                }
            };
            let (ha, hb) = (host(&ends[0]), host(&ends[1]));
            if ha == hb {
                return Err(format!(
                    "{key}.between: the arbiter runs on host {ha}: two different hosts"
                ));
            }
            if !self.linked(&ha, &hb) {
                return Err(format!(
                    "{key}.between: no [[links]] between {ha} and {hb} to cut"
                ));
            }
            match f.duration_ms {
                Some(1..=600_000) => {}
                other => {
                    return Err(format!(
                        "{key}.duration_ms = {other:?}: a partition lasts 1 to 600000 ms"
                    ))
                }
            }
        } else if f.between.is_some() || f.duration_ms.is_some() {
            return Err(format!(
                "{key}: between and duration_ms are for partitions, not {}",
                f.kind.name()
            ));
        }
        if f.counted_from == CountedFrom::Start {
            let before = i.checked_sub(1).map(|j| &self.faults[j]);
            if f.kind != FaultKind::Partition
                || before.is_none_or(|b| b.kind != FaultKind::Partition)
            {
                return Err(format!(
                    "{key}.counted_from = \"start\": only a partition right after a partition can count from the start of the one before (their cuts overlap); here it is {} after {}",
                    f.kind.name(),
                    before.map_or("the start of the drill", |b| b.kind.name())
                ));
            }
            if w.at_ms.is_none() && w.between_ms.is_none() {
                return Err(format!(
                    "{key}.when: counted from the start of the cut before, the wait is a time (at_ms, between_ms)"
                ));
            }
            if f.repeat != 1 || before.is_some_and(|b| b.repeat != 1) {
                return Err(format!(
                    "{key}.counted_from = \"start\": overlapping partitions fire once each (repeat = 1, also on the one before)"
                ));
            }
        }
        let protected = matches!(
            f.kind,
            FaultKind::KillPrimary
                | FaultKind::PullPlug
                | FaultKind::KillSecondary
                | FaultKind::Failover
        );
        if protected && self.vm.secondary.is_none() {
            return Err(format!(
                "{key}: fault {} needs a protected VM (vm.secondary)",
                f.kind.name()
            ));
        }
        if f.kind == FaultKind::Migrate && self.vm.secondary.is_none() {
            // The VM's host after the faults before this one.
            let mut at = self.vm.host.clone();
            for g in &self.faults[..i] {
                if g.kind == FaultKind::Migrate {
                    at = g.to.clone().unwrap_or(at);
                }
            }
            if f.to.as_deref() == Some(at.as_str()) && f.repeat == 1 {
                return Err(format!("{key}.to = {at:?}: the VM is already on that host"));
            }
            let to = f.to.as_deref().unwrap_or_default();
            if !self.linked(&at, to) {
                return Err(format!(
                    "{key}.to = {to:?}: no [[links]] between {at} and {to} to migrate over"
                ));
            }
        }
        Ok(())
    }

    /// Is there a link between hosts `a` and `b`?
    pub fn linked(&self, a: &str, b: &str) -> bool {
        self.links.iter().any(|l| {
            (l.between[0] == a && l.between[1] == b) || (l.between[0] == b && l.between[1] == a)
        })
    }

    /// What this drill needs that this build cannot do, one sentence each
    /// (empty: it can run).
    pub fn missing(&self) -> Vec<String> {
        let mut out = Vec::new();
        let arbiter = has_arbiter();
        let mut named = BTreeSet::new();
        let networked = self.workload() == WorkloadKind::Mail;
        for f in &self.faults {
            if !named.insert(f.kind.name()) {
                continue;
            }
            match f.kind {
                // A protected VM switches over to its secondary's host.
                FaultKind::Migrate if self.vm.secondary.is_some() && !arbiter => out.push(
                    format!("fault migrate of a protected VM (a switchover) needs failover, {NO}"),
                ),
                FaultKind::Migrate => {}
                _ if !arbiter => out.push(format!("fault {} needs failover, {NO}", f.kind.name())),
                FaultKind::KillSecondary => {}
                FaultKind::KillPrimary
                | FaultKind::PullPlug
                | FaultKind::Failover
                | FaultKind::Reprotect
                    if !networked || NETWORK_FAILOVER => {}
                FaultKind::Partition if !networked || NETWORK_FAILOVER => {}
                other => out.push(format!(
                    "fault {} needs failover of a networked VM (a secondary going live with --net: its frames and the TAP), {NO}",
                    other.name()
                )),
            }
        }
        if let Some(a) = &self.arbiter {
            if !arbiter {
                let kind = match a.kind {
                    ArbiterKind::File => "file",
                    ArbiterKind::Etcd => "etcd",
                };
                out.push(format!("arbiter {kind} needs failover, {NO}"));
            }
        }
        out
    }
}

/// Does a secondary that goes live take the VM's network with it (go-live
/// with `--net`, issue 10)? Until it does, the drills that fail a mail VM
/// over are refused; console workloads fail over already.
pub const NETWORK_FAILOVER: bool = true;

/// What a missing capability says.
const NO: &str = "which this build does not have";

/// Does this build have failover's arbiter (`tandem secondary --arbiter`)?
fn has_arbiter() -> bool {
    use clap::CommandFactory;
    crate::cli::Cli::command()
        .find_subcommand("secondary")
        .is_some_and(|c| c.get_arguments().any(|a| a.get_id() == "arbiter"))
}

/// The toml error in one or two lines: the position and what is wrong
/// (toml names the unknown key and the keys allowed, or the bad value and
/// the values allowed).
fn describe_toml_error(e: &toml::de::Error, text: &str) -> String {
    let msg = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            let got = text.get(span.clone()).unwrap_or("").trim();
            // The table the key is in: the last header above it.
            let line_start = before.rfind('\n').map_or(0, |i| i + 1);
            let table = before[..line_start]
                .lines()
                .rev()
                .map(str::trim)
                .find(|l| l.starts_with('['))
                .map(|h| format!(" in {h}"))
                .unwrap_or_default();
            format!("line {line}, column {col} (`{got}`{table}): {msg}")
        }
        None => msg,
    }
}
