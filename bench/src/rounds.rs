//! Interleaved rounds of the scenarios whose CPU per transaction is held against
//! PgBouncer's ([`Scenario::interleaved`]): in which order the targets run, which round
//! becomes a target's row, and how the rounds are shown.
//!
//! On a shared 2-vCPU VM the same binaries measured 0.79× to 1.35× of PgBouncer's CPU
//! per transaction in five runs of one afternoon. Running all of one target's
//! scenarios before the next target's put minutes between the two numbers compared;
//! rounds take them seconds apart, and the median sets aside a round that a burst of
//! other work spoiled, where a mean would carry it.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::report::num;
use crate::row::Row;
use crate::scenarios::Scenario;
use crate::targets::TargetKind;

/// A target's rounds of one scenario; the row they belong to is round `chosen`'s.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Rounds {
    /// Index into `each` (in the order run) of the median round.
    pub chosen: usize,
    pub each: Vec<Round>,
}

/// The figures of one round that the median is taken over and the range shown of.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Round {
    pub tps: Option<f64>,
    pub target_cpu_s_per_1k: Option<f64>,
    pub errors: u64,
}

impl Round {
    fn of(r: &Row) -> Round {
        Round {
            tps: r.tps,
            target_cpu_s_per_1k: r.target_cpu_s_per_1k,
            errors: r.errors,
        }
    }
}

/// `(round, target)` in the order they run, for `rounds` rounds of `kinds`.
///
/// Every other round runs the targets in reverse. In a fixed order a target would
/// always hold the same place in a round: always first after the previous round's
/// last target stopped, or always right after the other pooler's 100 clients logged
/// out of Postgres, and a drift over the scenario's minutes would fall on the same
/// side each time. Reversed, each target is first and last alike and each pair runs
/// both ways round.
pub fn order(kinds: &[TargetKind], rounds: usize) -> Vec<(usize, TargetKind)> {
    (0..rounds)
        .flat_map(|round| {
            let mut these = kinds.to_vec();
            if round % 2 == 1 {
                these.reverse();
            }
            these.into_iter().map(move |k| (round, k))
        })
        .collect()
}

/// The round with the median CPU per transaction: of an even number, the lower of
/// the two middle ones (a real round, not an average of two). Rounds without a
/// figure (failed) are left out; ties keep the order run. `None` if none has one.
pub fn median_index(cpu: &[Option<f64>]) -> Option<usize> {
    let mut measured: Vec<(usize, f64)> = cpu
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.filter(|c| c.is_finite()).map(|c| (i, c)))
        .collect();
    // Stable: equal figures stay in round order.
    measured.sort_by(|a, b| a.1.total_cmp(&b.1));
    let middle = measured.len().checked_sub(1)? / 2;
    measured.get(middle).map(|(i, _)| *i)
}

/// One target's rows of one scenario, in the order run, as the median round's row
/// carrying every round's figures. With no round measured, the first round's row
/// (its errors say why). Other rounds' errors go into the note: counted, not hidden.
pub fn median(rounds: Vec<Row>) -> Option<Row> {
    let each: Vec<Round> = rounds.iter().map(Round::of).collect();
    let cpu: Vec<Option<f64>> = each.iter().map(|r| r.target_cpu_s_per_1k).collect();
    let chosen = median_index(&cpu).unwrap_or(0);
    let elsewhere: Vec<String> = rounds
        .iter()
        .enumerate()
        .filter(|(i, r)| *i != chosen && r.errors > 0)
        .map(|(i, r)| {
            let first = r.error_kinds.first().map(|(e, _)| e.as_str());
            format!(
                "round {} had {} errors (`{}`)",
                i + 1,
                r.errors,
                first.unwrap_or_default().replace('`', "'")
            )
        })
        .collect();
    let mut row = rounds.into_iter().nth(chosen)?;
    if !elsewhere.is_empty() {
        let note = row.note.take().into_iter().chain(elsewhere);
        row.note = Some(note.collect::<Vec<_>>().join("; "));
    }
    row.rounds = Some(Rounds { chosen, each });
    Some(row)
}

fn range(values: impl Iterator<Item = Option<f64>>, decimals: usize) -> String {
    let values: Vec<Option<f64>> = values.collect();
    let finite = || values.iter().flatten().copied().filter(|v| v.is_finite());
    let (min, max) = (finite().reduce(f64::min), finite().reduce(f64::max));
    let each: Vec<String> = values.iter().map(|v| num(*v, decimals)).collect();
    format!(
        "{}–{} ({})",
        num(min, decimals),
        num(max, decimals),
        each.join(", ")
    )
}

/// Under the CPU table: which round each interleaved row is, and the range of its
/// rounds' CPU per transaction and tps, so a row's spread is read with its value.
pub fn ranges(out: &mut String, scenarios: &[Scenario], rows: &[Row]) {
    let mut lines = Vec::new();
    for s in scenarios {
        for r in rows.iter().filter(|r| r.scenario == s.key) {
            let Some(rounds) = &r.rounds else {
                continue;
            };
            let each = &rounds.each;
            let mut line = format!(
                "- ({}) {}: median of {} round{} (round {}); target CPU µs / tx {}; tps {}",
                s.key,
                r.target.map(TargetKind::label).unwrap_or_default(),
                each.len(),
                if each.len() == 1 { "" } else { "s" },
                rounds.chosen + 1,
                range(
                    each.iter()
                        .map(|e| e.target_cpu_s_per_1k.map(|v| v * 1000.0)),
                    1
                ),
                range(each.iter().map(|e| e.tps), 0),
            );
            if each.iter().any(|e| e.errors > 0) {
                let errors: Vec<String> = each.iter().map(|e| e.errors.to_string()).collect();
                let _ = write!(line, "; errors {}", errors.join(", "));
            }
            lines.push(line);
        }
    }
    if lines.is_empty() {
        return;
    }
    out.push_str(
        "\nInterleaved rounds: each of these rows is its target's round with the median \
         target CPU per transaction; below, min–max over the rounds (every round in the \
         order run).\n\n",
    );
    for line in lines {
        let _ = writeln!(out, "{line}");
    }
}

/// The report's note on how the interleaved scenarios were run and why, if any were.
pub fn how(rows: &[Row]) -> Option<String> {
    let mut keys: Vec<&str> = Vec::new();
    for r in rows.iter().filter(|r| r.rounds.is_some()) {
        if !keys.contains(&r.scenario.as_str()) {
            keys.push(&r.scenario);
        }
    }
    let most = rows
        .iter()
        .filter_map(|r| Some(r.rounds.as_ref()?.each.len()))
        .max()?;
    let keys: Vec<String> = keys.iter().map(|k| format!("({k})")).collect();
    Some(format!(
        "{}: {most} interleaved round{} (`--rounds`), each running every target once, in \
         a freshly started process (also under `--one-process`), every other round in \
         reverse order; each row, and so each ratio and goal, is the round with the median \
         target CPU per transaction (of an even number of rounds, the lower middle one), \
         and the note under the CPU table gives every round's CPU per transaction and tps. \
         Why: on a shared 2-vCPU VM the same binaries measured 0.79× to 1.35× of \
         PgBouncer's CPU per transaction in five runs of one afternoon (PgBouncer's own \
         13.8–18.4 µs), and running one target's scenarios all before the next's put \
         minutes between the two numbers compared; interleaved, they are taken seconds \
         apart, and the median sets aside a round a burst of other work spoiled.",
        keys.join(", "),
        if most == 1 { "" } else { "s" },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Meta, markdown};
    use crate::scenarios::Sizes;
    use crate::targets::Budget;

    #[test]
    fn the_median_of_an_odd_count_is_the_middle_one() {
        assert_eq!(median_index(&[Some(3.0), Some(1.0), Some(2.0)]), Some(2));
        assert_eq!(median_index(&[Some(5.0)]), Some(0));
    }

    #[test]
    fn the_median_of_an_even_count_is_the_lower_middle_one() {
        assert_eq!(
            median_index(&[Some(4.0), Some(1.0), Some(3.0), Some(2.0)]),
            Some(3)
        );
        assert_eq!(median_index(&[Some(2.0), Some(1.0)]), Some(1));
    }

    #[test]
    fn ties_keep_the_order_run_and_failed_rounds_are_left_out() {
        assert_eq!(median_index(&[Some(2.0), Some(2.0), Some(2.0)]), Some(1));
        assert_eq!(median_index(&[Some(1.0), Some(2.0), Some(2.0)]), Some(1));
        assert_eq!(median_index(&[Some(2.0), Some(1.0), Some(1.0)]), Some(2));
        assert_eq!(median_index(&[None, Some(2.0), Some(1.0)]), Some(2));
        assert_eq!(median_index(&[Some(f64::NAN), Some(2.0)]), Some(1));
        assert_eq!(median_index(&[None, None]), None);
        assert_eq!(median_index(&[]), None);
    }

    #[test]
    fn every_other_round_runs_the_targets_in_reverse() {
        use TargetKind::{Direct, Pgbouncer, Pooler};
        assert_eq!(
            order(&[Pooler, Pgbouncer, Direct], 2),
            [
                (0, Pooler),
                (0, Pgbouncer),
                (0, Direct),
                (1, Direct),
                (1, Pgbouncer),
                (1, Pooler)
            ]
        );
        assert_eq!(order(&[Pooler], 3).len(), 3);
    }

    fn round(target: TargetKind, cpu_us: Option<f64>, tps: f64, errors: u64) -> Row {
        Row {
            target: Some(target),
            scenario: "a-pgbench".into(),
            tps: Some(tps),
            target_cpu_s_per_1k: cpu_us.map(|v| v / 1000.0),
            errors,
            error_kinds: (errors > 0)
                .then(|| ("pgbench aborted".to_owned(), errors))
                .into_iter()
                .collect(),
            ..Row::default()
        }
    }

    #[test]
    fn the_median_row_carries_every_round_and_the_others_errors() {
        let pooler = TargetKind::Pooler;
        let row = median(vec![
            round(pooler, Some(20.0), 30_000.0, 0),
            round(pooler, None, 0.0, 4),
            round(pooler, Some(12.0), 41_000.0, 0),
            round(pooler, Some(14.0), 40_000.0, 0),
        ])
        .unwrap();
        // Measured: 12 (round 3), 14 (round 4), 20 (round 1); the middle one is 14.
        assert_eq!(row.tps, Some(40_000.0));
        let rounds = row.rounds.as_ref().unwrap();
        assert_eq!(rounds.chosen, 3);
        assert_eq!(rounds.each.len(), 4);
        assert_eq!(rounds.each[1].errors, 4);
        assert_eq!(row.errors, 0);
        assert!(
            row.note
                .as_deref()
                .unwrap()
                .contains("round 2 had 4 errors (`pgbench aborted`)"),
            "{:?}",
            row.note
        );
        assert!(median(Vec::new()).is_none());
    }

    fn meta() -> Meta {
        Meta {
            date: String::new(),
            command: String::new(),
            quick: false,
            nproc: "2".into(),
            cpu: String::new(),
            uname: String::new(),
            memory: String::new(),
            postgres: String::new(),
            pgbouncer: String::new(),
            pooler: String::new(),
            pgbench: String::new(),
            nofile: String::new(),
            budget: Budget {
                server_connections: 40,
                pool_size: 5,
                query_wait_timeout_secs: 5,
                max_client_conn: 100,
            },
            sizes: Sizes {
                warmup_secs: 3.0,
                duration_secs: 15.0,
                op_timeout_secs: 10,
                idle_clients: 10,
                idle_max_open_secs: 10,
                listen_apps: 1,
                listen_per_app: 1,
            },
            fresh_process_per_scenario: true,
        }
    }

    #[test]
    fn the_report_shows_the_median_rows_with_their_ranges() {
        let (pooler, pgb) = (TargetKind::Pooler, TargetKind::Pgbouncer);
        let rows = [
            median(vec![
                round(pooler, Some(20.0), 30_000.0, 0),
                round(pooler, Some(12.0), 42_000.0, 0),
                round(pooler, Some(14.0), 40_000.0, 0),
            ]),
            median(vec![
                round(pgb, Some(16.0), 25_000.0, 0),
                round(pgb, Some(30.0), 20_000.0, 0),
                round(pgb, Some(18.0), 26_000.0, 0),
            ]),
        ]
        .map(Option::unwrap);
        let meta = meta();
        let md = markdown(&meta, &crate::scenarios::all(&meta.sizes), &rows, None);
        // 14 over 18: the goal is checked on the median rows.
        assert!(
            md.contains(
                "| (a-pgbench) | pooler CPU per transaction ≤ 0.8× PgBouncer's | 0.78× | yes |"
            ),
            "{md}"
        );
        assert!(
            md.contains(
                "- (a-pgbench) pooler (us): median of 3 rounds (round 3); \
                 target CPU µs / tx 12.0–20.0 (20.0, 12.0, 14.0); tps 30000–42000 (30000, 42000, 40000)"
            ),
            "{md}"
        );
        assert!(
            md.contains("- (a-pgbench) PgBouncer: median of 3 rounds (round 3); target CPU µs / tx 16.0–30.0"),
            "{md}"
        );
        assert!(md.contains("(a-pgbench): 3 interleaved rounds"), "{md}");
    }

    #[test]
    fn rows_without_rounds_show_no_rounds() {
        let rows = [round(TargetKind::Pooler, Some(14.0), 40_000.0, 0)];
        let mut out = String::new();
        ranges(&mut out, &crate::scenarios::all(&meta().sizes), &rows);
        assert_eq!(out, "");
        assert_eq!(how(&rows), None);
    }
}
