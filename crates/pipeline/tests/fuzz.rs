//! Mutation fuzzing of the pipeline schedule IR: single actions (`Action::from_str`), schedule
//! kinds (`Kind::from_str`), and whole per-rank programs in text form, mutated, parsed and then
//! simulated, order-checked, lowered and rendered. Every parse either succeeds and prints back
//! to an equal action, or fails with a one-line error; a parsed program simulates to a timeline
//! or a one-line deadlock report; nothing panics.
//!
//! Budget and seed: see tests/fuzzkit.rs. Regression cases: tests/fuzz_regressions/pipeline/
//! <case>/ holding `program.txt`: a header line `pp v microbatches`, then one line of
//! whitespace-separated actions per rank (a single line with no header is parsed as one action
//! and as a kind).

#[path = "../../../tests/fuzzkit.rs"]
mod fuzzkit;

use std::path::{Path, PathBuf};

use fabbrica_pipeline::schedule::{Kind, Schedule};
use fabbrica_pipeline::{check_transfer_order, lower, peak_in_flight, simulate, summary, to_svg, to_text, Action, Costs};
use fuzzkit::{mutate_bytes, one_line_error, part, Fuzz, Rng};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// One action text: parses and prints back, or a one-line error.
fn check_action(text: &str) -> Result<(), String> {
    match text.parse::<Action>() {
        Err(e) => one_line_error(&e.to_string()),
        Ok(a) => {
            let back: Action = a.to_string().parse().map_err(|e| format!("{a} does not parse back: {e}"))?;
            if back != a {
                return Err(format!("{text:?} parsed to {a:?}, which prints as {a} and parses to {back:?}"));
            }
            Ok(())
        }
    }
}

fn check_kind(text: &str) -> Result<(), String> {
    match text.parse::<Kind>() {
        Err(e) => one_line_error(&e.to_string()),
        Ok(k) => (k.to_string().parse::<Kind>() == Ok(k)).then_some(()).ok_or_else(|| format!("kind {k} does not round-trip")),
    }
}

/// A program text (see the module docs): every token is checked as an action; when all parse,
/// the program runs through the simulator, the transfer-order check, lowering and the renderers.
fn check_program(text: &str, costs: Costs) -> Result<(), String> {
    let mut lines = text.lines();
    let Some(header) = lines.next() else { return Ok(()) };
    let nums: Vec<usize> = header.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    let rank_lines: Vec<&str> = lines.collect();
    if nums.len() != 3 || rank_lines.is_empty() {
        // Not a program: treat the whole text as one action and as a kind.
        check_action(text)?;
        return check_kind(text);
    }
    let mut ranks = Vec::new();
    for line in &rank_lines {
        let mut actions = Vec::new();
        for token in line.split_whitespace() {
            check_action(token)?;
            match token.parse::<Action>() {
                Ok(a) => actions.push(a),
                Err(_) => return Ok(()), // a parse error ends the program here, as a loader would
            }
        }
        ranks.push(actions);
    }
    // The struct's invariants: one list per rank, at least one rank, stage and micro-batch
    // counts of at least one (Schedule::validate refuses the rest before anything is built).
    let (v, m) = (nums[1].clamp(1, 64), nums[2].clamp(1, 1 << 16));
    let schedule = Schedule { kind: Kind::OneFOneB, pp: ranks.len(), virtual_stages: v, microbatches: m, ranks };
    let _ = peak_in_flight(&schedule);
    if let Err(e) = check_transfer_order(&schedule) {
        one_line_error(&e)?;
    }
    fuzzkit::note_accepted();
    let lowered = lower(&schedule);
    for s in [&schedule, &lowered] {
        match simulate(s, costs) {
            Err(e) => one_line_error(&e.to_string())?,
            Ok(t) => {
                let _ = summary(&t);
                // Both draw one column or pixel run per time unit: only for small makespans.
                if t.makespan < 100_000 {
                    let _ = (to_text(&t), to_svg(&t));
                }
            }
        }
    }
    Ok(())
}

fn random_costs(rng: &mut Rng) -> Costs {
    if rng.chance(10) {
        // Costs at and past the documented bound: the simulator reports a time past u64::MAX
        // as a one-line error, never a wrapped timeline (or a panic).
        let edge = [fabbrica_pipeline::MAX_COST, u64::MAX / 3, u64::MAX / 2, u64::MAX - 1, u64::MAX];
        let mut pick = || *rng.pick(&edge);
        return Costs { f: pick(), b: pick(), comm: pick() };
    }
    Costs { f: 1 + rng.below(3) as u64, b: 1 + rng.below(6) as u64, comm: rng.below(3) as u64 }
}

/// A valid program (generated, maybe lowered) as text.
fn random_program(rng: &mut Rng) -> String {
    let kind = *rng.pick(&Kind::ALL);
    let pp = 1 + rng.below(4);
    let v = if kind == Kind::Interleaved1F1B { 2 + rng.below(2) } else { 1 };
    let m = if kind == Kind::Interleaved1F1B { pp * (1 + rng.below(2)) } else { 1 + rng.below(6) };
    let mut s = Schedule::new(kind, pp, v, m).expect("a valid shape");
    if rng.chance(60) {
        s = lower(&s);
    }
    let mut text = format!("{pp} {v} {m}\n");
    for line in s.rank_lines() {
        text.push_str(&line);
        text.push('\n');
    }
    text
}

#[test]
fn schedule_ir_never_panics_and_errors_are_one_line() {
    let mut fuzz = Fuzz::new("pipeline", 3000, &workspace());
    let costs = Costs { f: 1, b: 2, comm: 1 };

    let regressions = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_regressions/pipeline");
    fuzz.replay(&regressions, |fuzz, parts| {
        let text = String::from_utf8_lossy(part(&parts, "program.txt").expect("program.txt")).into_owned();
        fuzz.check(&parts, || check_program(&text, costs));
    });
    for text in REGRESSIONS {
        let parts = vec![("program.txt".to_string(), text.as_bytes().to_vec())];
        fuzz.regression(&parts, || check_program(text, costs));
    }

    let dict: [&[u8]; 22] = [
        b"F",
        b"B",
        b"SEND_F",
        b"RECV_F",
        b"SEND_B",
        b"RECV_B",
        b"0",
        b"1",
        b"9",
        b"18446744073709551615",
        b"18446744073709551616",
        b"99999999999999999999999",
        b" ",
        b"\n",
        b"_",
        b"SEND_",
        b"gpipe",
        b"1f1b",
        b"interleaved",
        "\u{0660}".as_bytes(),
        "\u{ff11}".as_bytes(),
        b"-1",
    ];
    while fuzz.more() {
        let rng = &mut fuzz.rng;
        let costs = random_costs(rng);
        let mut bytes = if rng.chance(30) {
            // One action or kind.
            let a = Action::new(rng.below(20), *rng.pick(&fabbrica_pipeline::Op::ALL), rng.below(20));
            if rng.chance(20) { rng.pick(&Kind::ALL).to_string() } else { a.to_string() }.into_bytes()
        } else {
            random_program(rng).into_bytes()
        };
        mutate_bytes(rng, &mut bytes, &dict);
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let parts = vec![("program.txt".to_string(), bytes.clone())];
        fuzz.check(&parts, || check_program(&text, costs));
    }
    fuzz.finish();
}

/// Inputs that once failed (kept so they are replayed on every run), plus edge cases.
const REGRESSIONS: &[&str] = &[
    "18446744073709551615SEND_F0",
    "1 1 1\n18446744073709551615SEND_F0 18446744073709551615RECV_B18446744073709551615",
    "2 1 1\n0F0 0SEND_F0\n1RECV_F0 1F0 1B0 1SEND_B0\n",
    "1 1 1\n",
    "0\u{0660}F1",
    // Multi-byte characters before the micro-batch number: Action::from_str sliced inside them.
    "2F1\u{fffd}0",
    "1\u{fffd}0",
    "2 1 1\n0F0 0B\u{e9}0\n1F0",
    // Stage usize::MAX: lowering and peer() computed stage + 1 (overflow panics in debug builds).
    "2 1 5\n018446744073709551615B0 0B1\n1F0 1B0",
    "2 1 1\n18446744073709551615F0\n18446744073709551615RECV_B0 18446744073709551615SEND_F0",
    "3 1 2\n0B0\n\n1F1 5F5",
];
