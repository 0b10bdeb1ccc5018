//! The etcd arbiter (`--arbiter etcd:URL[,URL...]`, issue 10) against a
//! real etcd on loopback (`common/etcd.rs`): one winner among concurrent
//! claimants, the winner's retry, the loser learns who holds the VM, the
//! lease kept alive past its TTL, the holder stops before the TTL when etcd
//! is killed, and an unreachable etcd gives no answer.

mod common;
#[path = "common/etcd.rs"]
mod etcd;

use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd::{dead_url, Etcd};
use failover::arbiter::{Arbiter, ArbiterError, EtcdArbiter, EtcdOptions, Verdict};

/// An arbiter on `urls` whose lease loss is reported on the channel
/// (instead of ending the test process).
fn arbiter(urls: &[&str], ttl_s: u64) -> (EtcdArbiter, mpsc::Receiver<(Instant, String)>) {
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let opts = EtcdOptions {
        ttl_s,
        on_lost: Arc::new(move |why: &str| {
            let _ = tx.lock().unwrap().send((Instant::now(), why.to_string()));
        }),
        ..EtcdOptions::default()
    };
    let urls = urls.iter().map(|u| u.to_string()).collect();
    (EtcdArbiter::new(urls, opts), rx)
}

#[test]
fn concurrent_claimants_have_one_winner_and_the_losers_learn_who() {
    let etcd = Etcd::start("etcd-concurrent");
    let results: Vec<(String, Verdict, Option<u64>)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|i| {
                let url = etcd.url.clone();
                s.spawn(move || {
                    let (a, _lost) = arbiter(&[&url], 10);
                    let me = format!("claimant {i}");
                    let v = a.claim("ab12", 1, &me).unwrap();
                    let token = a.fencing_token("ab12", 1);
                    (me, v, token)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let winners: Vec<_> = results
        .iter()
        .filter(|(_, v, _)| *v == Verdict::Won)
        .collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    let (winner, _, token) = winners[0];
    assert!(token.is_some_and(|t| t > 0), "{results:?}");
    for (me, v, t) in &results {
        if me != winner {
            assert_eq!(
                *v,
                Verdict::Lost {
                    holder: winner.clone()
                }
            );
            assert_eq!(*t, None);
        }
    }
    let (a, _) = arbiter(&[&etcd.url], 10);
    let claims = a.claims().unwrap();
    assert_eq!(
        claims,
        vec![(EtcdArbiter::key("ab12", 1), winner.clone())],
        "{claims:?}"
    );
}

#[test]
fn the_winners_retry_wins_again_and_generations_are_other_claims() {
    let etcd = Etcd::start("etcd-retry");
    let (a, _lost_a) = arbiter(&[&etcd.url], 10);
    assert_eq!(a.claim("cd34", 1, "secondary b").unwrap(), Verdict::Won);
    let token = a.fencing_token("cd34", 1).unwrap();
    // The same holder again (its first answer lost), from a new client.
    let (b, _lost_b) = arbiter(&[&etcd.url], 10);
    assert_eq!(b.claim("cd34", 1, "secondary b").unwrap(), Verdict::Won);
    assert_eq!(b.fencing_token("cd34", 1), Some(token));
    let (c, _lost_c) = arbiter(&[&etcd.url], 10);
    assert_eq!(
        c.claim("cd34", 1, "primary a").unwrap(),
        Verdict::Lost {
            holder: "secondary b".into()
        }
    );
    // Another generation and another VM are other claims, with larger
    // fencing tokens.
    assert_eq!(c.claim("cd34", 2, "primary a").unwrap(), Verdict::Won);
    let t2 = c.fencing_token("cd34", 2).unwrap();
    assert!(t2 > token, "{t2} <= {token}");
    assert_eq!(c.claim("ef56", 1, "primary a").unwrap(), Verdict::Won);
    assert!(c.fencing_token("ef56", 1).unwrap() > t2);
    assert!(c.claim("../x", 1, "me").is_err());
}

/// The holder renews its lease past the TTL; etcd killed, it gives up
/// (the process would stop) before the TTL from the kill has passed.
#[test]
fn the_lease_is_kept_alive_and_the_holder_stops_before_the_ttl_when_etcd_dies() {
    let mut etcd = Etcd::start("etcd-killed");
    let ttl = Duration::from_secs(2);
    let (a, lost) = arbiter(&[&etcd.url], ttl.as_secs());
    assert_eq!(a.claim("ab12", 1, "primary a").unwrap(), Verdict::Won);
    // Held past its TTL: the key is still there (a claim by another loses).
    let (other, _) = arbiter(&[&etcd.url], 10);
    let won = Instant::now();
    while won.elapsed() < ttl + ttl / 2 {
        assert_eq!(
            other.claim("ab12", 1, "secondary b").unwrap(),
            Verdict::Lost {
                holder: "primary a".into()
            }
        );
        assert!(lost.try_recv().is_err(), "gave up with etcd alive");
        std::thread::sleep(Duration::from_millis(200));
    }
    etcd.kill();
    let killed = Instant::now();
    let (at, why) = lost
        .recv_timeout(Duration::from_secs(30))
        .expect("the holder never gave up after etcd was killed");
    let after = at - killed;
    assert!(
        after < ttl,
        "stopped {after:?} after etcd was killed: not before the TTL {ttl:?}"
    );
    assert!(
        why.contains("could not be renewed") && why.contains(&etcd.url) && why.contains("ab12"),
        "{why}"
    );
    eprintln!("stopped {after:?} after etcd was killed (TTL {ttl:?}): {why}");
}

#[test]
fn an_unreachable_etcd_gives_no_answer_and_names_the_url() {
    let dead = dead_url();
    let (a, _) = arbiter(&[&dead], 10);
    let start = Instant::now();
    let e = a.claim("ab12", 1, "secondary b").unwrap_err();
    assert!(matches!(e, ArbiterError::Unreachable { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains(&dead), "{msg}");
    assert!(start.elapsed() < Duration::from_secs(30), "{msg}");
    assert_eq!(a.fencing_token("ab12", 1), None);
    // A cluster with one member down: the claim goes to the next one.
    let etcd = Etcd::start("etcd-fallback");
    let (b, _) = arbiter(&[&dead, &etcd.url], 10);
    assert_eq!(b.claim("ab12", 1, "secondary b").unwrap(), Verdict::Won);
}
