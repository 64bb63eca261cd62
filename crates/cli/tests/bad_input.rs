//! User mistakes must fail cleanly: exit code 2 and exactly one `error: ...` line on stderr that
//! names what is wrong (no panic, no backtrace). Plus one end-to-end run of the happy path
//! (prepare, train, metrics, sample).
//!
//! Every training run here is tiny (1 layer, 32-wide, 3 steps on the CPU) and takes a fraction
//! of a second.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tempfile::TempDir;

/// Runs `fabbrica` with `args`. RUST_BACKTRACE=1 makes any panic or captured backtrace visible
/// (and so fail the one-line contract) instead of being hidden by the caller's environment.
fn fabbrica<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fabbrica"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .env_remove("CUDA_VISIBLE_DEVICES")
        .output()
        .expect("cannot run the fabbrica binary")
}

fn describe(out: &Output) -> String {
    format!(
        "exit status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Asserts the user-error contract: exit 2, stderr exactly one non-empty line starting with
/// `error: `, no panic or backtrace, and the line contains every string in `needles`.
/// Returns the line.
fn assert_user_error(out: &Output, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "expected exit code 2\n{}", describe(out));
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected exactly one stderr line\n{}", describe(out));
    let line = lines[0];
    assert!(line.starts_with("error: ") && line.len() > "error: ".len(), "expected 'error: <message>'\n{}", describe(out));
    let lower = stderr.to_lowercase();
    assert!(!lower.contains("panicked"), "panic on stderr\n{}", describe(out));
    assert!(!lower.contains("backtrace"), "backtrace on stderr\n{}", describe(out));
    for n in needles {
        assert!(line.contains(n), "stderr line does not mention {n:?}\n{}", describe(out));
    }
    line.to_string()
}

fn assert_success(out: &Output) {
    assert_eq!(out.status.code(), Some(0), "expected success\n{}", describe(out));
}

/// A few KB of English-looking text: one paragraph repeated with variations.
fn sample_text() -> String {
    let names = ["Anna", "Bruno", "Carla", "Dario", "Elena", "Fabio", "Giulia", "Marco"];
    let things = ["the loom", "a lathe", "the furnace", "his ledger", "her notebook", "the press"];
    let mut s = String::new();
    for i in 0..40 {
        let who = names[i % names.len()];
        let what = things[(i * 7 + 3) % things.len()];
        s.push_str(&format!(
            "In the morning {who} walked to the factory and looked at {what} for a long while. \
             \"It will not run by itself,\" {who} said, and the others laughed; it was day {i} of the season.\n"
        ));
        if i % 5 == 0 {
            s.push_str("By evening the yard was quiet again, and the smoke drifted east over the river.\n\n");
        }
    }
    s
}

/// A temp dir holding `input.txt` (from [`sample_text`]).
fn text_fixture() -> (TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("input.txt");
    std::fs::write(&path, sample_text()).unwrap();
    (dir, path)
}

/// Arguments for a tiny CPU training run reading `data` and writing `out_dir`.
fn tiny_train_args(data: &Path, out_dir: &Path) -> Vec<String> {
    let mut a = vec!["train".to_string()];
    for kv in [
        "run.device=cpu",
        "model.n_layer=1",
        "model.n_embd=32",
        "model.n_head=2",
        "model.block_size=16",
        "train.batch_size=4",
        "train.max_steps=3",
        "train.eval_iters=1",
        "train.log_interval=1",
        "run.sample_tokens=0",
        "run.threads=1",
    ] {
        a.push("--set".into());
        a.push(kv.into());
    }
    a.push("--set".into());
    a.push(format!("data.path={}", data.display()));
    a.push("--set".into());
    a.push(format!("run.out_dir={}", out_dir.display()));
    a
}

fn with_sets(mut args: Vec<String>, sets: &[&str]) -> Vec<String> {
    for s in sets {
        args.push("--set".into());
        args.push((*s).into());
    }
    args
}

/// Trains 3 tiny steps into `<tmp>/run` and returns (tempdir, data file, out_dir).
fn trained_run() -> (TempDir, PathBuf, PathBuf) {
    let (dir, data) = text_fixture();
    let out_dir = dir.path().join("run");
    let out = fabbrica(&tiny_train_args(&data, &out_dir));
    assert_success(&out);
    (dir, data, out_dir)
}

/// The checkpoint directory `checkpoints/latest` points at.
fn latest_checkpoint(out_dir: &Path) -> PathBuf {
    let root = out_dir.join("checkpoints");
    let name = std::fs::read_to_string(root.join("latest")).expect("checkpoints/latest");
    let dir = root.join(name.trim());
    assert!(dir.join("model.safetensors").is_file(), "{} has no model.safetensors", dir.display());
    dir
}

// 1
#[test]
fn missing_data_file_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no_such_corpus.txt");
    let out = fabbrica(&tiny_train_args(&missing, &dir.path().join("run")));
    assert_user_error(&out, &["no_such_corpus.txt"]);
}

// 2
#[test]
fn text_shorter_than_one_block() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("short.txt");
    std::fs::write(&data, "abcdefghij").unwrap();
    let out = fabbrica(&tiny_train_args(&data, &dir.path().join("run")));
    let line = assert_user_error(&out, &[]);
    assert!(line.contains("block"), "should mention block / model.block_size: {line}");
}

// 3
#[test]
fn token_id_beyond_vocab_names_file_and_id() {
    let (dir, text) = text_fixture();
    let prepared = dir.path().join("prepared");
    let out = fabbrica(&[
        "prepare".as_ref(),
        "--input".as_ref(),
        text.as_os_str(),
        "--tokenizer".as_ref(),
        "char".as_ref(),
        "--out".as_ref(),
        prepared.as_os_str(),
    ]);
    assert_success(&out);
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(prepared.join("meta.json")).unwrap()).unwrap();
    let vocab = meta["vocab_size"].as_u64().expect("meta.json vocab_size") as u16;
    assert!(vocab > 10 && vocab < 4242);
    // 2000 in-range ids with one 4242 in the middle.
    let mut bytes = Vec::new();
    for i in 0..2000u16 {
        let id = if i == 1234 { 4242 } else { i % vocab };
        bytes.extend_from_slice(&id.to_le_bytes());
    }
    std::fs::write(prepared.join("train.bin"), bytes).unwrap();
    let out = fabbrica(&tiny_train_args(&prepared, &dir.path().join("run")));
    assert_user_error(&out, &["train.bin", "4242"]);
}

// 4
#[test]
fn unknown_preset_lists_valid_ones() {
    let out = fabbrica(&["train", "--preset", "gpt9", "--dry-run"]);
    assert_user_error(&out, &["gpt9", "tiny", "gpt2-124m"]);
}

// 5
#[test]
fn unknown_key_is_named() {
    let out = fabbrica(&["train", "--set", "train.lrr=1", "--dry-run"]);
    assert_user_error(&out, &["train.lrr"]);
}

// 6
#[test]
fn malformed_toml_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad_config.toml");
    std::fs::write(&cfg, "[train\nlr = = 3e-4\n\"unterminated = \n").unwrap();
    let out = fabbrica(&["train".as_ref(), "--config".as_ref(), cfg.as_os_str(), "--dry-run".as_ref()]);
    assert_user_error(&out, &["bad_config.toml"]);
}

/// Inputs that are not regular files (a FIFO, an endless device) are refused by their kind,
/// never read: the read would block for ever or never end.
#[test]
fn inputs_that_are_not_regular_files_are_refused_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pipe.toml");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    for (cfg, kind) in [(fifo.as_os_str(), "a FIFO"), ("/dev/zero".as_ref(), "a character device")] {
        let out = fabbrica(&["train".as_ref(), "--config".as_ref(), cfg, "--dry-run".as_ref()]);
        assert_user_error(&out, &["config file", kind, "not a regular file"]);
    }
    let out = fabbrica(&["plan", "--model", "tiny", "--cluster", fifo.to_str().unwrap(), "--gpus", "8"]);
    assert_user_error(&out, &["cluster file", "pipe.toml", "a FIFO"]);
}

// 7
#[test]
fn resume_with_another_model_shape_names_tensor_and_shape() {
    let (_dir, data, out_dir) = trained_run();
    let args = with_sets(tiny_train_args(&data, &out_dir), &["run.resume=true", "model.n_embd=64", "model.n_head=2"]);
    let line = assert_user_error(&fabbrica(&args), &["shape"]);
    // A tensor name is quoted in the message, e.g. 'wte.weight'.
    assert!(line.contains(".weight'") || line.contains(".bias'"), "should name a tensor: {line}");
}

/// Resuming a run with a train.max_steps below the checkpoint's step would train nothing and
/// report success: refused, naming both numbers.
#[test]
fn resume_past_max_steps_is_refused() {
    let (_dir, data, out_dir) = trained_run();
    let args = with_sets(tiny_train_args(&data, &out_dir), &["run.resume=true", "train.max_steps=2"]);
    assert_user_error(&fabbrica(&args), &["train.max_steps = 2", "already trained 3 steps", "raise train.max_steps above 3"]);
}

// 8
#[test]
fn truncated_model_checkpoint_is_reported() {
    let (_dir, data, out_dir) = trained_run();
    let ck = latest_checkpoint(&out_dir);
    let model = ck.join("model.safetensors");
    let len = std::fs::metadata(&model).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&model).unwrap();
    f.set_len(len / 2).unwrap();
    drop(f);
    let args = with_sets(tiny_train_args(&data, &out_dir), &["run.resume=true"]);
    let line = assert_user_error(&fabbrica(&args), &["model.safetensors"]);
    assert!(line.contains("corrupt") || line.contains("truncated"), "should say corrupt/truncated: {line}");
}

// 8b
#[test]
fn garbage_state_json_is_reported() {
    let (_dir, data, out_dir) = trained_run();
    let ck = latest_checkpoint(&out_dir);
    std::fs::write(ck.join("state.json"), b"\x00\xffnot json at all {{{\n\n").unwrap();
    let args = with_sets(tiny_train_args(&data, &out_dir), &["run.resume=true"]);
    assert_user_error(&fabbrica(&args), &["state.json"]);
    // `sample` reads the same checkpoint and must fail the same way.
    let out = fabbrica(&["sample".as_ref(), "--checkpoint".as_ref(), out_dir.as_os_str(), "--device".as_ref(), "cpu".as_ref()]);
    assert_user_error(&out, &["state.json"]);
}

// 9
#[test]
fn sample_without_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = fabbrica(&[
        "sample".as_ref(),
        "--checkpoint".as_ref(),
        dir.path().as_os_str(),
        "--tokens".as_ref(),
        "5".as_ref(),
        "--device".as_ref(),
        "cpu".as_ref(),
    ]);
    assert_user_error(&out, &[&dir.path().display().to_string()]);
    let missing = dir.path().join("nowhere");
    let out = fabbrica(&["sample".as_ref(), "--checkpoint".as_ref(), missing.as_os_str(), "--device".as_ref(), "cpu".as_ref()]);
    assert_user_error(&out, &["nowhere"]);
}

// Beyond the list above: damaged prepared directories, bad text, a missing config file.
#[test]
fn other_data_and_config_mistakes() {
    let (dir, text) = text_fixture();
    let prepared = dir.path().join("prepared");
    let out = fabbrica(&["prepare".as_ref(), "--input".as_ref(), text.as_os_str(), "--out".as_ref(), prepared.as_os_str()]);
    assert_success(&out);
    let run = dir.path().join("run");

    // train.bin with an odd byte count is not a uint16 file.
    let mut bin = std::fs::read(prepared.join("train.bin")).unwrap();
    bin.push(7);
    std::fs::write(prepared.join("train.bin"), &bin).unwrap();
    assert_user_error(&fabbrica(&tiny_train_args(&prepared, &run)), &["train.bin"]);
    bin.pop();
    std::fs::write(prepared.join("train.bin"), &bin).unwrap();

    // meta.json: malformed, then missing.
    std::fs::write(prepared.join("meta.json"), "{bad").unwrap();
    assert_user_error(&fabbrica(&tiny_train_args(&prepared, &run)), &["meta.json"]);
    std::fs::remove_file(prepared.join("meta.json")).unwrap();
    assert_user_error(&fabbrica(&tiny_train_args(&prepared, &run)), &["meta.json"]);

    // A text file that is not UTF-8.
    let binary = dir.path().join("binary_blob.txt");
    std::fs::write(&binary, [0xffu8, 0xfe, 0x00, b'a'].repeat(200)).unwrap();
    assert_user_error(&fabbrica(&tiny_train_args(&binary, &run)), &["binary_blob.txt", "UTF-8"]);

    // A config file that does not exist.
    let cfg = dir.path().join("missing_config.toml");
    let out = fabbrica(&["train".as_ref(), "--config".as_ref(), cfg.as_os_str(), "--dry-run".as_ref()]);
    assert_user_error(&out, &["missing_config.toml"]);
}

// 10
#[test]
fn invalid_values_name_their_key() {
    for (set, key) in [("train.batch_size=0", "train.batch_size"), ("run.device=tpu", "run.device"), ("train.lr=-1", "train.lr")] {
        let out = fabbrica(&["train", "--set", set, "--dry-run"]);
        assert_user_error(&out, &[key]);
    }
}

// 10b
#[test]
fn dry_run_with_valid_config() {
    let out = fabbrica(&["train", "--preset", "tiny", "--set", "run.device=cpu", "--dry-run"]);
    assert_success(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("parameters"), "{}", describe(&out));
}

#[test]
fn end_to_end_prepare_train_sample() {
    let (dir, text) = text_fixture();

    // prepare
    let prepared = dir.path().join("prepared");
    let out = fabbrica(&[
        "prepare".as_ref(),
        "--input".as_ref(),
        text.as_os_str(),
        "--tokenizer".as_ref(),
        "char".as_ref(),
        "--out".as_ref(),
        prepared.as_os_str(),
    ]);
    assert_success(&out);
    for f in ["train.bin", "val.bin"] {
        let n = std::fs::metadata(prepared.join(f)).unwrap_or_else(|e| panic!("{f}: {e}")).len();
        assert!(n > 0 && n % 2 == 0, "{f} has {n} bytes; expected a positive even size");
    }
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(prepared.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["tokenizer"], "char");
    assert!(meta["vocab_size"].as_u64().unwrap() > 0);

    // train on the prepared dir
    let out_dir = dir.path().join("run");
    let out = fabbrica(&tiny_train_args(&prepared, &out_dir));
    assert_success(&out);
    let metrics = std::fs::read_to_string(out_dir.join("metrics.jsonl")).expect("metrics.jsonl");
    let keys = ["step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "step_ms", "peak_mem_bytes"];
    let full: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("bad metrics line {l:?}: {e}")))
        .filter(|v| keys.iter().all(|k| v.get(k).is_some()))
        .collect();
    assert!(!full.is_empty(), "no metrics.jsonl line has all of {keys:?}:\n{metrics}");
    assert!(full.iter().all(|v| v["loss"].as_f64().is_some_and(f64::is_finite)), "{metrics}");
    assert_eq!(full.last().unwrap()["step"].as_u64(), Some(3), "{metrics}");

    // sample from the run directory
    let out = fabbrica(&[
        "sample".as_ref(),
        "--checkpoint".as_ref(),
        out_dir.as_os_str(),
        "--tokens".as_ref(),
        "20".as_ref(),
        "--device".as_ref(),
        "cpu".as_ref(),
    ]);
    assert_success(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.trim().is_empty(), "sample printed nothing\n{}", describe(&out));
}

// Hugging Face tokenizer files (`hf:PATH`): missing, malformed, oversized, or not named.
#[test]
fn hf_tokenizer_file_mistakes_name_the_file() {
    let (dir, text) = text_fixture();
    let prepared = dir.path().join("prepared");
    let run = dir.path().join("run");
    let prepare_with = |spec: &str| {
        fabbrica(&[
            "prepare".as_ref(),
            "--input".as_ref(),
            text.as_os_str(),
            "--tokenizer".as_ref(),
            spec.as_ref(),
            "--out".as_ref(),
            prepared.as_os_str(),
        ])
    };
    let train_with = |spec: &str| fabbrica(&with_sets(tiny_train_args(&text, &run), &[&format!("data.tokenizer={spec}")]));

    // Missing: prepare and train both name the path.
    let missing = dir.path().join("no_such_tokenizer.json");
    let spec = format!("hf:{}", missing.display());
    assert_user_error(&prepare_with(&spec), &["no_such_tokenizer.json", "does not exist"]);
    assert_user_error(&train_with(&spec), &["no_such_tokenizer.json", "does not exist"]);
    assert!(!prepared.join("meta.json").exists(), "nothing prepared from a missing tokenizer");

    // Malformed JSON, and JSON that is not a tokenizer.
    for (name, content) in [("truncated.json", "{\"version\": \"1.0\", \"model\": {"), ("not_a_tokenizer.json", "{\"hello\": [1, 2, 3]}")] {
        let p = dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        let spec = format!("hf:{}", p.display());
        assert_user_error(&prepare_with(&spec), &[name, "not a valid Hugging Face tokenizer"]);
        assert_user_error(&train_with(&spec), &[name, "not a valid Hugging Face tokenizer"]);
    }

    // Too large: refused by size (a sparse file; nothing is read).
    let big = dir.path().join("huge_tokenizer.json");
    std::fs::File::create(&big).unwrap().set_len(fabbrica_data::MAX_TOKENIZER_FILE_BYTES + 1).unwrap();
    let spec = format!("hf:{}", big.display());
    assert_user_error(&prepare_with(&spec), &["huge_tokenizer.json", "more than"]);

    // A directory instead of a file.
    let spec = format!("hf:{}", dir.path().display());
    assert_user_error(&prepare_with(&spec), &["not a valid Hugging Face tokenizer"]);

    // No path, or an unknown name: the config key / the valid names are given.
    assert_user_error(&train_with("hf:"), &["data.tokenizer", "hf:PATH"]);
    assert_user_error(&prepare_with("sentencepiece"), &["sentencepiece", "hf:PATH"]);
}

/// `--help` names every preset the config accepts (the list is written out for clap).
#[test]
fn help_lists_every_preset() {
    for cmd in [&["train", "--help"][..], &["bench", "train", "--help"]] {
        let out = fabbrica(cmd);
        assert_success(&out);
        let help = String::from_utf8_lossy(&out.stdout).into_owned();
        let words: Vec<&str> = help.split(|c: char| c.is_whitespace() || ",():".contains(c)).collect();
        for name in fabbrica_models::PRESET_NAMES {
            assert!(words.contains(&name), "{cmd:?}: {name} missing from\n{help}");
        }
    }
}

/// An output path that cannot be written is refused before the work, not after it.
#[test]
fn unwritable_output_paths_are_refused_before_the_work() {
    let cases: [(&[&str], &str); 4] = [
        (&["bench", "train", "--steps", "1", "--warmup", "0", "--json", "/nonexistent-dir/bench.json"], "--json /nonexistent-dir/bench.json"),
        (&["bench", "collectives", "--op", "all_reduce", "--json", "/proc/nope.json"], "--json /proc/nope.json"),
        (&["plan", "--model", "tiny", "--cluster", "cpu", "--gpus", "1", "--json", "/nonexistent-dir/plan.json"], "--json"),
        (&["bench", "ddp", "--steps", "1", "--json", "/tmp"], "is a directory"),
    ];
    for (args, needle) in cases {
        let out = fabbrica(args);
        let line = assert_user_error(&out, &[needle]);
        assert!(line.contains("give a path in an existing, writable directory") || line.contains("give a file name"), "{line}");
        // Nothing was measured: no results line on stdout.
        assert!(out.stdout.is_empty(), "{args:?}: {}", String::from_utf8_lossy(&out.stdout));
    }
}

/// `prepare` says when a split is too short to train on at the presets' block sizes, and by how
/// much (the files are still written: a small block may be what the user wants).
#[test]
fn prepare_says_when_a_split_is_too_short_for_the_presets() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("short.txt");
    std::fs::write(&input, "abcdefghij".repeat(30)).unwrap();
    let out = fabbrica(&["prepare".as_ref(), "--input".as_ref(), input.as_os_str(), "--out".as_ref(), dir.path().join("p").as_os_str()]);
    assert_success(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    // 300 characters, 10% of them validation: 30 tokens.
    assert!(
        err.contains("note: the val split has 30 tokens, so model.block_size can be at most 29") && err.contains("larger --val-fraction"),
        "{err}"
    );
    assert!(dir.path().join("p/meta.json").is_file());
}

/// `export --out` somewhere it cannot write: one line naming that place (not a temporary's name)
/// and what to give instead.
#[test]
fn export_into_an_unwritable_place_is_one_line() {
    let (_dir, _data, out_dir) = trained_run();
    let out = fabbrica(&["export".as_ref(), "--checkpoint".as_ref(), out_dir.as_os_str(), "--out".as_ref(), "/proc/exported".as_ref()]);
    let line = assert_user_error(&out, &["cannot write the export into /proc", "give --out a new directory"]);
    assert!(!line.contains(".tmp-"), "{line}");
}

/// Resuming with another global batch trains on, and says so with the setting that keeps it.
#[test]
fn resuming_with_another_global_batch_says_how_to_keep_it() {
    let (_dir, data, out_dir) = trained_run();
    let args = with_sets(tiny_train_args(&data, &out_dir), &["run.resume=true", "train.max_steps=4", "train.batch_size=2"]);
    let out = fabbrica(&args);
    assert_success(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("note: the checkpoint was trained with a global batch of 4 sequences, this run has 2 (micro 2 x accum 1 x dp 1)")
            && err.contains("set train.grad_accum to 2 to keep it"),
        "{err}"
    );
    // The same batch: no note.
    let args = with_sets(tiny_train_args(&data, &out_dir), &["run.resume=true", "train.max_steps=5", "train.batch_size=2"]);
    let out = fabbrica(&args);
    assert_success(&out);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("global batch"), "{}", describe(&out));
}
