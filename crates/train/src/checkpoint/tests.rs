//! Checkpoint format, retention and resume selection, on real files and real tensors.

use std::fs;
use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::*;
use crate::config::Config;

fn state(step: u64, run_id: &str) -> CheckpointState {
    let tok = fabbrica_data::Tokenizer::char_from_text("abc\n").unwrap();
    CheckpointState {
        format_version: FORMAT_VERSION,
        step,
        seed: 7,
        config: Config::preset("tiny").unwrap(),
        tokenizer: fabbrica_data::Meta::for_tokenizer(&tok),
        val_loss: Some(1.5),
        sha256: Default::default(),
        run_id: run_id.into(),
        skipped_steps: 0,
        global_batch: 0,
        state_sha256: String::new(),
    }
}

fn tensors(v: f32) -> Vec<(String, Tensor)> {
    vec![("w".into(), Tensor::full([3, 4], v as f64, (Kind::Float, Device::Cpu))), ("b".into(), Tensor::from_slice(&[v, 2.0 * v]))]
}

fn save_step(out: &Path, step: u64, run_id: &str, keep: usize) -> PathBuf {
    save(out, state(step, run_id), &tensors(step as f32), &tensors(0.5), keep).unwrap()
}

fn steps(out: &Path) -> Vec<u64> {
    list(&checkpoints_dir(out)).unwrap().into_iter().map(|(s, _)| s).collect()
}

#[test]
fn round_trip_verifies_everything() {
    let dir = tempfile::tempdir().unwrap();
    let d = save_step(dir.path(), 5, "r1", 2);
    let l = load(&d).unwrap();
    assert_eq!(l.state.step, 5);
    assert_eq!(l.state.run_id, "r1");
    assert_eq!(l.state.format_version, FORMAT_VERSION);
    assert!(!l.state.state_sha256.is_empty());
    let w = &l.model.iter().find(|(n, _)| n == "w").unwrap().1;
    assert_eq!(f64::try_from(w.sum(Kind::Float)).unwrap(), 60.0);
    assert_eq!(fs::read_to_string(checkpoints_dir(dir.path()).join("latest")).unwrap(), "step_00000005\n");
}

/// Issue 9.1: a shorter re-run must never have its new checkpoint removed by retention.
#[test]
fn retention_never_removes_the_checkpoint_just_written_nor_another_runs() {
    let dir = tempfile::tempdir().unwrap();
    for s in [20, 30] {
        save_step(dir.path(), s, "old", 2);
    }
    // Another run writes lower step numbers into the same directory (the trainer refuses or
    // archives before this; retention must hold on its own all the same).
    let d = save_step(dir.path(), 15, "new", 2);
    assert!(d.is_dir(), "the checkpoint just written was removed");
    assert_eq!(steps(dir.path()), vec![15, 20, 30]);
    save_step(dir.path(), 16, "new", 2);
    save_step(dir.path(), 17, "new", 2);
    // keep = 2 of run "new": 16 and 17; the other run's 20 and 30 untouched.
    assert_eq!(steps(dir.path()), vec![16, 17, 20, 30]);
}

#[test]
fn retention_keeps_the_newest_of_this_run() {
    let dir = tempfile::tempdir().unwrap();
    for s in 1..=5 {
        save_step(dir.path(), s * 10, "r", 3);
    }
    assert_eq!(steps(dir.path()), vec![30, 40, 50]);
    save_step(dir.path(), 60, "r", 1);
    assert_eq!(steps(dir.path()), vec![60]);
}

/// Issue 9.2: resume takes the newest valid checkpoint by itself; `latest` is a hint.
#[test]
fn resume_finds_the_newest_checkpoint_without_latest() {
    let dir = tempfile::tempdir().unwrap();
    for s in [10, 20] {
        save_step(dir.path(), s, "r", 5);
    }
    fs::remove_file(checkpoints_dir(dir.path()).join("latest")).unwrap();
    let r = find_resume(dir.path(), None).unwrap();
    assert_eq!(r.loaded.state.step, 20);
    assert!(r.skipped.is_empty() && r.ahead.is_empty() && r.in_run);
    // A pointer that tries to leave the directory is ignored, not followed.
    fs::write(checkpoints_dir(dir.path()).join("latest"), "../../etc\n").unwrap();
    assert_eq!(find_resume(dir.path(), None).unwrap().loaded.state.step, 20);
    assert_eq!(latest(dir.path()).unwrap().unwrap(), checkpoints_dir(dir.path()).join("step_00000020"));
}

#[test]
fn resume_with_nothing_to_resume_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let e = find_resume(dir.path(), None).err().unwrap().to_string();
    assert!(e.contains("no checkpoint") && e.contains("run.resume=false"), "{e}");
    assert!(!e.contains('\n'));
}

/// Issue 9.3: a corrupt newest checkpoint falls back to the one before, saying which and why.
#[test]
fn a_corrupt_newest_checkpoint_falls_back_to_the_newest_valid_one() {
    let dir = tempfile::tempdir().unwrap();
    for s in [10, 20, 30] {
        save_step(dir.path(), s, "r", 5);
    }
    let root = checkpoints_dir(dir.path());
    // Truncate the newest model file.
    let f = root.join("step_00000030/model.safetensors");
    let len = fs::metadata(&f).unwrap().len();
    fs::OpenOptions::new().write(true).open(&f).unwrap().set_len(len / 2).unwrap();
    let r = find_resume(dir.path(), None).unwrap();
    assert_eq!(r.loaded.state.step, 20);
    assert_eq!(r.skipped.len(), 1);
    assert!(r.skipped[0].0.ends_with("step_00000030") && r.skipped[0].1.contains("corrupt"), "{:?}", r.skipped);
    assert_eq!(r.ahead, vec![root.join("step_00000030")]);
    // run.resume_from picks an older one; the newer ones are "ahead".
    let r = find_resume(dir.path(), Some(&root.join("step_00000010"))).unwrap();
    assert_eq!(r.loaded.state.step, 10);
    assert!(r.in_run);
    assert_eq!(r.ahead.len(), 2);
    // run.resume_from a corrupt one is refused (no silent substitute for an explicit choice).
    let e = find_resume(dir.path(), Some(&root.join("step_00000030"))).err().unwrap().to_string();
    assert!(e.contains("run.resume_from") && e.contains("corrupt"), "{e}");
    let e = find_resume(dir.path(), Some(dir.path())).err().unwrap().to_string();
    assert!(e.contains("not a checkpoint directory"), "{e}");
}

/// Issue 9.3: state.json carries its own checksum; editing its step is refused.
#[test]
fn an_edited_state_json_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = save_step(dir.path(), 10, "r", 5);
    let p = d.join("state.json");
    let text = fs::read_to_string(&p).unwrap();
    assert!(text.contains("\"step\": 10"));
    fs::write(&p, text.replace("\"step\": 10", "\"step\": 99")).unwrap();
    let e = read_state(&d).err().unwrap().to_string();
    assert!(e.contains("edited or damaged"), "{e}");
    // Reformatting alone (whitespace) is not an edit of content.
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
    assert_eq!(read_state(&d).unwrap().step, 10);
}

#[test]
fn version_1_checkpoints_still_load() {
    let dir = tempfile::tempdir().unwrap();
    let d = save_step(dir.path(), 10, "r", 5);
    let p = d.join("state.json");
    let mut v: serde_json::Value = serde_json::from_str(&fs::read_to_string(&p).unwrap()).unwrap();
    let o = v.as_object_mut().unwrap();
    o.insert("format_version".into(), 1.into());
    for k in ["run_id", "skipped_steps", "state_sha256"] {
        o.remove(k);
    }
    fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    let l = load(&d).unwrap();
    assert_eq!((l.state.step, l.state.run_id.as_str()), (10, ""));
    o_version_too_new(&d);
}

fn o_version_too_new(d: &Path) {
    let p = d.join("state.json");
    let mut v: serde_json::Value = serde_json::from_str(&fs::read_to_string(&p).unwrap()).unwrap();
    v.as_object_mut().unwrap().insert("format_version".into(), 9.into());
    fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
    let e = read_state(d).err().unwrap().to_string();
    assert!(e.contains("format version 9"), "{e}");
}

/// Issue 9.6: a checkpoint holding a non-finite tensor is never written.
#[test]
fn non_finite_tensors_are_never_written() {
    let dir = tempfile::tempdir().unwrap();
    save_step(dir.path(), 10, "r", 1);
    let mut bad = tensors(1.0);
    bad[1].1 = Tensor::from_slice(&[1.0f32, f32::NAN]);
    let e = save(dir.path(), state(20, "r"), &bad, &tensors(0.5), 1).err().unwrap();
    assert!(matches!(e, TrainError::NonFiniteCheckpoint { step: 20, .. }), "{e}");
    assert!(e.to_string().contains("`b`"), "{e}");
    let inf = vec![("m".to_string(), Tensor::from_slice(&[f32::INFINITY]))];
    assert!(save(dir.path(), state(20, "r"), &tensors(1.0), &inf, 1).is_err());
    // The previous checkpoint is intact and still the only one.
    assert_eq!(steps(dir.path()), vec![10]);
    load(&checkpoints_dir(dir.path()).join("step_00000010")).unwrap();
}

#[test]
fn archive_moves_an_earlier_run_whole() {
    let dir = tempfile::tempdir().unwrap();
    for s in [10, 20] {
        save_step(dir.path(), s, "old", 5);
    }
    fs::write(dir.path().join("metrics.jsonl"), "{}\n").unwrap();
    fs::write(dir.path().join("config.toml"), "x").unwrap();
    let dirs = earlier_run(dir.path()).unwrap();
    assert_eq!(dirs.len(), 2);
    let a = archive_run(dir.path(), &dirs, true).unwrap();
    assert!(earlier_run(dir.path()).unwrap().is_empty());
    assert!(!dir.path().join("metrics.jsonl").exists());
    assert!(a.dest.starts_with(dir.path().join("archive")));
    assert!(a.dest.join("metrics.jsonl").is_file() && a.dest.join("config.toml").is_file());
    load(&a.dest.join("checkpoints/step_00000020")).unwrap();
    // A second archive in the same second gets its own directory.
    save_step(dir.path(), 5, "new", 5);
    let b = archive_run(dir.path(), &earlier_run(dir.path()).unwrap(), true).unwrap();
    assert_ne!(a.dest, b.dest);
}

#[test]
fn dir_names_parse_strictly() {
    assert_eq!(parse_dir_name("step_00000015"), Some(15));
    assert_eq!(parse_dir_name("step_15"), Some(15));
    for bad in ["step_", "step_1a", "step_-1", "Step_1", "step_99999999999999999999999", ".step_1.tmp-3"] {
        assert_eq!(parse_dir_name(bad), None, "{bad}");
    }
}

#[test]
fn new_run_ids_differ() {
    let (a, b) = (new_run_id(), new_run_id());
    assert_eq!(a.len(), 16);
    assert_ne!(a, b);
}

/// The disk-full path mid-write (past the free-space check): libtorch's own error for ENOSPC is
/// recognised as a full disk. /dev/full answers every write with ENOSPC.
#[test]
fn a_write_error_of_enospc_reads_as_a_full_disk() {
    let e = Tensor::write_safetensors(&[("w", Tensor::zeros([1024], (Kind::Float, Device::Cpu)))], "/dev/full").unwrap_err();
    let why = one_line(&e.to_string());
    assert!(is_disk_full(&why), "{why}");
    let e = std::fs::write("/dev/full", [0u8; 10]).unwrap_err();
    assert!(is_disk_full(&e.to_string()), "{e}");
}

/// Floats survive the state checksum (serde_json must read them back exactly).
#[test]
fn awkward_floats_round_trip_through_the_state_checksum() {
    let dir = tempfile::tempdir().unwrap();
    for (i, v) in [3.3154070377349854f64, 0.1 + 0.2, 1e-300, 2.0f64.sqrt()].into_iter().enumerate() {
        let mut st = state(i as u64 + 1, "r");
        st.val_loss = Some(v);
        st.config.train.lr = v.abs().max(1e-12);
        st.config.train.min_lr = 0.0;
        let d = save(dir.path(), st, &tensors(1.0), &tensors(0.5), 10).unwrap();
        assert_eq!(read_state(&d).unwrap().val_loss, Some(v));
    }
}

/// Writes a two-shard checkpoint the way pipeline stages do: each shard, then the commit.
fn save_sharded(out: &Path, step: u64, keep: usize) -> PathBuf {
    let tmp = sharded::begin(out, step, 0).unwrap();
    let named = |p: &str, v: f32| -> Vec<(String, Tensor)> { tensors(v).into_iter().map(|(n, t)| (format!("{p}.{n}"), t)).collect() };
    let m: Vec<sharded::ShardInfo> = (0..2)
        .map(|i| sharded::write_shard(&tmp, &sharded::shard_name("model", i, 2), &named(&format!("s{i}"), step as f32), step).unwrap())
        .collect();
    let o: Vec<sharded::ShardInfo> =
        (0..2).map(|i| sharded::write_shard(&tmp, &sharded::shard_name("optim", i, 2), &named(&format!("s{i}"), 0.5), step).unwrap()).collect();
    sharded::commit(out, &tmp, state(step, "r1"), &m, &o, keep).unwrap()
}

#[test]
fn sharded_checkpoints_round_trip_and_verify_every_shard() {
    let dir = tempfile::tempdir().unwrap();
    let d = save_sharded(dir.path(), 4, 2);
    let mut names: Vec<String> = fs::read_dir(&d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "optim-00001-of-00002.safetensors",
            "optim-00002-of-00002.safetensors",
            "optim.safetensors.index.json",
            "state.json"
        ]
    );
    let l = load(&d).unwrap();
    let mut got: Vec<&str> = l.model.iter().map(|(n, _)| n.as_str()).collect();
    got.sort();
    assert_eq!(got, ["s0.b", "s0.w", "s1.b", "s1.w"]);
    assert_eq!(l.optim.len(), 4);
    // Hugging Face's index: weight_map from tensor name to shard, total_size in bytes.
    let idx: serde_json::Value = serde_json::from_str(&fs::read_to_string(d.join("model.safetensors.index.json")).unwrap()).unwrap();
    assert_eq!(idx["weight_map"]["s1.w"], "model-00002-of-00002.safetensors");
    assert!(idx["metadata"]["total_size"].as_u64().unwrap() > 0);
    // A damaged shard is refused by name.
    let shard = d.join("model-00002-of-00002.safetensors");
    let mut bytes = fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&shard, bytes).unwrap();
    let e = load(&d).err().unwrap().to_string();
    assert!(e.contains("model-00002-of-00002.safetensors is corrupt"), "{e}");
    // A failed write leaves nothing: NaN in a shard refuses before anything is written.
    let tmp = sharded::begin(dir.path(), 8, 0).unwrap();
    let nan = vec![("x".to_string(), Tensor::from_slice(&[f32::NAN]))];
    assert!(matches!(sharded::write_shard(&tmp, "model-00001-of-00001.safetensors", &nan, 8), Err(TrainError::NonFiniteCheckpoint { .. })));
    assert!(!tmp.join("model-00001-of-00001.safetensors").exists());
}

/// File names come from the index: one that leaves the directory, or that state.json does not
/// list, is refused even when every checksum has been forged to match.
#[test]
fn an_index_never_names_a_file_outside_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let d = save_sharded(dir.path(), 4, 2);
    fs::write(dir.path().join("evil.safetensors"), b"x").unwrap();
    for target in ["../../evil.safetensors", "/etc/passwd", "state.json"] {
        let idx_path = d.join("model.safetensors.index.json");
        let mut idx: serde_json::Value = serde_json::from_str(&fs::read_to_string(&idx_path).unwrap()).unwrap();
        idx["weight_map"]["s0.w"] = target.into();
        let bytes = serde_json::to_vec(&idx).unwrap();
        fs::write(&idx_path, &bytes).unwrap();
        let mut st = read_state(&d).unwrap();
        st.sha256.insert("model.safetensors.index.json".into(), files::sha256_bytes(&bytes));
        if target.contains("evil") {
            st.sha256.insert(target.into(), files::sha256_file(&dir.path().join("evil.safetensors")).unwrap());
        }
        st.state_sha256 = st.digest();
        fs::write(d.join(STATE_FILE), serde_json::to_vec(&st).unwrap()).unwrap();
        let e = load(&d).err().unwrap().to_string();
        assert!(e.contains("which is not a shard state.json lists"), "{target}: {e}");
    }
}

/// ZeRO-1 shard owners write their pieces of each moment (`name[a..b].exp_avg`); loading puts
/// them back together in the parameter's shape, and refuses pieces that leave a gap.
#[test]
fn zero1_pieces_are_reassembled_and_gaps_refused() {
    let dir = tempfile::tempdir().unwrap();
    let w = Tensor::arange(12, (Kind::Float, Device::Cpu)).reshape([3, 4]);
    let model = vec![("w".to_string(), w.shallow_clone())];
    let piece = |a: i64, b: i64| w.reshape([-1]).narrow(0, a, b - a) * 2.0;
    let pieces = vec![
        ("w[5..12].exp_avg".to_string(), piece(5, 12)),
        ("w[0..5].exp_avg".to_string(), piece(0, 5)),
        ("w[0..5].step".to_string(), Tensor::from(3.0f32)),
        ("w[5..12].step".to_string(), Tensor::from(3.0f32)),
        ("b.exp_avg".to_string(), Tensor::from_slice(&[1.0f32])),
    ];
    let got = sharded::assemble_slices(pieces, &model, dir.path()).unwrap();
    let m = &got.iter().find(|(n, _)| n == "w.exp_avg").unwrap().1;
    assert_eq!(m.size(), [3, 4]);
    assert!(m.equal(&(&w * 2.0)));
    assert_eq!(got.iter().filter(|(n, _)| n == "w.step").count(), 1);
    assert!(got.iter().any(|(n, _)| n == "b.exp_avg"));
    let gap = vec![("w[0..5].exp_avg".to_string(), piece(0, 5)), ("w[6..12].exp_avg".to_string(), piece(6, 12))];
    let e = sharded::assemble_slices(gap, &model, dir.path()).unwrap_err().to_string();
    assert!(e.contains("do not cover it exactly"), "{e}");
    let short = vec![("w[0..5].exp_avg".to_string(), piece(0, 5))];
    assert!(sharded::assemble_slices(short, &model, dir.path()).unwrap_err().to_string().contains("cover 5 of its 12"));
}

/// An index whose split cannot describe its slices (no parts, or parts that do not divide the
/// slice) is a corrupt checkpoint, named, not a division by zero or a failed reshape.
#[test]
fn tp_slices_an_index_cannot_split_are_refused() {
    let dir = Path::new("/ck");
    let slices = |parts: usize| {
        let t = |v: f64| Tensor::full([3, 2], v, (Kind::Float, Device::Cpu));
        let named = vec![("w#tp0".to_string(), t(1.0)), ("w#tp1".to_string(), t(2.0))];
        let how = std::collections::BTreeMap::from([("w".to_string(), sharded::TpSlice { dim: 0, parts, size: 2 })]);
        sharded::join_tp_slices(named, &how, dir)
    };
    let whole = slices(1).unwrap();
    assert_eq!(whole[0].0, "w");
    assert_eq!(whole[0].1.size(), vec![6, 2]);
    assert_eq!(whole[0].1.sum(Kind::Float).double_value(&[]), 18.0);
    for parts in [0, 2] {
        let e = slices(parts).unwrap_err().to_string();
        assert!(e.contains(&format!("into {parts} parts along dim 0")) && e.contains("[3, 2]") && e.contains("/ck"), "{e}");
    }
}

/// Re-writing a step swaps the new checkpoint in: the old one is never absent from the step's
/// name, and neither it nor the temporary is left behind.
#[test]
fn place_swaps_a_rewritten_step_in_whole() {
    let root = tempfile::tempdir().unwrap();
    let tmp = |tag: &str| {
        let d = root.path().join(format!(".tmp-{tag}"));
        fs::create_dir(&d).unwrap();
        fs::write(d.join("state.json"), tag).unwrap();
        d
    };
    let first = place(root.path(), &tmp("old"), 7).unwrap();
    assert_eq!(fs::read_to_string(first.join("state.json")).unwrap(), "old");
    let new = tmp("new");
    let again = place(root.path(), &new, 7).unwrap();
    assert_eq!(again, first);
    assert_eq!(fs::read_to_string(again.join("state.json")).unwrap(), "new");
    assert!(!new.exists());
    let names: Vec<String> = fs::read_dir(root.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, vec![dir_name(7)]);
}
