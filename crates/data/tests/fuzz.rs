//! Mutation fuzzing of everything `fabbrica_data::load` reads: a prepared directory's meta.json
//! (bytes and fields), train.bin/val.bin (lengths and contents), and raw text files (through
//! `load` and `prepare`). Every input either loads into a dataset whose every sampled window is
//! in range, or fails with a one-line error; nothing panics.
//!
//! Budget and seed: see tests/fuzzkit.rs. Regression cases: tests/fuzz_regressions/data/<case>/
//! holding `args.json` (`{"mode": "dir"|"text", "kind": "char"|"gpt2"|"hf:PATH", "block_size": N,
//! "val_fraction": F}`) and the files: `meta.json`, `train.bin`, `val.bin` (mode dir) or
//! `input.txt` (mode text).

#[path = "../../../tests/fuzzkit.rs"]
mod fuzzkit;

use std::path::{Path, PathBuf};

use fabbrica_data::{load, prepare, Sampler, Split, TokenizerSpec, META_FILE, TRAIN_FILE, VAL_FILE};
use fuzzkit::{mutate_bytes, one_line_error, part, Fuzz, Part, Rng};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

const TEXT: &str = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n\
                    The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n";

#[derive(serde::Serialize, serde::Deserialize, Clone, Debug)]
struct Args {
    mode: String,
    kind: String,
    block_size: usize,
    /// Text, so NaN and infinities survive JSON.
    val_fraction: String,
}

/// Loads what `parts` describe from `dir`; checks the dataset (if any) or the error.
fn check_one(dir: &Path, args: &Args, parts: &[Part]) -> Result<(), String> {
    let kind: TokenizerSpec = args.kind.parse().map_err(|e| format!("bad args: {e}"))?;
    let val_fraction: f64 = args.val_fraction.parse().map_err(|e| format!("bad args: {e}"))?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    for (name, bytes) in parts {
        if name != "args.json" {
            std::fs::write(dir.join(name), bytes).map_err(|e| e.to_string())?;
        }
    }
    let path = if args.mode == "text" { dir.join("input.txt") } else { dir.to_path_buf() };
    check_load(&path, &kind, args.block_size, val_fraction)?;
    if args.mode == "text" {
        // The same text through `prepare`, then loaded as a directory.
        let out = dir.join("prepared");
        match prepare(&path, &kind, &out, val_fraction) {
            Err(e) => one_line_error(&e.to_string())?,
            Ok(_) => check_load(&out, &TokenizerSpec::Char, args.block_size, 0.5)?,
        }
    }
    Ok(())
}

fn check_load(path: &Path, kind: &TokenizerSpec, block_size: usize, val_fraction: f64) -> Result<(), String> {
    let data = match load(path, kind, block_size, val_fraction) {
        Err(e) => return one_line_error(&e.to_string()),
        Ok(d) => d,
    };
    fuzzkit::note_accepted();
    let vocab = data.tokenizer.vocab_size();
    let sampler = Sampler::new(7);
    for split in [Split::Train, Split::Val] {
        let src = data.source(split);
        if src.len() <= block_size {
            return Err(format!("{split} split has {} tokens, block_size {block_size}: load should refuse", src.len()));
        }
        // Window draws stay in range (the sampler asserts it) and every id is in the vocabulary.
        let block = block_size.min(64);
        for step in [0u64, 1, 1 << 40] {
            let (x, y) = sampler.batch(src, split, step, 3, 2, block);
            if let Some(bad) = x.iter().chain(&y).find(|&&t| t < 0 || t as usize >= vocab) {
                return Err(format!("{split}: token {bad} outside the vocabulary of {vocab}"));
            }
        }
        let ids: Vec<u32> = src.window(0, src.len().min(32)).into_iter().map(|t| t as u32).collect();
        let _ = data.tokenizer.decode(&ids);
    }
    Ok(())
}

fn random_args(rng: &mut Rng, mode: &str) -> Args {
    let block_size = *rng.pick(&[1usize, 1, 2, 4, 8, 8, 16, 0, 200, 5000, usize::MAX / 2, usize::MAX - 1, usize::MAX]);
    let val_fraction = *rng.pick(&[0.1, 0.2, 0.5, 0.9, 0.0, 1.0, -0.1, f64::NAN, f64::INFINITY, 1e-300, 0.999_999]);
    let kind = rng.pick(&["char", "gpt2"]).to_string();
    Args { mode: mode.into(), kind, block_size, val_fraction: val_fraction.to_string() }
}

/// meta.json text with random (often wrong) fields.
fn random_meta(rng: &mut Rng) -> Vec<u8> {
    let tokenizer = rng.pick(&["\"char\"", "\"gpt2\"", "\"hf\"", "\"bpe\"", "\"a\\nb\"", "\"\"", "7", "null", "\"CHAR\""]).to_string();
    let vocab = match rng.below(4) {
        0 => "50257".to_string(),
        1 => rng.interesting_int().to_string(),
        2 => rng.interesting_float(),
        _ => (rng.below(70) + 1).to_string(),
    };
    let chars = match rng.below(6) {
        0 => None,
        1 => Some("\"\\n !,.:'TWabcdefghiklmnopqrstuvwy\"".to_string()),
        2 => Some("\"ba\"".to_string()),
        3 => Some("\"\\ud800\"".to_string()),
        4 => Some("\"\\u0000\\u0001\\n\"".to_string()),
        _ => {
            let n = rng.below(80);
            let s: String = (0..n).filter_map(|_| char::from_u32(32 + rng.below(0x3000) as u32)).collect();
            Some(serde_json::to_string(&s).unwrap())
        }
    };
    let mut fields = vec![format!("\"tokenizer\": {tokenizer}"), format!("\"vocab_size\": {vocab}")];
    if let Some(c) = chars {
        fields.push(format!("\"chars\": {c}"));
    }
    if rng.chance(30) {
        let dtype = rng.pick(&["\"uint16\"", "\"uint32\"", "\"int8\"", "null", "7", "\"UINT32\""]);
        fields.push(format!("\"dtype\": {dtype}"));
    }
    if rng.chance(10) {
        let file = rng.pick(&["\"train.bin\"", "\"meta.json\"", "\"\"", "\"nope.json\"", "\".\"", "3"]);
        fields.push(format!("\"tokenizer_file\": {file}"));
    }
    if rng.chance(10) {
        fields.push(rng.pick(&["\"extra\": 1", "\"e\\nx\": 1", "\"vocab_size\": 3"]).to_string());
    }
    if rng.chance(20) {
        fields.remove(rng.below(fields.len()));
    }
    format!("{{{}}}", fields.join(", ")).into_bytes()
}

#[test]
fn data_loading_never_panics_and_errors_are_one_line() {
    let root = tempfile::tempdir().unwrap();
    let work = root.path().join("case");
    let mut fuzz = Fuzz::new("data", 400, &workspace());

    let regressions = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_regressions/data");
    fuzz.replay(&regressions, |fuzz, parts| {
        let args: Args = serde_json::from_slice(part(&parts, "args.json").expect("args.json")).unwrap();
        fuzz.check(&parts, || check_one(&work, &args, &parts));
    });

    // Valid prepared directories (char, gpt2, and char with a uint32 dtype) to mutate.
    let input = root.path().join("input.txt");
    std::fs::write(&input, TEXT).unwrap();
    let mut bases: Vec<Vec<Part>> = Vec::new();
    for kind in &TokenizerSpec::BUILTIN {
        let out = root.path().join(kind.kind().as_str());
        prepare(&input, kind, &out, 0.2).unwrap();
        bases.push([META_FILE, TRAIN_FILE, VAL_FILE].iter().map(|f| (f.to_string(), std::fs::read(out.join(f)).unwrap())).collect());
    }
    let mut wide = bases[0].clone();
    let meta = String::from_utf8(wide[0].1.clone()).unwrap().replace("\"uint16\"", "\"uint32\"");
    wide[0].1 = meta.into_bytes();
    for part in &mut wide[1..] {
        part.1 = part.1.chunks_exact(2).flat_map(|b| u32::from(u16::from_le_bytes([b[0], b[1]])).to_le_bytes()).collect();
    }
    bases.push(wide);
    let json_dict: [&[u8]; 21] = [
        b"\"tokenizer\"",
        b"\"char\"",
        b"\"gpt2\"",
        b"\"vocab_size\"",
        b"\"chars\"",
        b"\"dtype\"",
        b"\"uint32\"",
        b"\"uint16\"",
        b"\"hf\"",
        b"\"tokenizer_file\"",
        b"50257",
        b"65536",
        b"-1",
        b"1e3",
        b"null",
        b"\\u0000",
        b"\\ud800",
        b"\\n",
        b"{}",
        b"[]",
        b"\"",
    ];
    let bin_dict: [&[u8]; 8] = [&[0xff, 0xff], &[0, 0], &[0x51, 0xc4], &[0x50, 0xc4], &[0], &[0xff], &[0, 0, 1, 0], &[0xff, 0xff, 0xff, 0xff]];

    while fuzz.more() {
        let rng = &mut fuzz.rng;
        let text_mode = rng.chance(20);
        let (args, parts) = if text_mode {
            let mut text = TEXT.as_bytes().to_vec();
            mutate_bytes(rng, &mut text, &[b"\xff", "\u{10ffff}".as_bytes(), b"\0", "é".as_bytes(), b""]);
            if rng.chance(10) {
                text.clear();
            }
            (random_args(rng, "text"), vec![("input.txt".to_string(), text)])
        } else {
            let mut parts = rng.pick(&bases).clone();
            match rng.below(5) {
                0 => parts[0].1 = random_meta(rng),
                1 => mutate_bytes(rng, &mut parts[0].1, &json_dict),
                2 => {
                    let i = 1 + rng.below(2);
                    mutate_bytes(rng, &mut parts[i].1, &bin_dict);
                }
                3 => {
                    let i = 1 + rng.below(2);
                    let len = parts[i].1.len();
                    parts[i].1.truncate(rng.below(len + 1));
                }
                _ => {
                    // Drop a file, or swap in the other tokenizer's.
                    let i = rng.below(3);
                    if rng.chance(50) {
                        parts.remove(i);
                    } else {
                        let other = rng.pick(&bases);
                        parts[i] = other[i].clone();
                    }
                }
            }
            (random_args(rng, "dir"), parts)
        };
        let mut saved = parts.clone();
        saved.push(("args.json".to_string(), serde_json::to_vec(&args).unwrap()));
        fuzz.check(&saved, || check_one(&work, &args, &parts));
    }
    fuzz.finish();
}
