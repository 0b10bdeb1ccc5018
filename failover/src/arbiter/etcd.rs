//! `--arbiter etcd:URL[,URL...][?ttl=SECONDS]`: the arbiter for clusters.
//!
//! The claim of `(V, G)` is the key `/tandem/arbiter/V/gG` in etcd, its value
//! the same claim text as a file arbiter's claim file (VM, generation,
//! holder). Claiming it:
//! 1. grant a lease of `ttl` seconds (default [`DEFAULT_TTL_S`]);
//! 2. one transaction: if the key's `create_revision` is 0 (the key does
//!    not exist) put it with that lease, else read it. etcd applies it
//!    atomically, so among concurrent claimants exactly one puts the key;
//!    the others read the winner's name;
//! 3. the winner's fencing token is the revision at which the key was
//!    created: every later claim in that etcd cluster gets a larger one.
//!
//! A key that exists and names us is our own earlier claim whose answer was
//! lost (a timeout after the transaction committed): we won, and keep that
//! key's lease alive.
//!
//! **The lease.** From the `Won` on, a task of this arbiter renews the lease
//! every `ttl/5`. Each renewal that etcd answers moves the lease's end to
//! `sent + TTL` (measured from when the renewal was *sent*: etcd's own end
//! is at least that late). If no renewal succeeds until `end - ttl/5`, the
//! process stops at once — status [`STOPPED`], saying why — before etcd can
//! let the lease expire, delete the key and give the VM to someone else:
//! this copy never runs past the moment another may start. (`_exit`: what
//! the process holds back, its held outputs, never leaves.) If etcd answers
//! that the lease is gone, it stops at once too.
//!
//! **Defaults, and why.** The TTL does not delay a failover (the heartbeat
//! timeout does: the key does not exist until someone claims it). It is how
//! long a live VM rides out an etcd that does not answer — a leader
//! election (etcd's default election timeout is 1 s), a restart, a
//! partition between this host and etcd — before it must stop, and how
//! long a dead holder's key lingers. Hence a generous 10 s (stop after 8 s
//! without a renewal; Kubernetes' leader election: 15 s lease, 10 s renew
//! deadline). Renewing every ttl/5 leaves four tries before the stop; the
//! ttl/5 margin covers a renewal task delayed on a loaded host (we measured
//! silences up to 184 ms under CPU load, `docs/failover.md`) and the ppm
//! rate difference of two clocks. Every etcd request has a bound: a claim's
//! requests [`CLAIM_TIMEOUT`] each, a renewal ttl/5; errors name the URL and
//! what failed. etcd may grant a longer TTL than asked (its minimum is
//! 1.5 election timeouts, 2 s by default); the granted one is used.
//!
//! Only `http://` members are reached (TLS to etcd is not built).

use std::future::Future;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, Error as EtcdError, GetOptions,
    LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp, TxnOpResponse,
};

use super::{claim_holder, claim_text, clean, Arbiter, ArbiterError, Verdict, STOPPED};
use crate::heartbeat::check_vm_id;

/// The lease's TTL asked for, in seconds (see the module docs).
pub const DEFAULT_TTL_S: u64 = 10;
/// Bound of each etcd request of a claim, per URL.
pub const CLAIM_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest TTL accepted in a spec.
const MAX_TTL_S: u64 = 3600;
/// Where claims live in etcd.
const PREFIX: &str = "/tandem/arbiter/";
/// Largest claim value read back.
const MAX_VALUE: usize = 4096;

/// What to do when the lease can no longer be kept (the message says why).
pub type OnLost = Arc<dyn Fn(&str) + Send + Sync>;

/// Settings of an [`EtcdArbiter`].
#[derive(Clone)]
pub struct EtcdOptions {
    /// Lease TTL asked for, seconds.
    pub ttl_s: u64,
    /// Bound of each request of a claim, per URL.
    pub claim_timeout: Duration,
    /// Called (from the renewal task) when the lease could end; the default
    /// prints the message and ends the process with [`STOPPED`].
    pub on_lost: OnLost,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            ttl_s: DEFAULT_TTL_S,
            claim_timeout: CLAIM_TIMEOUT,
            on_lost: Arc::new(stop_process),
        }
    }
}

/// The default [`EtcdOptions::on_lost`].
fn stop_process(why: &str) {
    eprintln!("tandem: {why}");
    // SAFETY: _exit(2) ends the process at once, running no destructors and
    // flushing nothing: what this process still holds never leaves.
    unsafe { libc::_exit(STOPPED) }
}

/// See the module docs.
pub struct EtcdArbiter {
    urls: Vec<String>,
    opts: EtcdOptions,
    /// Fencing tokens of the claims won: `(vm, generation, token)`.
    won: Mutex<Vec<(String, u64, u64)>>,
}

/// What a claim found (the fencing token if won).
enum Claimed {
    Won(u64),
    Lost(String),
}

/// A lease we hold and keep alive.
struct Held {
    /// The URL that answered last.
    at: usize,
    client: Option<Client>,
    stream: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    lease: i64,
    ttl: Duration,
    /// `sent + TTL` of the last renewal etcd answered (or of the grant).
    end: Instant,
}

/// Everything a claim's thread needs (owned: it outlives the call).
#[derive(Clone)]
struct Job {
    urls: Vec<String>,
    opts: EtcdOptions,
    describe: String,
    vm: String,
    generation: u64,
    holder: String,
}

impl EtcdArbiter {
    /// An arbiter on the etcd members `urls` (`http://HOST:PORT`).
    pub fn new(urls: Vec<String>, opts: EtcdOptions) -> Self {
        EtcdArbiter {
            urls,
            opts,
            won: Mutex::new(Vec::new()),
        }
    }

    /// Parse what follows `etcd:` in a spec: `URL[,URL...][?ttl=SECONDS]`.
    pub fn from_spec(rest: &str) -> Result<Self, String> {
        let (list, query) = match rest.split_once('?') {
            Some((l, q)) => (l, Some(q)),
            None => (rest, None),
        };
        let mut urls = Vec::new();
        for u in list.split(',') {
            let url = if let Some(hp) = u.strip_prefix("http://") {
                hp.to_string()
            } else if u.starts_with("https://") {
                return Err(format!(
                    "{u}: TLS to etcd is not built yet; name the members as http://HOST:PORT"
                ));
            } else if u.contains("://") {
                return Err(format!("{u}: expected http://HOST:PORT"));
            } else {
                u.to_string()
            };
            let ok = url
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0))
                && !url.contains(['/', ' ', '?', '@']);
            if !ok {
                return Err(format!("{u:?}: expected http://HOST:PORT"));
            }
            urls.push(format!("http://{url}"));
        }
        let mut opts = EtcdOptions::default();
        if let Some(q) = query {
            for kv in q.split('&') {
                match kv.split_once('=') {
                    Some(("ttl", v)) => {
                        opts.ttl_s = v
                            .parse()
                            .ok()
                            .filter(|t| (1..=MAX_TTL_S).contains(t))
                            .ok_or_else(|| {
                                format!("ttl={v}: expected whole seconds, 1..={MAX_TTL_S}")
                            })?
                    }
                    _ => return Err(format!("{kv}: the only option is ttl=SECONDS")),
                }
            }
        }
        Ok(EtcdArbiter::new(urls, opts))
    }

    /// The key of `(vm_id, generation)`.
    pub fn key(vm_id: &str, generation: u64) -> String {
        format!("{PREFIX}{vm_id}/g{generation}")
    }

    fn job(&self, vm: &str, generation: u64, holder: &str) -> Job {
        Job {
            urls: self.urls.clone(),
            opts: self.opts.clone(),
            describe: self.describe(),
            vm: vm.into(),
            generation,
            holder: holder.into(),
        }
    }

    /// Run `make(tx)` on a thread of its own with its own runtime (callers
    /// may be inside another one) and wait up to `bound` for what it sends.
    fn on_thread<T, F>(
        &self,
        bound: Duration,
        make: impl FnOnce(mpsc::Sender<T>) -> F + Send + 'static,
    ) -> Result<T, ArbiterError>
    where
        T: Send + 'static,
        F: Future<Output = ()>,
    {
        let unreachable = |reason: String| ArbiterError::Unreachable {
            arbiter: self.describe(),
            reason,
        };
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("etcd-arbiter".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(make(tx)),
                    Err(e) => eprintln!("tandem: the etcd arbiter's runtime: {e}"),
                }
            })
            .map_err(|e| unreachable(format!("starting its thread: {e}")))?;
        rx.recv_timeout(bound).map_err(|_| {
            unreachable(format!(
                "no answer within {} ms from any of its members",
                bound.as_millis()
            ))
        })
    }

    /// Every claim held in etcd now: `(key, holder)` (for operators and
    /// tests).
    pub fn claims(&self) -> Result<Vec<(String, String)>, ArbiterError> {
        self.read_claims().map(|(_, all)| all)
    }

    /// [`Self::claims`] and the etcd cluster's id (from the answer's header).
    fn read_claims(&self) -> Result<(u64, Vec<(String, String)>), ArbiterError> {
        let job = self.job("", 0, "");
        let bound = self.opts.claim_timeout * self.urls.len() as u32 + Duration::from_secs(1);
        self.on_thread(bound, move |tx| async move {
            let mut errs = Vec::new();
            for url in &job.urls {
                let t = job.opts.claim_timeout;
                let got = async {
                    let mut c = connect(url, t).await?;
                    bounded(
                        t,
                        "reading the claims",
                        c.get(PREFIX, Some(GetOptions::new().with_prefix())),
                    )
                    .await
                }
                .await;
                match got {
                    Ok(r) => {
                        let all = r
                            .kvs()
                            .iter()
                            .map(|kv| {
                                let text = String::from_utf8_lossy(kv.value());
                                let holder = text
                                    .lines()
                                    .find_map(|l| l.strip_prefix("holder "))
                                    .unwrap_or("?")
                                    .to_string();
                                (String::from_utf8_lossy(kv.key()).into_owned(), holder)
                            })
                            .collect();
                        let cluster = r.header().map_or(0, |h| h.cluster_id());
                        let _ = tx.send(Ok((cluster, all)));
                        return;
                    }
                    Err(e) => errs.push(format!("{url}: {e}")),
                }
            }
            let _ = tx.send(Err(job.unreachable(errs)));
        })?
    }
}

/// `Client` for one member; connecting is bounded by `t` (the channel
/// connects lazily: a dead member shows at the first request).
async fn connect(url: &str, t: Duration) -> Result<Client, String> {
    let opts = ConnectOptions::new().with_connect_timeout(t);
    bounded(t, "connecting", Client::connect([url], Some(opts))).await
}

/// `f`, bounded by `t`; an error names `what`.
async fn bounded<T, E: std::fmt::Display>(
    t: Duration,
    what: &str,
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(t, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer within {} ms", t.as_millis())),
    }
}

/// One renewal of `lease`: its new TTL, or `None` if etcd says it is gone.
async fn renew(
    url: &str,
    t: Duration,
    client: &mut Option<Client>,
    stream: &mut Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    lease: i64,
) -> Result<Option<Duration>, String> {
    if client.is_none() {
        *client = Some(connect(url, t).await?);
    }
    let Some(c) = client.as_mut() else {
        unreachable!("connected above")
    };
    if stream.is_none() {
        match c.lease_keep_alive(lease).await {
            Ok(s) => *stream = Some(s),
            Err(EtcdError::LeaseKeepAliveError(m)) if m.contains("not found") => return Ok(None),
            Err(e) => return Err(format!("opening the keep-alive stream: {e}")),
        }
    }
    let Some((keeper, answers)) = stream.as_mut() else {
        unreachable!("opened above")
    };
    keeper
        .keep_alive()
        .await
        .map_err(|e| format!("keep-alive: {e}"))?;
    match answers.message().await {
        Ok(Some(r)) if r.ttl() > 0 => Ok(Some(Duration::from_secs(r.ttl() as u64))),
        Ok(Some(_)) => Ok(None),
        Ok(None) => Err("keep-alive: the stream was closed".into()),
        Err(e) => Err(format!("keep-alive answer: {e}")),
    }
}

impl Job {
    fn unreachable(&self, errs: Vec<String>) -> ArbiterError {
        ArbiterError::Unreachable {
            arbiter: self.describe.clone(),
            reason: errs.join("; "),
        }
    }

    /// Claim on the members in order; the first that answers decides.
    async fn claim(&self) -> (Result<Claimed, ArbiterError>, Option<Held>) {
        let mut errs = Vec::new();
        for at in 0..self.urls.len() {
            match self.claim_at(at).await {
                Ok(r) => return r,
                Err(e) => errs.push(format!("{}: {e}", self.urls[at])),
            }
        }
        (Err(self.unreachable(errs)), None)
    }

    /// Claim on member `at`; `Err`: it did not answer (try the next).
    async fn claim_at(
        &self,
        at: usize,
    ) -> Result<(Result<Claimed, ArbiterError>, Option<Held>), String> {
        let (url, t) = (&self.urls[at], self.opts.claim_timeout);
        let key = EtcdArbiter::key(&self.vm, self.generation);
        let mut client = connect(url, t).await?;
        let sent = Instant::now();
        let grant = bounded(
            t,
            "lease grant",
            client.lease_grant(self.opts.ttl_s as i64, None),
        )
        .await?;
        if grant.ttl() <= 0 {
            return Err(format!(
                "lease grant: etcd granted TTL {} ({})",
                grant.ttl(),
                grant.error()
            ));
        }
        let (lease, ttl) = (grant.id(), Duration::from_secs(grant.ttl() as u64));
        let value = claim_text(&self.vm, self.generation, &self.holder);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                value,
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key.clone(), None)]);
        // No revoke if this fails: the transaction may have committed, and
        // the retry on the next member then finds our claim under this lease.
        let resp = bounded(t, "transaction", client.txn(txn)).await?;
        if resp.succeeded() {
            let token = resp.header().map_or(0, |h| h.revision()) as u64;
            let held = Held {
                at,
                client: Some(client),
                stream: None,
                lease,
                ttl,
                end: sent + ttl,
            };
            return Ok((Ok(Claimed::Won(token)), Some(held)));
        }
        let kv = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().cloned(),
            _ => None,
        });
        // The lease we did not use (best effort: it ends by itself anyway).
        let _ = tokio::time::timeout(t, client.lease_revoke(lease)).await;
        let kv = kv.ok_or("the transaction found the key but returned none")?;
        let damaged = |reason: String| ArbiterError::Damaged {
            arbiter: self.describe.clone(),
            what: key.clone(),
            reason,
        };
        if kv.value().len() > MAX_VALUE {
            return Ok((Err(damaged(format!("is over {MAX_VALUE} bytes"))), None));
        }
        let text = String::from_utf8_lossy(kv.value());
        match claim_holder(&text, &self.vm, self.generation) {
            Err(reason) => Ok((Err(damaged(reason)), None)),
            Ok(h) if h == self.holder => {
                // Our own claim (an answer lost): keep its lease alive.
                let mut held = Held {
                    at,
                    client: Some(client),
                    stream: None,
                    lease: kv.lease(),
                    ttl,
                    end: Instant::now(),
                };
                let sent = Instant::now();
                let renewed = bounded(
                    t,
                    "renewing our earlier claim's lease",
                    renew(url, t, &mut held.client, &mut held.stream, held.lease),
                )
                .await?;
                let ttl = renewed.ok_or_else(|| {
                    format!("our earlier claim's lease {:x} has ended", held.lease)
                })?;
                (held.ttl, held.end) = (ttl, sent + ttl);
                Ok((Ok(Claimed::Won(kv.create_revision() as u64)), Some(held)))
            }
            Ok(h) => Ok((Ok(Claimed::Lost(h)), None)),
        }
    }

    /// Keep `h` alive until the process ends; call `on_lost` (and return)
    /// when it could end (see the module docs).
    async fn keep_alive(&self, mut h: Held) {
        let n = self.urls.len();
        let every = (h.ttl / 5).max(Duration::from_millis(100));
        let margin = h.ttl / 5;
        let pause = (every / 4).max(Duration::from_millis(20));
        let mut errs: Vec<Option<String>> = vec![None; n];
        let mut last_ok = h.end - h.ttl;
        let mut next = Instant::now() + every;
        loop {
            let stop_at = h.end.checked_sub(margin).unwrap_or(h.end);
            let now = Instant::now();
            if now >= stop_at {
                let why: Vec<String> = (0..n)
                    .filter_map(|i| errs[i].as_ref().map(|e| format!("{}: {e}", self.urls[i])))
                    .collect();
                (self.opts.on_lost)(&format!(
                    "the arbiter {}: the lease {:x} of VM {} generation {} could not be renewed for {:.1} s ({}); etcd may end it in {:.1} s and give the VM to another: this copy stops now, its held outputs never released",
                    self.describe,
                    h.lease,
                    self.vm,
                    self.generation,
                    last_ok.elapsed().as_secs_f64(),
                    if why.is_empty() { "no answer".to_string() } else { why.join("; ") },
                    h.end.saturating_duration_since(Instant::now()).as_secs_f64(),
                ));
                return;
            }
            if now < next {
                tokio::time::sleep_until(next.min(stop_at).into()).await;
                continue;
            }
            let url = &self.urls[h.at];
            let sent = Instant::now();
            let budget = every.min(stop_at - sent);
            let r = tokio::time::timeout(
                budget,
                renew(url, budget, &mut h.client, &mut h.stream, h.lease),
            )
            .await;
            match r {
                Ok(Ok(Some(ttl))) => {
                    (h.end, last_ok, next) = (sent + ttl, sent, sent + every);
                    errs.fill(None);
                    continue;
                }
                Ok(Ok(None)) => {
                    (self.opts.on_lost)(&format!(
                        "the arbiter {}: etcd ({url}) says the lease {:x} of VM {} generation {} no longer exists (expired or revoked): this copy stops now, its held outputs never released",
                        self.describe, h.lease, self.vm, self.generation
                    ));
                    return;
                }
                Ok(Err(e)) => {
                    errs[h.at] = Some(e);
                    next = Instant::now() + pause;
                }
                Err(_) => {
                    errs[h.at] = Some(format!(
                        "keep-alive: no answer within {} ms",
                        budget.as_millis()
                    ));
                    next = Instant::now();
                }
            }
            // Try the next member, on a fresh connection.
            (h.client, h.stream) = (None, None);
            h.at = (h.at + 1) % n;
        }
    }
}

impl Arbiter for EtcdArbiter {
    fn claim(&self, vm_id: &str, generation: u64, holder: &str) -> Result<Verdict, ArbiterError> {
        check_vm_id(vm_id)?;
        let job = self.job(vm_id, generation, &clean(holder));
        // Per member: connect, grant, transaction, revoke or renew.
        let bound = self.opts.claim_timeout * (4 * self.urls.len() as u32) + Duration::from_secs(1);
        let claimed = self.on_thread(bound, move |tx| async move {
            let (verdict, held) = job.claim().await;
            // A caller that gave up never learns it won: do not keep it.
            if tx.send(verdict).is_ok() {
                if let Some(h) = held {
                    job.keep_alive(h).await;
                }
            } else if let Some(mut h) = held {
                if let Some(c) = h.client.as_mut() {
                    let _ =
                        tokio::time::timeout(job.opts.claim_timeout, c.lease_revoke(h.lease)).await;
                }
            }
        })??;
        Ok(match claimed {
            Claimed::Won(token) => {
                let mut won = self.won.lock().unwrap_or_else(|e| e.into_inner());
                won.push((vm_id.to_string(), generation, token));
                Verdict::Won
            }
            Claimed::Lost(holder) => Verdict::Lost { holder },
        })
    }

    fn describe(&self) -> String {
        let mut s = format!("etcd:{}", self.urls.join(","));
        if self.opts.ttl_s != DEFAULT_TTL_S {
            s += &format!("?ttl={}", self.opts.ttl_s);
        }
        s
    }

    /// A member answers a read of the claims.
    fn check(&self) -> Result<(), ArbiterError> {
        self.claims().map(|_| ())
    }

    /// The etcd cluster's id, as its members report it: every member of
    /// one cluster gives the same, another cluster another.
    fn identity(&self) -> Result<String, ArbiterError> {
        let (cluster, _) = self.read_claims()?;
        Ok(format!("etcd cluster {cluster:016x}"))
    }

    fn fencing_token(&self, vm_id: &str, generation: u64) -> Option<u64> {
        let won = self.won.lock().unwrap_or_else(|e| e.into_inner());
        won.iter()
            .rev()
            .find(|(v, g, _)| v == vm_id && *g == generation)
            .map(|(_, _, t)| *t)
    }
}
