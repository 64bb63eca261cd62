//! `fabbrica plan`: the table, `--explain`'s JSON, the plot, `plan calibrate`, and bad input as
//! one line with exit code 2.

use std::process::{Command, Output};

fn plan(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fabbrica")).arg("plan").args(args).output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn search_prints_the_best_layouts_and_writes_every_figure() {
    let dir = tempfile::tempdir().unwrap();
    let (j, svg) = (dir.path().join("plan.json"), dir.path().join("scaling.svg"));
    let o = plan(&[
        "--model",
        "gpt2-1.5b",
        "--cluster",
        "h100-sxm",
        "--gpus",
        "8,64",
        "--global-batch",
        "512",
        "--tokens",
        "30B",
        "--top",
        "3",
        "--json",
        j.to_str().unwrap(),
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("8 GPUs:") && out.contains("64 GPUs:") && out.contains("GPU-hours"), "{out}");
    let v = json(&j);
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for r in results {
        let gpus = r["gpus"].as_u64().unwrap();
        let best = r["best"].as_array().unwrap();
        assert!(!best.is_empty() && best.len() <= 3);
        let mut last = 0.0;
        for e in best {
            let l = &e["layout"];
            let used = l["tp"].as_u64().unwrap() * l["pp"].as_u64().unwrap() * l["dp"].as_u64().unwrap();
            assert!(used <= gpus && used == e["gpus"].as_u64().unwrap());
            assert!(e["fits"].as_bool().unwrap());
            assert!(e["memory_total"].as_f64().unwrap() <= e["usable_bytes"].as_f64().unwrap());
            let (step, mfu) = (e["step_s"].as_f64().unwrap(), e["mfu"].as_f64().unwrap());
            assert!(step >= last && mfu > 0.0 && mfu < 1.0, "{e}");
            last = step;
            let t = &e["train"];
            assert!(t["time_s"].as_f64().unwrap() > 0.0 && t["energy_mwh"].as_f64().unwrap() > 0.0);
            assert!(t["resilience"]["goodput"].as_f64().unwrap() <= 1.0);
        }
    }
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg") && text.trim_end().ends_with("</svg>"));
}

#[test]
fn explain_writes_one_layouts_figures() {
    let dir = tempfile::tempdir().unwrap();
    let j = dir.path().join("one.json");
    let o = plan(&[
        "--model",
        "gpt2-350m",
        "--cluster",
        "a100",
        "--gpus",
        "64",
        "--global-batch",
        "256",
        "--seq",
        "2048",
        "--explain",
        "tp=2,pp=4,v=2,mb=1,recompute=selective",
        "--json",
        j.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for part in ["compute", "tp comm", "pp comm", "bubble", "dp comm", "memory", "interleaved"] {
        assert!(out.contains(part), "{part}: {out}");
    }
    let v = json(&j);
    let l = &v["layout"];
    assert_eq!((l["tp"].as_u64(), l["pp"].as_u64(), l["dp"].as_u64(), l["v"].as_u64()), (Some(2), Some(4), Some(8), Some(2)));
    assert_eq!(l["recompute"], "selective");
    let (mfu, step) = (v["mfu"].as_f64().unwrap(), v["step_s"].as_f64().unwrap());
    assert!(mfu > 0.0 && mfu < 1.0 && step > 0.0);
    let parts: f64 = ["compute_s", "tp_s", "pp_s", "dp_s", "bubble_s", "optimizer_s"].iter().map(|k| v[k].as_f64().unwrap()).sum();
    assert!((parts - step).abs() / step < 1e-9, "{parts} vs {step}");
    assert_eq!(v["model"]["seq"], 2048);
}

#[test]
fn calibrate_writes_a_cluster_that_plans() {
    let dir = tempfile::tempdir().unwrap();
    let rows: Vec<String> = (10..26)
        .map(|k| {
            let bytes = (1u64 << k) as f64;
            let t = 6.0 * 4e-6 + 1.5 * bytes / 2e9; // 4 ranks: 2(n-1) steps, 2(n-1)/n bytes
            format!("{{\"bytes\": {bytes}, \"time_us\": {}, \"ok\": true}}", t * 1e6)
        })
        .collect();
    let ar = dir.path().join("ar.json");
    std::fs::write(&ar, format!("{{\"op\": \"all_reduce\", \"world_size\": 4, \"rows\": [{}]}}", rows.join(","))).unwrap();
    let bench = dir.path().join("bench.json");
    // gpt2-124m at block 256 has this many parameters (the trainer's count).
    std::fs::write(&bench, "{\"params\": 123886080, \"batch\": 4, \"block\": 256, \"tokens_per_s\": 2500.0, \"step_ms\": 409.6}").unwrap();
    let out = dir.path().join("mine.toml");
    let o = plan(&[
        "calibrate",
        "--collectives",
        ar.to_str().unwrap(),
        "--train",
        bench.to_str().unwrap(),
        "--model",
        "gpt2-124m",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let text = std::fs::read_to_string(&out).unwrap();
    let t: toml::Table = toml::from_str(&text).unwrap();
    assert!((t["intra_gbps"].as_float().unwrap() - 2.0).abs() < 1e-3, "{text}");
    assert!((t["intra_latency_us"].as_float().unwrap() - 4.0).abs() < 1e-2, "{text}");
    let o = plan(&[
        "--model",
        "gpt2-124m",
        "--cluster",
        out.to_str().unwrap(),
        "--gpus",
        "1",
        "--global-batch",
        "4",
        "--seq",
        "256",
        "--explain",
        "mb=4,recompute=none,zero=0",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The calibrated cluster reproduces the measured throughput.
    assert!(stdout(&o).contains("throughput  2500 tokens/s"), "{}", stdout(&o));
}

#[test]
fn bad_input_is_one_line_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let bad_key = dir.path().join("bad.toml");
    std::fs::write(&bad_key, "base = \"h100-sxm\"\nintra_gbs = 300.0\n").unwrap();
    let small = dir.path().join("small.toml");
    std::fs::write(&small, "base = \"h100-sxm\"\nhbm_gib = 8.0\nreserved_gib = 1.0\n").unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--model", "gpt9", "--cluster", "h100-sxm", "--gpus", "8"], "gpt9"),
        (vec!["--model", "gpt2-124m", "--cluster", "tpu-v9", "--gpus", "8"], "tpu-v9"),
        (vec!["--model", "gpt2-124m", "--cluster", bad_key.to_str().unwrap(), "--gpus", "8"], "intra_gbs"),
        (vec!["--model", "gpt2-124m", "--cluster", "h100-sxm", "--gpus", "100", "--explain", "tp=8,pp=8"], "not divisible"),
        (vec!["--model", "gpt2-124m", "--cluster", "h100-sxm", "--gpus", "8", "--explain", "ep=2"], "unknown key"),
        (vec!["--model", "gpt2-124m", "--cluster", "h100-sxm", "--gpus", "8,x"], "--gpus"),
        (vec!["--model", "gpt2-124m", "--cluster", "h100-sxm", "--gpus", "8", "--tokens", "15Q"], "--tokens"),
        (vec!["--model", "gpt2-1.5b", "--cluster", small.to_str().unwrap(), "--gpus", "1", "--global-batch", "8"], "would fit on"),
        // The plot is SVG: a .png name is refused before the search, not filled with SVG.
        (vec!["--model", "gpt2-124m", "--cluster", "h100-sxm", "--gpus", "8", "--plot", "scaling.png"], "ending in .svg"),
    ];
    for (args, needle) in cases {
        let o = plan(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        let err = stderr(&o);
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("error: ") && err.contains(needle), "{args:?}: {err}");
    }
}
