//! Mutation fuzzing of checkpoint reading: a real checkpoint (a two-step training run of a tiny
//! model, in-process) has its state.json and safetensors files mutated, then goes through the
//! public `checkpoint::read_state` and `checkpoint::load`. Each must return `Ok` or an error
//! whose message is one non-empty line; nothing panics.
//!
//! Checksums hide most damage from the parsers behind them (a flipped byte is "SHA-256 does not
//! match"), so most mutations are *resealed*: state.json's file checksums and its own digest are
//! recomputed after the change, and the bytes reach the JSON and safetensors parsers.
//!
//! Budget and seed: see tests/fuzzkit.rs. Regression cases: tests/fuzz_regressions/checkpoint/
//! <case>/ holding any of `state.json`, `model.safetensors`, `optim.safetensors` (the others come
//! from the fresh checkpoint) and, if present, an empty `reseal` file.

#[path = "../../../tests/fuzzkit.rs"]
mod fuzzkit;

use std::path::{Path, PathBuf};

use fabbrica_train::checkpoint::{self, CheckpointState};
use fabbrica_train::{train, Config, TrainOptions};
use fuzzkit::{mutate_bytes, one_line_error, Fuzz, Part, Rng};
use sha2::{Digest, Sha256};

const STATE: &str = "state.json";
const MODEL: &str = "model.safetensors";
const OPTIM: &str = "optim.safetensors";
const RESEAL: &str = "reseal";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Trains a tiny model for two steps and returns (tempdir, its newest checkpoint directory).
fn fresh_checkpoint() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("input.txt");
    std::fs::write(&text, "the quick brown fox jumps over the lazy dog\n".repeat(20)).unwrap();
    let sets: Vec<String> = [
        format!("data.path={}", text.display()),
        format!("run.out_dir={}", dir.path().join("run").display()),
        "run.device=cpu".into(),
        "run.sample_tokens=0".into(),
        "run.threads=1".into(),
        "model.n_layer=1".into(),
        "model.n_head=1".into(),
        "model.n_embd=8".into(),
        "model.block_size=8".into(),
        "train.batch_size=2".into(),
        "train.max_steps=2".into(),
        "train.warmup_steps=1".into(),
        "train.eval_iters=1".into(),
        "train.log_interval=1".into(),
    ]
    .to_vec();
    let cfg = Config::resolve(Some("tiny"), None, &sets).unwrap();
    train(&cfg, &TrainOptions::default()).unwrap();
    let root = dir.path().join("run/checkpoints");
    let mut steps: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir() && p.file_name().unwrap().to_string_lossy().starts_with("step_"))
        .collect();
    steps.sort();
    let ck = steps.pop().expect("training wrote a checkpoint");
    (dir, ck)
}

/// Rewrites state.json's checksums of the tensor files and its own digest (SHA-256 of the state
/// serialised with `state_sha256` empty) so that the files pass verification. Returns the new
/// state.json bytes, or the old ones when the state does not deserialize.
fn reseal(state_json: &[u8], model: &[u8], optim: &[u8]) -> Vec<u8> {
    let Ok(mut state) = serde_json::from_slice::<CheckpointState>(state_json) else { return state_json.to_vec() };
    state.sha256.insert(MODEL.into(), hex(&Sha256::digest(model)));
    state.sha256.insert(OPTIM.into(), hex(&Sha256::digest(optim)));
    state.state_sha256.clear();
    let digest = hex(&Sha256::digest(serde_json::to_vec(&state).unwrap()));
    state.state_sha256 = digest;
    serde_json::to_vec_pretty(&state).unwrap()
}

/// Writes `files` (name, bytes; `None` = absent) into `dir` and checks read_state and load.
fn check_one(dir: &Path, files: &[(&str, Option<&[u8]>)]) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    for (name, bytes) in files {
        if let Some(b) = bytes {
            std::fs::write(dir.join(name), b).map_err(|e| e.to_string())?;
        }
    }
    if let Err(e) = checkpoint::read_state(dir) {
        one_line_error(&e.to_string())?;
    }
    match checkpoint::load(dir) {
        Err(e) => one_line_error(&e.to_string())?,
        Ok(_) => fuzzkit::note_accepted(),
    }
    Ok(())
}

/// The three files of a case: `base` with `parts` overriding, resealed when asked.
fn assemble(base: &[Vec<u8>; 3], parts: &[Part]) -> [Vec<u8>; 3] {
    let get = |name: &str, i: usize| fuzzkit::part(parts, name).map(<[u8]>::to_vec).unwrap_or_else(|| base[i].clone());
    let (mut state, model, optim) = (get(STATE, 0), get(MODEL, 1), get(OPTIM, 2));
    if fuzzkit::part(parts, RESEAL).is_some() {
        state = reseal(&state, &model, &optim);
    }
    [state, model, optim]
}

/// The case's files as written: each of `files`, unless `parts` has a `<name>.missing` marker.
fn present<'a>(files: &'a [Vec<u8>; 3], parts: &[Part]) -> [(&'static str, Option<&'a [u8]>); 3] {
    let one = |name: &'static str, i: usize| (name, fuzzkit::part(parts, &format!("{name}.missing")).is_none().then_some(files[i].as_slice()));
    [one(STATE, 0), one(MODEL, 1), one(OPTIM, 2)]
}

/// Mutates a safetensors file, mostly inside its JSON header (8-byte LE length, then JSON).
fn mutate_safetensors(rng: &mut Rng, bytes: &mut Vec<u8>) {
    const DICT: [&[u8]; 18] = [
        b"\"dtype\"",
        b"\"F32\"",
        b"\"BF16\"",
        b"\"F64\"",
        b"\"U64\"",
        b"\"F8_E4M3\"",
        b"\"BOOL\"",
        b"\"shape\"",
        b"\"data_offsets\"",
        b"[]",
        b"[0]",
        b"[18446744073709551615]",
        b"[4294967296, 4294967296]",
        b"9223372036854775807",
        b"\"__metadata__\"",
        b"{}",
        b"-1",
        b"0",
    ];
    let header_len = bytes.get(..8).map(|h| u64::from_le_bytes(h.try_into().unwrap()) as usize).unwrap_or(0);
    match rng.below(4) {
        0 => mutate_bytes(rng, bytes, &DICT),
        1 if bytes.len() >= 8 => {
            // A new header length.
            let n = match rng.below(3) {
                0 => rng.interesting_int() as u64,
                1 => (header_len as u64 + rng.below(16) as u64).wrapping_sub(8),
                _ => rng.below(bytes.len() + 16) as u64,
            };
            bytes[..8].copy_from_slice(&n.to_le_bytes());
        }
        _ if bytes.len() >= 8 && header_len > 0 && 8 + header_len <= bytes.len() => {
            // Mutate the header JSON alone, keeping the length prefix consistent.
            let mut header = bytes[8..8 + header_len].to_vec();
            mutate_bytes(rng, &mut header, &DICT);
            let rest = bytes[8 + header_len..].to_vec();
            bytes.clear();
            bytes.extend_from_slice(&(header.len() as u64).to_le_bytes());
            bytes.extend_from_slice(&header);
            bytes.extend_from_slice(&rest);
        }
        _ => mutate_bytes(rng, bytes, &DICT),
    }
}

/// Mutates one leaf (or key) of the state.json document.
fn mutate_state_json(rng: &mut Rng, bytes: &[u8]) -> Vec<u8> {
    let Ok(mut doc) = serde_json::from_slice::<serde_json::Value>(bytes) else { return bytes.to_vec() };
    let mut leaves: Vec<String> = Vec::new();
    fn walk(v: &serde_json::Value, path: String, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                out.push(path.clone());
                for (k, c) in m {
                    walk(c, format!("{path}/{}", k.replace('~', "~0").replace('/', "~1")), out);
                }
            }
            _ => out.push(path),
        }
    }
    walk(&doc, String::new(), &mut leaves);
    let target = rng.pick(&leaves).clone();
    let new_value = match rng.below(8) {
        0 => serde_json::json!(rng.interesting_int() as i64),
        1 => serde_json::json!(u64::MAX),
        2 => serde_json::json!(-1),
        3 => serde_json::json!(rng.interesting_float().parse::<f64>().unwrap_or(0.0)),
        4 => serde_json::json!(rng.pick(&["", "a\nb", "\u{0}", "gpt2", "char", "../../etc", "step_x"])),
        5 => serde_json::Value::Null,
        6 => serde_json::json!([]),
        _ => serde_json::json!({}),
    };
    if target.is_empty() {
        doc = new_value;
    } else if rng.chance(20) {
        // Remove the key.
        let (parent, key) = target.rsplit_once('/').unwrap();
        if let Some(serde_json::Value::Object(m)) = doc.pointer_mut(parent) {
            m.remove(&key.replace("~1", "/").replace("~0", "~"));
        }
    } else if let Some(slot) = doc.pointer_mut(&target) {
        if slot.is_object() && rng.chance(50) {
            slot.as_object_mut().unwrap().insert("unexpected".into(), new_value);
        } else {
            *slot = new_value;
        }
    }
    serde_json::to_vec(&doc).unwrap()
}

#[test]
fn checkpoint_reading_never_panics_and_errors_are_one_line() {
    let (tmp, ck) = fresh_checkpoint();
    let mut base: [Vec<u8>; 3] = [STATE, MODEL, OPTIM].map(|f| std::fs::read(ck.join(f)).unwrap());
    let work = tmp.path().join("case");
    let mut fuzz = Fuzz::new("checkpoint", 300, &workspace());

    // Mutations start from a checkpoint that loads, so that they reach the parsers behind the
    // checks; most are then resealed (checksums recomputed) to get past them.
    checkpoint::load(&ck).expect("a freshly saved checkpoint loads");
    let resealed = reseal(&base[0], &base[1], &base[2]);
    let files = [(STATE, Some(resealed.as_slice())), (MODEL, Some(base[1].as_slice())), (OPTIM, Some(base[2].as_slice()))];
    assert!(check_one(&work, &files).is_ok() && checkpoint::load(&work).is_ok(), "resealing must reproduce what save writes");
    base[0] = resealed;

    let regressions = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_regressions/checkpoint");
    fuzz.replay(&regressions, |fuzz, parts| {
        let files = assemble(&base, &parts);
        let case = present(&files, &parts);
        fuzz.check(&parts, || check_one(&work, &case));
    });

    while fuzz.more() {
        let rng = &mut fuzz.rng;
        let mut parts: Vec<Part> = Vec::new();
        let mut missing: Option<&str> = None; // a file left out (a `<name>.missing` part)
        match rng.below(10) {
            0 | 1 => {
                let mut s = base[0].clone();
                mutate_bytes(rng, &mut s, &[b"\"format_version\"", b"\"sha256\"", b"\"config\"", b"null", b"99", b"\"\"", b"{", b"\\n"]);
                parts.push((STATE.into(), s));
            }
            2..=4 => {
                parts.push((STATE.into(), mutate_state_json(rng, &base[0])));
                if rng.chance(70) {
                    parts.push((RESEAL.into(), Vec::new()));
                }
            }
            5..=8 => {
                let (name, i) = if rng.chance(50) { (MODEL, 1) } else { (OPTIM, 2) };
                let mut b = base[i].clone();
                mutate_safetensors(rng, &mut b);
                parts.push((name.into(), b));
                if rng.chance(85) {
                    parts.push((RESEAL.into(), Vec::new()));
                }
            }
            _ => missing = Some(*rng.pick(&[STATE, MODEL, OPTIM])),
        }
        if let Some(m) = missing {
            parts.push((format!("{m}.missing"), Vec::new()));
        }
        let files = assemble(&base, &parts);
        let case = present(&files, &parts);
        fuzz.check(&parts, || check_one(&work, &case));
    }
    fuzz.finish();
}
