//! `fabbrica schedule`: prints the per-rank lists that the pipeline crate generates, its dry-run
//! figures, writes SVG/JSON whole, and refuses bad input with one line and exit code 2.

use std::process::{Command, Output};

fn schedule(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fabbrica")).arg("schedule").args(args).output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn one_f_one_b_lists_timeline_and_figures() {
    let o = schedule(&["--pp", "4", "--microbatches", "8"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    // Megatron's 1F1B: rank 0 warms up pp - 1 = 3 forwards, the last rank none.
    assert!(out.contains("rank 0: 0F0 0F1 0F2 0F3 0B0 0F4 0B1"), "{out}");
    assert!(out.contains("rank 3: 3F0 3B0 3F1 3B1"), "{out}");
    // (m + pp - 1)·(f + b) = 11·3; activations in flight pp - r on rank r.
    assert!(out.contains("makespan 33"), "{out}");
    assert!(out.contains("peak in flight 4 3 2 1"), "{out}");
    // Bubble overhead (pp - 1)/m of the ideal time.
    assert!(out.contains("bubble overhead 37.5% of ideal"), "{out}");
}

#[test]
fn lowered_lists_name_the_transfers() {
    let o = schedule(&["--pp", "2", "--microbatches", "2", "--lowered", "--schedule", "gpipe"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("rank 0: 0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B0 0B0 0RECV_B1 0B1"), "{out}");
    assert!(out.contains("rank 1: 1RECV_F0 1F0 1RECV_F1 1F1 1B0 1SEND_B0 1B1 1SEND_B1"), "{out}");
}

#[test]
fn interleaved_writes_svg_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let (svg, json) = (dir.path().join("s.svg"), dir.path().join("s.json"));
    let o = schedule(&[
        "--schedule",
        "interleaved",
        "--pp",
        "4",
        "--microbatches",
        "8",
        "--costs",
        "1,2,0",
        "--svg",
        svg.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg") && text.trim_end().ends_with("</svg>"), "{text}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["schedule"], "interleaved");
    assert_eq!(v["virtual_stages"], 2, "interleaved defaults to 2 chunks per rank");
    // Megatron's interleaved bubble: (pp - 1)/(v·m) of the ideal time, here exactly.
    let (makespan, ideal) = (v["makespan"].as_u64().unwrap(), v["ideal"].as_u64().unwrap());
    assert_eq!(ideal, 3 * 8 * 2);
    assert_eq!((makespan - ideal) * 2 * 8, ideal * 3, "makespan {makespan}");
    let ranks = v["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 4);
    assert!(ranks.iter().all(|r| r.as_array().unwrap().len() == 2 * 8 * 2));
    // Nothing left behind but the two files.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}

#[test]
fn bad_input_is_one_line_and_exit_2() {
    let cases: [(&[&str], &str); 5] = [
        (&["--schedule", "interleaved", "--pp", "4", "--microbatches", "6"], "use 4 or 8"),
        (&["--schedule", "zero-bubble", "--pp", "4", "--microbatches", "8"], "gpipe, 1f1b or interleaved"),
        (&["--pp", "0", "--microbatches", "8"], "--pp"),
        (&["--pp", "2", "--microbatches", "4", "--virtual-stages", "3"], "--schedule interleaved"),
        (&["--pp", "2", "--microbatches", "4", "--costs", "1,0,0"], "--costs"),
    ];
    for (args, want) in cases {
        let o = schedule(args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("error: ") && err.contains(want), "{args:?}: {err}");
    }
    // An unwritable output path: the same, and nothing half-written.
    let o = schedule(&["--pp", "2", "--microbatches", "2", "--svg", "/nonexistent-dir/x.svg"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("cannot write /nonexistent-dir/x.svg"), "{}", stderr(&o));
}

/// Shapes and costs past their documented bounds (`MAX_ACTIONS`, `MAX_COST` in the pipeline
/// crate): one line naming the flag and what to set, exit code 2. They used to panic (capacity
/// overflow allocating 2·pp·v·m actions) or wrap (F + B = 0, printing `inf%`).
#[test]
fn shapes_and_costs_past_their_bounds_are_refused() {
    let max = "18446744073709551615"; // usize::MAX and u64::MAX
    let cases: [(&[&str], &[&str]); 7] = [
        (&["--pp", "4", "--microbatches", max], &["--microbatches 18446744073709551615", "set --microbatches to at most 1048576"]),
        (&["--pp", max, "--microbatches", "8"], &["--pp 18446744073709551615", "set --pp to at most 524288"]),
        (
            &["--schedule", "interleaved", "--pp", "2", "--virtual-stages", max, "--microbatches", "2"],
            &["--virtual-stages 18446744073709551615", "set --virtual-stages to at most 1048576"],
        ),
        // pp·m wraps to 0 in 64 bits.
        (&["--schedule", "gpipe", "--pp", "4294967296", "--microbatches", "4294967296"], &["more than 8388608 actions"]),
        (
            &["--pp", "2", "--microbatches", "4", "--costs", "1,18446744073709551615,0"],
            &["--costs '1,18446744073709551615,0'", "B = 18446744073709551615 is more than 1000000000"],
        ),
        (&["--pp", "2", "--microbatches", "4", "--costs", "1000000001,1,0"], &["--costs", "F = 1000000001"]),
        (&["--pp", "2", "--microbatches", "4", "--costs", "1,2,99999999999999999999999"], &["--costs", "COMM = 99999999999999999999999"]),
    ];
    for (args, want) in cases {
        let o = schedule(args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("error: "), "{args:?}: {err}");
        for w in want {
            assert!(err.contains(w), "{args:?}: {err:?} lacks {w:?}");
        }
        assert!(stdout(&o).is_empty(), "{args:?}: {}", stdout(&o));
    }
    // The largest costs accepted: exact figures, (pp - 1)/m = 37.5% as with 1,1,0.
    let o = schedule(&["--pp", "4", "--microbatches", "8", "--costs", "1000000000,1000000000,0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("makespan 22000000000"), "{out}");
    assert!(out.contains("ideal 16000000000 units of compute per rank; bubble overhead 37.5% of ideal"), "{out}");
}
