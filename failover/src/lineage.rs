//! The protection history of one running VM (issue 10, re-protection;
//! `docs/failover.md`): its identity for the arbiter, the protection
//! generation it is at, whom it took over from, and the spare secondaries
//! it may seed by itself.
//!
//! Every protection of a VM gets the next generation: 1 for its first
//! secondary, 2 for the one seeded after a failover or after losing the
//! first, and so on. The arbiter's claim is per `(vm_id, generation)`, so
//! a new pair never contends with a claim the old one left behind, and a
//! copy of an older generation (the old primary woken from a freeze) can
//! never win the new one. The generation travels to the secondary in the
//! `PROTECTION` frame (`crate::heartbeat::Protection`), so both sides of
//! a pair claim the same key; at go-live the new primary keeps the VM's id
//! and generation, and its next protection is one higher.
//!
//! [`Lineage`] is a pure state machine; the VM's controller holds it.

use serde::{Deserialize, Serialize};

/// What the VM's protection is now, as `tandem status` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Never protected.
    #[default]
    Unprotected,
    /// A secondary is being seeded.
    Seeding,
    /// A secondary holds a copy.
    Protected,
    /// This host went live after its primary was lost: it runs alone.
    UnprotectedAfterFailover,
    /// This host took the VM over from its primary (`tandem switchover`):
    /// it runs alone.
    UnprotectedAfterSwitchover,
    /// Its secondary was lost and this primary won the arbiter: it runs
    /// alone.
    UnprotectedSecondaryLost,
    /// Protection was ended by the operator (`tandem unprotect`).
    EndedByOperator,
    /// This host holds the copy: it is a secondary.
    Secondary,
}

impl Role {
    /// The words of `tandem status`.
    pub fn describe(self) -> &'static str {
        match self {
            Role::Unprotected => "unprotected",
            Role::EndedByOperator => "unprotected (protection ended by tandem unprotect)",
            Role::Seeding => "seeding a secondary",
            Role::Protected => "protected",
            Role::UnprotectedAfterFailover => "unprotected after failover",
            Role::UnprotectedAfterSwitchover => "unprotected after switchover",
            Role::UnprotectedSecondaryLost => "unprotected after losing its secondary",
            Role::Secondary => "secondary (the copy)",
        }
    }
}

/// The VM's protection history (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lineage {
    /// The VM's identity for the arbiter (chosen at its first protection,
    /// kept across failovers).
    pub vm_id: Option<String>,
    /// The newest protection generation used (0: never protected).
    pub generation: u64,
    /// What the protection is now.
    pub role: Role,
    /// The primary this host took over from (`NAME at ADDR`), after a
    /// failover.
    pub took_over_from: Option<String>,
    /// The secondary of the current (or last) protection.
    pub peer: Option<String>,
    /// Spare secondaries not used yet (`--spare`), in order.
    pub spares: Vec<String>,
    /// What the spare logic last did (for `tandem status`).
    pub spare_note: Option<String>,
}

impl Lineage {
    /// A host that went live for `(vm_id, generation)` after losing the
    /// primary `from`.
    pub fn after_failover(vm_id: String, generation: u64, from: String) -> Lineage {
        Lineage {
            vm_id: Some(vm_id),
            generation,
            role: Role::UnprotectedAfterFailover,
            took_over_from: Some(from),
            ..Default::default()
        }
    }

    /// The identity of the next protection: the VM's id (`fresh` if it has
    /// none yet) and the next generation. The generation is spent even if
    /// the protection fails (generations only grow).
    pub fn next_protection(&mut self, fresh: &str) -> (String, u64) {
        let id = self.vm_id.get_or_insert_with(|| fresh.to_string()).clone();
        self.generation += 1;
        self.role = Role::Seeding;
        (id, self.generation)
    }

    /// The secondary `peer` holds the seed.
    pub fn protected(&mut self, peer: &str) {
        self.role = Role::Protected;
        self.peer = Some(peer.to_string());
    }

    /// The protection did not start (seeding failed): back to running
    /// alone, as before.
    pub fn protect_failed(&mut self, before: Role) {
        self.role = before;
    }

    /// The secondary was lost and this primary won the arbiter.
    pub fn secondary_lost(&mut self) {
        self.role = Role::UnprotectedSecondaryLost;
    }

    /// The operator ended protection.
    pub fn unprotected(&mut self) {
        self.role = Role::EndedByOperator;
    }

    /// Take the next spare (removed from the list: a spare is seeded once).
    pub fn take_spare(&mut self) -> Option<String> {
        if self.spares.is_empty() {
            None
        } else {
            Some(self.spares.remove(0))
        }
    }

    /// Running alone now?
    pub fn alone(&self) -> bool {
        !matches!(self.role, Role::Seeding | Role::Protected | Role::Secondary)
    }
}

/// Parse `--spare ADDR[,ADDR...]` (each `HOST:PORT`, non-empty, at most
/// 16).
pub fn parse_spares(list: &[String]) -> Result<Vec<String>, String> {
    let spares: Vec<String> = list
        .iter()
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    if spares.len() > 16 {
        return Err(format!(
            "--spare: {} addresses given, at most 16",
            spares.len()
        ));
    }
    for s in &spares {
        match s.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => {}
            _ => return Err(format!("--spare {s}: expected HOST:PORT")),
        }
    }
    Ok(spares)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_grow_across_failovers() {
        let mut l = Lineage::default();
        assert!(l.alone());
        assert_eq!(l.next_protection("aa"), ("aa".into(), 1));
        l.protected("sec at x");
        assert!(!l.alone());
        // The secondary went live for (aa, 1): its next protection is 2.
        let mut b = Lineage::after_failover("aa".into(), 1, "pri at y".into());
        assert_eq!(b.role.describe(), "unprotected after failover");
        assert_eq!(b.next_protection("bb"), ("aa".into(), 2));
        b.protect_failed(Role::UnprotectedAfterFailover);
        // A failed attempt spent its generation.
        assert_eq!(b.next_protection("bb"), ("aa".into(), 3));
    }

    #[test]
    fn spares_are_parsed_and_used_once() {
        let mut l = Lineage {
            spares: parse_spares(&["a:1,b:2".into(), " c:3".into()]).unwrap(),
            ..Default::default()
        };
        assert_eq!(l.take_spare().as_deref(), Some("a:1"));
        assert_eq!(l.spares, ["b:2", "c:3"]);
        assert!(parse_spares(&["nohost".into()]).is_err());
        assert!(parse_spares(&["h:99999".into()]).is_err());
        assert!(parse_spares(&[]).unwrap().is_empty());
    }
}
