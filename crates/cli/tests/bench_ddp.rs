//! `fabbrica bench ddp` and `fabbrica bench scaling`: they run, report every mode, and refuse bad
//! input with one line.

use std::process::{Command, Output};

const SMALL: [&str; 12] = [
    "--set",
    "model.n_layer=1",
    "--set",
    "model.n_embd=32",
    "--set",
    "model.n_head=2",
    "--set",
    "model.block_size=16",
    "--set",
    "train.batch_size=2",
    "--set",
    "run.threads=1",
];

fn fabbrica(np: usize, args: &[&str]) -> Output {
    let bin = env!("CARGO_BIN_EXE_fabbrica");
    let mut c = if np > 1 {
        let mut c = Command::new("mpirun");
        c.args(["-np", &np.to_string(), "--oversubscribe", bin]);
        c
    } else {
        Command::new(bin)
    };
    c.args(args).env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1").env("OMPI_MCA_plm", "isolated").output().unwrap()
}

fn json(np: usize, path: &std::path::Path) -> serde_json::Value {
    let mut args = vec!["bench", "ddp", "--steps", "2", "--rounds", "2", "--warmup", "1", "--json", path.to_str().unwrap()];
    args.extend(SMALL);
    let o = fabbrica(np, &args);
    assert!(o.status.success(), "{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("communication efficiency"), "{out}");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn modes(v: &serde_json::Value) -> Vec<String> {
    v["modes"].as_array().unwrap().iter().map(|m| m["mode"].as_str().unwrap().to_string()).collect()
}

#[test]
fn one_and_two_ranks_then_a_scaling_report() {
    let t = tempfile::tempdir().unwrap();
    let (p1, p2) = (t.path().join("np1.json"), t.path().join("np2.json"));
    let one = json(1, &p1);
    assert_eq!(one["world_size"], 1);
    assert_eq!(modes(&one), ["plain", "overlap", "no-overlap", "no-comm"]);
    let two = json(2, &p2);
    assert_eq!(two["world_size"], 2);
    assert_eq!(modes(&two), ["overlap", "no-overlap", "no-comm"]);
    for m in two["modes"].as_array().unwrap() {
        assert!(m["step_ms"].as_f64().unwrap() > 0.0);
        assert_eq!(m["rounds_ms"].as_array().unwrap().len(), 2);
        // tokens/s counts both ranks' micro-batches of 2 x 16 tokens.
        let tps = 1e3 * (2.0 * 2.0 * 16.0) / m["step_ms"].as_f64().unwrap();
        assert!((m["tokens_per_s"].as_f64().unwrap() - tps).abs() < 1e-6 * tps);
    }
    let (md, svg) = (t.path().join("s.md"), t.path().join("s.svg"));
    let o = fabbrica(
        1,
        &[
            "bench",
            "scaling",
            "--inputs",
            p2.to_str().unwrap(),
            p1.to_str().unwrap(),
            "--table",
            md.to_str().unwrap(),
            "--plot",
            svg.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = std::fs::read_to_string(&md).unwrap();
    let rows: Vec<&str> = table.lines().filter(|l| l.starts_with("| 1 ") || l.starts_with("| 2 ")).collect();
    assert_eq!(rows.len(), 2, "{table}");
    assert!(rows[0].contains("| 1.000 |"), "world size 1 is efficiency 1 by definition: {table}");
    assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));
}

#[test]
fn bad_input_is_one_line() {
    let t = tempfile::tempdir().unwrap();
    let bogus = t.path().join("x.json");
    std::fs::write(&bogus, "{\"world_size\": 2, \"modes\": []}").unwrap();
    for (args, needle) in [
        (vec!["bench", "ddp", "--steps", "0"], "--steps"),
        (vec!["bench", "ddp", "--set", "parallel.zero=3"], "parallel.zero"),
        (vec!["bench", "scaling", "--inputs", "/nonexistent.json"], "cannot read --inputs"),
        (vec!["bench", "scaling", "--inputs", bogus.to_str().unwrap()], "no overlap mode"),
        (vec!["bench", "scaling", "--inputs", bogus.to_str().unwrap(), "--plot", "a.pdf"], ".svg or .png"),
    ] {
        let o = fabbrica(1, &args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: {err}");
        assert!(lines[0].starts_with("error:") && lines[0].contains(needle), "{args:?}: {err}");
    }
}
