//! A console workload (`fill`, `dirty`, `ticks` of the test guest): its
//! client is whoever reads the console. Across a failover the old
//! primary's console followed by the new primary's (the outputs produced
//! again at the boundary counted once) must be exactly the console of an
//! unfailed run, RESULT line included.

use serde::Serialize;

use super::{Check, Proc, Run, RunReport};

/// What the console showed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConsoleReport {
    /// Lines of the unfailed run's console.
    pub expected_lines: u32,
    /// Lines the reader of the console saw: every primary's, in order,
    /// with what a new primary produced again counted once.
    pub lines: u32,
    /// Bytes a new primary produced again at a failover (the ones the old
    /// primary may not have released): duplicates the reader drops.
    pub produced_again_bytes: u64,
    /// The guest's RESULT line, and the unfailed run's.
    pub result: Option<String>,
    pub expected_result: Option<String>,
}

/// Lines the primaries printed so far (the trigger of a fault; the few
/// produced again at a failover count twice, which only moves a later
/// trigger by a line or two).
pub fn lines_seen(primaries: &[&Proc]) -> u32 {
    primaries
        .iter()
        .map(|p| p.out.lock().unwrap_or_else(|e| e.into_inner()).len() as u32)
        .sum()
}

/// The consoles in order, each new one's start that repeats the end of
/// what came before counted once; and how many bytes were repeated.
pub fn joined(parts: &[Vec<u8>]) -> (Vec<u8>, u64) {
    let mut all: Vec<u8> = Vec::new();
    let mut again = 0;
    for p in parts {
        let most = all.len().min(p.len());
        let k = (0..=most)
            .rev()
            .find(|&k| all[all.len() - k..] == p[..k])
            .unwrap_or(0);
        all.extend_from_slice(&p[k..]);
        again += k as u64;
    }
    (all, again)
}

fn result_line(text: &str) -> Option<String> {
    text.lines()
        .find(|l| l.starts_with("RESULT "))
        .map(str::to_string)
}

impl Run<'_> {
    /// The checks of a console workload (its guest has ended).
    pub(super) fn evaluate_console(&mut self, report: &mut RunReport) {
        let want =
            String::from_utf8_lossy(self.ctx.reference.as_deref().unwrap_or_default()).into_owned();
        let parts: Vec<Vec<u8>> = self
            .primaries()
            .iter()
            .map(|p| p.out_raw.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect();
        let (got, again) = joined(&parts);
        let got = String::from_utf8_lossy(&got).into_owned();
        let c = ConsoleReport {
            expected_lines: want.lines().count() as u32,
            lines: got.lines().count() as u32,
            produced_again_bytes: again,
            result: result_line(&got),
            expected_result: result_line(&want),
        };
        report.live_copies = self.live_copies();
        report.max_gap_ms = self.console_max_gap();
        let mut checks = self.fault_checks(report);
        let e = &self.ctx.scn.expect;
        if e.no_acknowledged_lost {
            let first_diff = want
                .lines()
                .zip(got.lines())
                .position(|(a, b)| a != b)
                .or((want.lines().count() != got.lines().count())
                    .then(|| want.lines().count().min(got.lines().count())));
            checks.push(Check {
                name: "no console output lost or repeated".into(),
                passed: got == want,
                seen: match first_diff {
                    None if got == want => format!(
                        "{} lines, exactly the unfailed run's ({again} bytes produced again by the new primary, counted once)",
                        c.lines
                    ),
                    None => "the same lines, different bytes".into(),
                    Some(i) => format!(
                        "{} lines of {}; line {} is {:?}, the unfailed run's {:?}",
                        c.lines,
                        c.expected_lines,
                        i + 1,
                        got.lines().nth(i).unwrap_or("(none)"),
                        want.lines().nth(i).unwrap_or("(none)")
                    ),
                },
            });
        }
        if e.same_result_as_unfailed {
            checks.push(Check {
                name: "same result as an unfailed run".into(),
                passed: c.result.is_some() && c.result == c.expected_result,
                seen: format!(
                    "{} (unfailed: {})",
                    c.result.as_deref().unwrap_or("no RESULT"),
                    c.expected_result.as_deref().unwrap_or("no RESULT")
                ),
            });
        }
        if e.one_live_copy {
            checks.push(Check {
                name: "exactly one live copy".into(),
                passed: report.live_copies == 1,
                seen: format!(
                    "{} VMMs ran the guest to its end (or still run)",
                    report.live_copies
                ),
            });
        }
        if let Some(limit) = e.max_gap_ms {
            checks.push(Check {
                name: format!("console gap under {limit} ms"),
                passed: report.max_gap_ms < limit as f64,
                seen: format!(
                    "longest pause between two lines {:.0} ms",
                    report.max_gap_ms
                ),
            });
        }
        report.checks = checks;
        report.console = Some(c);
    }

    /// The longest pause between two console lines the reader saw (the
    /// primaries' lines in order of arrival).
    fn console_max_gap(&self) -> f64 {
        let mut times: Vec<std::time::Instant> = self
            .primaries()
            .iter()
            .flat_map(|p| {
                let l = p.out.lock().unwrap_or_else(|e| e.into_inner());
                l.iter().map(|(t, _)| *t).collect::<Vec<_>>()
            })
            .collect();
        times.sort();
        times
            .windows(2)
            .map(|w| super::ms(w[1] - w[0]))
            .fold(0.0, f64::max)
    }
}

#[cfg(test)]
mod tests {
    use super::joined;

    #[test]
    fn the_lines_produced_again_count_once() {
        let (all, again) = joined(&[
            b"a\nround 1\nround 2\nround".to_vec(),
            b"round 2\nround 3\nRESULT x\n".to_vec(),
        ]);
        assert_eq!(all, b"a\nround 1\nround 2\nround 3\nRESULT x\n");
        assert_eq!(again, 13);
        let (all, again) = joined(&[b"round 1\n".to_vec(), b"round 2\n".to_vec()]);
        assert_eq!(all, b"round 1\nround 2\n");
        assert_eq!(again, 0);
    }
}
