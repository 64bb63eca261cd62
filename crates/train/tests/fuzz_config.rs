//! Mutation fuzzing of the config parser: `Config::resolve(preset, file, sets)` over mutated
//! TOML files and `--set` strings. Every input either resolves to a config that validates and
//! round-trips through its TOML, or fails with a one-line error; nothing panics.
//!
//! Budget and seed: see tests/fuzzkit.rs (FABBRICA_FUZZ_ITERS / FABBRICA_FUZZ_SECONDS /
//! FABBRICA_FUZZ_SEED). Regression cases: tests/fuzz_regressions/config/<case>/ holding any of
//! `preset.txt`, `config.toml`, `sets.json` (a JSON array of `key=value` strings).

#[path = "../../../tests/fuzzkit.rs"]
mod fuzzkit;

use std::path::{Path, PathBuf};

use fabbrica_models::PRESET_NAMES;
use fabbrica_train::Config;
use fuzzkit::{mutate_bytes, one_line_error, part, Fuzz, Part, Rng};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every `section.key` of the schema, with its default value.
fn schema_keys() -> Vec<(String, toml::Value)> {
    let v = toml::Value::try_from(Config::preset("tiny").unwrap()).unwrap();
    let mut out = Vec::new();
    for (section, t) in v.as_table().unwrap() {
        for (k, val) in t.as_table().unwrap() {
            out.push((format!("{section}.{k}"), val.clone()));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// A value text for `--set` or a TOML file: mostly of the key's own type, often at its edges.
fn random_value(rng: &mut Rng, default: &toml::Value) -> String {
    let own_type = rng.chance(70);
    let kind = if own_type {
        match default {
            toml::Value::Integer(_) => 0,
            toml::Value::Float(_) => 1,
            toml::Value::Boolean(_) => 2,
            _ => 3,
        }
    } else {
        rng.below(6)
    };
    match kind {
        0 => rng.interesting_int().to_string(),
        1 => rng.interesting_float(),
        2 => rng.pick(&["true", "false", "yes", "1", "TRUE"]).to_string(),
        3 => {
            let words = [
                "\"auto\"",
                "\"cpu\"",
                "\"cuda\"",
                "\"char\"",
                "\"gpt2\"",
                "\"fp32\"",
                "\"bf16\"",
                "\"stop\"",
                "\"skip\"",
                "\"refuse\"",
                "\"archive\"",
                "\"continue\"",
                "\"mpi\"",
                "\"nccl\"",
                "\"on\"",
                "\"off\"",
                "\"\"",
                "\"runs/x\"",
                "\"a\\nb\"",
                "tpu",
                "\"\\u0000\"",
            ];
            rng.pick(&words).to_string()
        }
        4 => rng.pick(&["[1, 2]", "[]", "{a = 1}", "1979-05-27T07:32:00Z", "{}", "[[1]]"]).to_string(),
        _ => rng.pick(&["abc", "=", "1 2", "\"unterminated", "0x10", "1_000", "+5", "-0", "1e", ""]).to_string(),
    }
}

/// A TOML document: some sections with random keys (mostly valid ones) and values.
fn random_toml(rng: &mut Rng, keys: &[(String, toml::Value)]) -> String {
    let mut by_section: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for _ in 0..1 + rng.below(6) {
        let (key, default) = rng.pick(keys);
        let (section, mut name) = key.split_once('.').map(|(s, n)| (s.to_string(), n.to_string())).unwrap();
        if rng.chance(10) {
            name.push('x');
        }
        by_section.entry(section).or_default().push(format!("{name} = {}", random_value(rng, default)));
    }
    let mut text = String::new();
    for (section, lines) in by_section {
        text.push_str(&format!("[{section}]\n"));
        for l in lines {
            text.push_str(&l);
            text.push('\n');
        }
    }
    text
}

fn random_set(rng: &mut Rng, keys: &[(String, toml::Value)]) -> String {
    let (key, default) = rng.pick(keys);
    let mut key = key.clone();
    match rng.below(12) {
        0 => key.push_str(".x"),
        1 => key = key.split('.').next().unwrap().to_string(),
        2 => key = format!(".{key}"),
        _ => {}
    }
    let mut set = format!("{key}={}", random_value(rng, default));
    if rng.chance(25) {
        let mut bytes = set.into_bytes();
        mutate_bytes(rng, &mut bytes, &[b"=", b".", b"train", b"model.n_head", b"\"", b"\n"]);
        set = String::from_utf8_lossy(&bytes).into_owned();
    }
    set
}

/// The properties for one input.
fn check_one(dir: &Path, preset: Option<&str>, file: Option<&[u8]>, sets: &[String]) -> Result<(), String> {
    let path = dir.join("config.toml");
    if let Some(bytes) = file {
        std::fs::write(&path, bytes).map_err(|e| e.to_string())?;
    }
    let resolved = Config::resolve(preset, file.map(|_| path.as_path()), sets);
    let cfg = match resolved {
        Err(e) => return one_line_error(&e.to_string()),
        Ok(cfg) => cfg,
    };
    fuzzkit::note_accepted();
    cfg.validate().map_err(|e| format!("resolved but does not validate: {e}"))?;
    // What it resolved to reads back as itself.
    let back_path = dir.join("back.toml");
    std::fs::write(&back_path, cfg.to_toml()).map_err(|e| e.to_string())?;
    let back = Config::resolve(preset, Some(&back_path), &[]).map_err(|e| format!("its own TOML does not resolve: {e}"))?;
    if back != cfg {
        return Err(format!("TOML round trip changed the config:\n{cfg:?}\n{back:?}"));
    }
    // Communicator options from it build without panicking (env overrides may refuse).
    if let Err(e) = fabbrica_train::comm_options(&cfg) {
        one_line_error(&e.to_string())?;
    }
    Ok(())
}

fn parts_of(preset: Option<&str>, file: Option<&[u8]>, sets: &[String]) -> Vec<Part> {
    let mut parts = Vec::new();
    if let Some(p) = preset {
        parts.push(("preset.txt".to_string(), p.as_bytes().to_vec()));
    }
    if let Some(f) = file {
        parts.push(("config.toml".to_string(), f.to_vec()));
    }
    if !sets.is_empty() {
        parts.push(("sets.json".to_string(), serde_json::to_vec(sets).unwrap()));
    }
    parts
}

#[test]
fn config_parser_never_panics_and_errors_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let keys = schema_keys();
    let mut fuzz = Fuzz::new("config", 1500, &workspace());

    // Regression cases first.
    let regressions = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_regressions/config");
    fuzz.replay(&regressions, |fuzz, parts| {
        let preset = part(&parts, "preset.txt").map(|b| String::from_utf8_lossy(b).into_owned());
        let file = part(&parts, "config.toml").map(<[u8]>::to_vec);
        let sets: Vec<String> = part(&parts, "sets.json").map(|b| serde_json::from_slice(b).unwrap()).unwrap_or_default();
        fuzz.check(&parts, || check_one(dir.path(), preset.as_deref(), file.as_deref(), &sets));
    });

    for (preset, file, sets) in REGRESSIONS {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let file = file.map(str::as_bytes);
        let parts = parts_of(*preset, file, &sets);
        fuzz.regression(&parts, || check_one(dir.path(), *preset, file, &sets));
    }

    // Seeds for file mutation: every preset's full config, and small documents.
    let mut seeds: Vec<Vec<u8>> = PRESET_NAMES.iter().map(|p| Config::preset(p).unwrap().to_toml().into_bytes()).collect();
    seeds.push(b"[train]\nlr = 1e-3\nmax_steps = 7\n[model]\nn_layer = 2\n".to_vec());
    seeds.push(b"[comm]\ntimeout_s = 600\n[parallel]\nbucket_mb = 25\n".to_vec());
    let dict: Vec<Vec<u8>> = keys
        .iter()
        .flat_map(|(k, _)| {
            let (s, n) = k.split_once('.').unwrap();
            [format!("[{s}]\n").into_bytes(), format!("{n} = ").into_bytes()]
        })
        .chain(["1e30", "-1", "nan", "inf", "\"\"", "[[x]]", "= =", "9223372036854775807", "0"].iter().map(|s| s.as_bytes().to_vec()))
        .collect();
    let dict: Vec<&[u8]> = dict.iter().map(Vec::as_slice).collect();

    while fuzz.more() {
        let rng = &mut fuzz.rng;
        let preset: Option<String> = match rng.below(10) {
            0 => None,
            1 => Some(rng.pick(&["gpt9", "", "tiny\n", "GPT2-124M", "tiny "]).to_string()),
            _ => Some(rng.pick(&PRESET_NAMES).to_string()),
        };
        let file: Option<Vec<u8>> = match rng.below(3) {
            0 => None,
            1 => Some(random_toml(rng, &keys).into_bytes()),
            _ => {
                let mut bytes = rng.pick(&seeds).clone();
                mutate_bytes(rng, &mut bytes, &dict);
                Some(bytes)
            }
        };
        let sets: Vec<String> = (0..rng.below(4)).map(|_| random_set(rng, &keys)).collect();
        let parts = parts_of(preset.as_deref(), file.as_deref(), &sets);
        fuzz.check(&parts, || check_one(dir.path(), preset.as_deref(), file.as_deref(), &sets));
    }
    fuzz.finish();
}

/// Inputs that once failed, replayed on every run: (preset, config file, --set strings).
const REGRESSIONS: &[(Option<&str>, Option<&str>, &[&str])] = &[
    // Validated, then panicked converting to a Duration in comm_options.
    (Some("tiny"), None, &["comm.timeout_s=1e30"]),
    (Some("tiny"), Some("[comm]\ntimeout_s = 1e300\n"), &[]),
    // Values, keys and sets with line breaks made multi-line errors.
    (Some("tiny"), None, &["run.device=tp\nu"]),
    (Some("tiny"), None, &["train.l\nr=1"]),
    (Some("tiny"), None, &["no\nequals"]),
    (Some("tiny\n"), None, &[]),
    (Some("tiny"), Some("[train]\n\"a\\nb\" = 1\n"), &[]),
    (Some("tiny"), Some("[run]\ndevice = \"a\\nb\"\n"), &[]),
    // A value with a second TOML line silently dropped the rest.
    (Some("tiny"), None, &["train.lr=1\nmax_steps = 5"]),
    // Unbounded numbers that overflow downstream (thread counts, products, u64 + 1).
    (Some("tiny"), None, &["run.threads=9223372036854775807"]),
    (Some("tiny"), None, &["train.batch_size=1048576", "train.grad_accum=1048576", "model.block_size=1048576"]),
    (Some("tiny"), None, &["train.warmup_steps=9223372036854775807"]),
    (Some("gpt2-124m"), None, &["parallel.bucket_mb=1e300"]),
    (Some("tiny"), Some("[parallel]\nzero = 300\n"), &[]),
];
