//! `fabbrica doctor`: on the dumps a real training job writes when it gets SIGUSR2 under mpirun
//! (into its run.out_dir/flight/), on constructed dumps of a job that lost a rank, and on bad
//! input (one `error:` line, exit 2). The analysis itself is tested in fabbrica-comm (unit tests
//! of `flight::analyze`, and real hung, mismatched and killed jobs in tests/mpirun.rs).

use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const STEPS: u64 = 150;

/// One mpirun job at a time (2 cores; concurrent launches also race on Open MPI's session dir).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn doctor(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fabbrica")).arg("doctor").args(args).env("RUST_BACKTRACE", "1").output().expect("cannot run the fabbrica binary")
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn train(out: &Path) -> Command {
    let sets = [
        "model.n_layer=1",
        "model.n_head=2",
        "model.n_embd=16",
        "model.block_size=16",
        "train.batch_size=2",
        &format!("train.max_steps={STEPS}"),
        "train.warmup_steps=5",
        "train.log_interval=1",
        "train.eval_interval=100000",
        "train.eval_iters=2",
        "run.sample_tokens=0",
        "run.threads=1",
        &format!("run.out_dir={}", out.display()),
        &format!("data.path={}/../../data/pystdlib.txt", env!("CARGO_MANIFEST_DIR")),
    ]
    .map(|s| s.to_string());
    let mut c = Command::new("mpirun");
    c.args(["-np", "2", "--oversubscribe", env!("CARGO_BIN_EXE_fabbrica"), "train"])
        .args(sets.iter().flat_map(|s| ["--set", s.as_str()]))
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_plm", "isolated")
        // The trainer chooses the directory (its out_dir); the variable would override it.
        .env_remove("FABBRICA_FLIGHT_DIR")
        .env_remove("FABBRICA_FLIGHT_RECORDER")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn logged(out: &Path) -> u64 {
    fs::read_to_string(out.join("metrics.jsonl")).map(|s| s.lines().count() as u64).unwrap_or(0)
}

/// SIGUSR2 to mpirun (which forwards it to every rank) mid-training: each rank writes
/// out_dir/flight/rank_<N>.json and training runs on to the end; doctor reads both dumps.
#[test]
fn sigusr2_mid_training_dumps_every_rank_and_doctor_reads_them() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut child = train(&out).spawn().unwrap();
    let t = Instant::now();
    while logged(&out) < 20 {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before step 20");
        assert!(t.elapsed() < Duration::from_secs(120), "no step 20 within two minutes");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(Command::new("kill").args(["-USR2", &child.id().to_string()]).status().unwrap().success());
    let dumps = [out.join("flight/rank_0.json"), out.join("flight/rank_1.json")];
    while !dumps.iter().all(|d| d.exists()) {
        assert!(t.elapsed() < Duration::from_secs(180), "no dumps after SIGUSR2");
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "training must go on after SIGUSR2\n{}", text(&o));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains(&format!("flight recorder: wrote {}", dumps[0].display())), "{stderr}");
    let steps = fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["kind"] == "train")
        .count() as u64;
    assert_eq!(steps, STEPS, "every step ran");

    let o = doctor(&[out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let report = String::from_utf8_lossy(&o.stdout);
    assert!(
        report.starts_with(&format!("flight recorder dumps in {}: 2 of 2 ranks\n  ranks 0-1: SIGUSR2\n", out.join("flight").display())),
        "{report}"
    );
    assert!(
        !report.contains("no dump") && !report.contains("diverged at") && report.contains("\nverdict: no hang, divergence or failure"),
        "{report}"
    );

    let o = doctor(&["--json", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("--json prints JSON");
    assert_eq!(v["world_size"], 2);
    assert_eq!(v["missing"], serde_json::json!([]));
    assert_eq!(v["dumps"].as_array().unwrap().len(), 2);
    assert!(v["dumps"].as_array().unwrap().iter().all(|d| d["reason"] == "SIGUSR2"), "{v}");
    // The gradients' all-reduces were recorded, in step on both ranks.
    let groups = v["groups"].as_array().unwrap();
    let busiest = groups.iter().max_by_key(|g| g["progress"][0]["called"].as_u64().unwrap()).unwrap();
    assert!(busiest["progress"][0]["called"].as_u64().unwrap() >= 20, "{busiest}");
    assert!(busiest["divergence"].is_null(), "{busiest}");
    assert_eq!(v["look_at"], serde_json::json!([]));
}

/// The dumps of a job whose rank 2 was killed while ranks 0 and 1 waited in all_reduce #3.
fn killed_job(dir: &Path) {
    let op = |seq: u64, state: &str| {
        let end = if state == "completed" { format!(",\"ended_ns\":{}", seq * 100 + 50) } else { String::new() };
        format!(
            "{{\"seq\":{seq},\"op\":\"all_reduce\",\"dtype\":\"bf16\",\"count\":4096,\"reduce\":\"avg\",\"state\":\"{state}\",\"enqueued_ns\":{},\"started_ns\":{}{end}}}",
            seq * 100,
            seq * 100 + 10
        )
    };
    fs::create_dir_all(dir.join("flight")).unwrap();
    for r in 0..2 {
        let ops = [op(1, "completed"), op(2, "completed"), op(3, "started")].join(",");
        let reason =
            if r == 0 { "watchdog: all_reduce #3 on group 'world' did not complete within 600.0s" } else { "rank 0 aborted the job: watchdog: ..." };
        fs::write(
            dir.join(format!("flight/rank_{r}.json")),
            format!(
                "{{\"format\":\"fabbrica-flight/1\",\"rank\":{r},\"world_size\":3,\"host\":\"node{r}\",\"pid\":{},\"reason\":\"{reason}\",\"capacity\":2000,\"clock\":{{\"mono_ns\":700000000000,\"unix_ns\":1700000000000000000}},\"groups\":[{{\"name\":\"world\",\"id\":\"w\",\"backend\":\"nccl\",\"rank\":{r},\"size\":3,\"members\":[0,1,2],\"recorded\":3,\"ops\":[{ops}]}}]}}",
                1000 + r
            ),
        )
        .unwrap();
    }
}

#[test]
fn doctor_names_the_rank_without_a_dump() {
    let dir = tempfile::tempdir().unwrap();
    killed_job(dir.path());
    let o = doctor(&[dir.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let report = String::from_utf8_lossy(&o.stdout);
    for want in [
        ": 2 of 3 ranks\n",
        "  rank 0 (node0, pid 1000): watchdog: all_reduce #3 on group 'world' did not complete within 600.0s\n",
        "  no dump: rank 2\n",
        "group 'world' (nccl, 3 ranks: world 0-2), collectives:\n",
        "  0-1               #3       #3         #2  in all_reduce(bf16, 4096 elements, avg) #3 for 700.0s\n",
        "\nlook at: rank 2: left no dump (killed, crashed, or never started) while ranks 0-1 were waiting in all_reduce(bf16, 4096 elements, avg) #3 on group 'world'\n",
        "verdict: rank 2 left no dump: start there\n",
    ] {
        assert!(report.contains(want), "missing {want:?} in\n{report}");
    }
    assert!(report.lines().count() <= 20, "{report}");
    let o = doctor(&[dir.path().to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("--json prints JSON");
    assert_eq!(v["missing"], serde_json::json!([2]));
    assert_eq!(v["look_at"][0]["rank"], 2);
    assert_eq!(v["groups"][0]["progress"][2]["dump"], false);
    assert_eq!(v["groups"][0]["progress"][0]["in_flight"]["what"], "all_reduce(bf16, 4096 elements, avg) #3");
}

fn assert_one_line_error(o: &Output, needle: &str) {
    assert_eq!(o.status.code(), Some(2), "{}", text(o));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(stderr.lines().count(), 1, "{}", text(o));
    assert!(stderr.starts_with("error: ") && stderr.contains(needle), "{}", text(o));
    assert!(o.stdout.is_empty() && !stderr.contains("panicked"), "{}", text(o));
}

#[test]
fn bad_input_is_one_line_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    assert_one_line_error(&doctor(&[p.join("nope").to_str().unwrap()]), "is not a directory");
    fs::write(p.join("file"), "x").unwrap();
    assert_one_line_error(&doctor(&[p.join("file").to_str().unwrap()]), "is not a directory");
    assert_one_line_error(&doctor(&[p.to_str().unwrap()]), "no flight recorder dumps (rank_<N>.json) in");
    // Only unusable dumps: a truncated one, and one too large to read (sparse, nothing written).
    fs::create_dir(p.join("flight")).unwrap();
    fs::write(p.join("flight/rank_0.json"), "{\"format\":\"fabbrica-flight/1\",\n\"rank\":").unwrap();
    fs::File::create(p.join("flight/rank_1.json")).unwrap().set_len(65 << 20).unwrap();
    assert_one_line_error(&doctor(&[p.to_str().unwrap()]), "no readable flight recorder dump in");
    // An unusable dump beside good ones is reported, not fatal.
    let good = tempfile::tempdir().unwrap();
    killed_job(good.path());
    fs::copy(p.join("flight/rank_1.json"), good.path().join("flight/rank_2.json")).unwrap();
    let o = doctor(&[good.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("  unreadable: rank_2.json: 68157440 bytes, more than the 64 MiB a dump may have\n"),
        "{}",
        text(&o)
    );
    let o = Command::new(env!("CARGO_BIN_EXE_fabbrica")).args(["doctor"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "no DIR: {}", text(&o));
}

/// kill -9 of one rank of a training job under plain mpirun (no recovery settings): mpirun sends
/// the survivors SIGTERM shortly before SIGKILL, their stop handler asks for a flight dump, and
/// `doctor` names the killed rank as the one without a dump.
#[test]
fn a_rank_killed_under_plain_mpirun_is_named_from_the_survivors_dumps() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut c = Command::new("mpirun");
    c.args(["-np", "3", "--oversubscribe", env!("CARGO_BIN_EXE_fabbrica"), "train"]);
    for s in [
        "model.n_layer=1",
        "model.n_head=2",
        "model.n_embd=16",
        "model.block_size=16",
        "train.batch_size=2",
        "train.max_steps=1000000",
        "train.log_interval=1",
        "run.sample_tokens=0",
        "run.threads=1",
        &format!("run.out_dir={}", out.display()),
        &format!("data.path={}/../../data/pystdlib.txt", env!("CARGO_MANIFEST_DIR")),
    ] {
        c.args(["--set", s]);
    }
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1").env("OMPI_MCA_plm", "isolated");
    c.env_remove("FABBRICA_FLIGHT_DIR").env_remove("OMPI_MCA_orte_enable_recovery");
    let mut child = c.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let t = Instant::now();
    while logged(&out) < 20 {
        assert!(child.try_wait().unwrap().is_none() && t.elapsed() < Duration::from_secs(60), "training did not get going");
        std::thread::sleep(Duration::from_millis(20));
    }
    let kids = String::from_utf8(Command::new("pgrep").args(["-P", &child.id().to_string()]).output().unwrap().stdout).unwrap();
    let last: u32 = kids.lines().last().unwrap().trim().parse().unwrap();
    assert!(Command::new("kill").args(["-9", &last.to_string()]).status().unwrap().success());
    let o = child.wait_with_output().unwrap();
    assert_ne!(o.status.code(), Some(0));
    // Which world rank that pid was: the one whose dump is missing.
    let dumps: Vec<String> = fs::read_dir(out.join("flight")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(dumps.len(), 2, "{dumps:?}\n{}", String::from_utf8_lossy(&o.stderr));
    let missing = (0..3).find(|r| !dumps.contains(&format!("rank_{r}.json"))).unwrap();
    let o = doctor(&[out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let report = String::from_utf8_lossy(&o.stdout);
    assert!(report.contains(&format!("verdict: rank {missing} left no dump: start there")), "{report}");
}
