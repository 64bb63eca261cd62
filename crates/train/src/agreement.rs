//! Ranks must agree before the first collective that depends on their setup: every rank of a job
//! has to be launched with the same configuration and the same data, or the collectives that
//! follow (parameter broadcast, gradient buckets, evaluation) are called with different sizes and
//! corrupt memory or hang. A mistyped `--set` on one rank of an MPMD launch
//! (`mpirun -np 1 fabbrica ... : -np 1 fabbrica ...`) or a data file that differs between nodes
//! is such a mistake.
//!
//! [`fingerprint`] flattens the resolved configuration and facts about the loaded data into an
//! ordered list of `(key, value)` pairs; [`check_agreement`] compares that list across the ranks
//! with a few fixed-size all-gathers (whose sizes never depend on what is compared), and a
//! difference stops the job with one line naming the first differing key, which ranks have
//! which value, and what to do.
//!
//! Keys that may legitimately differ between ranks are exempt; they are listed, with the reason,
//! in [`RANK_LOCAL_KEYS`].

use fabbrica_comm::Communicator;
use fabbrica_data::{Dataset, Meta, TokenSource};
use tch::{Device, Kind, Tensor};

use crate::config::Config;
use crate::error::TrainError;
use crate::trainer::Setup;

/// Configuration keys that are allowed to differ between ranks (each rank uses its own value):
///
/// * `run.threads`: CPU threads for libtorch, a property of the node the rank runs on.
/// * `run.out_dir`, `run.resume_from`, `data.path`: paths, which may differ between nodes (a
///   scratch directory, a local copy of the data set). What the paths lead to is compared
///   instead: the data's content through the `data.*` facts of [`data_entries`], and the
///   checkpoint a rank resumes from through the step passed in `extra` (see [`fingerprint`]).
/// * `comm.debug`: a diagnostic switch that the environment variable `FABBRICA_COMM_DEBUG`
///   overrides per process, so the config value is not what runs. The effective switch must be
///   the same on every rank (debug mode adds a check collective before each collective), and
///   that has to be settled by the communication layer when the world is created: a rank with
///   debug on and one without meet in different collectives before this check can run.
/// * `comm.timeout_s`: each rank's own watchdog limit (also overridden per process by
///   `FABBRICA_COMM_TIMEOUT`); a shorter limit on one rank only makes that rank report first.
/// * `run.sample_tokens`: only rank 0 samples text at the end.
///
/// Everything else must be equal on every rank, including keys that only one rank reads (such
/// as logging intervals): a difference there is still a sign that the ranks were not launched as
/// one job, and saying so costs nothing.
pub const RANK_LOCAL_KEYS: &[&str] =
    &["run.threads", "run.out_dir", "run.resume_from", "data.path", "data.tokenizer", "comm.debug", "comm.timeout_s", "run.sample_tokens"];

/// Bytes of a key and of a value that travel when a difference is reported (longer ones are
/// truncated; the comparison itself hashes the whole value).
const FIELD_BYTES: usize = 96;
/// Longest value shown in the message before it is shortened with `...`.
const SHOWN_CHARS: usize = 40;
/// Tokens hashed per split for `data.token_sample_hash`: a few windows spread over the stream,
/// enough to tell two different files with the same vocabulary and length apart without reading
/// a large data set.
const SAMPLE_WINDOWS: usize = 16;
const SAMPLE_WINDOW_LEN: usize = 256;

/// The `(key, value)` pairs every rank must agree on, in a fixed order: the loaded data's facts,
/// then the resolved configuration (model.vocab_size resolved from the data), then the resolved
/// device, then `extra` (for example `("resume.step", "1200")`: the step of the checkpoint this
/// rank resumes from, so ranks never resume from different steps).
pub fn fingerprint(cfg: &Config, data: &Dataset, device: Device, bf16: bool, extra: &[(&str, String)]) -> Vec<(String, String)> {
    let mut v = data_entries(data);
    v.extend(config_entries(cfg));
    let dev = match device {
        Device::Cpu => "cpu",
        Device::Cuda(_) => "cuda",
        _ => "other",
    };
    v.push(("resolved.device".into(), dev.into()));
    v.push(("resolved.bf16_autocast".into(), bf16.to_string()));
    v.extend(extra.iter().map(|(k, val)| (k.to_string(), val.clone())));
    v
}

/// [`check_agreement`] on the [`fingerprint`] of a finished setup: what `train_in` calls right
/// after the preflight, before the first collective whose sizes depend on the setup.
pub fn check_setup(comm: &dyn Communicator, s: &Setup, extra: &[(&str, String)]) -> Result<(), TrainError> {
    if comm.size() == 1 {
        return Ok(());
    }
    check_agreement(comm, &fingerprint(&s.cfg, &s.data, s.device, s.bf16, extra))
}

/// The configuration flattened to dotted keys (`train.lr` → `0.001`), without [`RANK_LOCAL_KEYS`].
pub fn config_entries(cfg: &Config) -> Vec<(String, String)> {
    let value = toml::Value::try_from(cfg).expect("config serializes");
    let mut out = Vec::new();
    flatten("", &value, &mut out);
    out.retain(|(k, _)| !RANK_LOCAL_KEYS.contains(&k.as_str()));
    out
}

fn flatten(prefix: &str, v: &toml::Value, out: &mut Vec<(String, String)>) {
    match v {
        toml::Value::Table(t) => {
            for (k, x) in t {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, x, out);
            }
        }
        toml::Value::String(s) => out.push((prefix.to_string(), s.clone())),
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

/// Facts about the loaded data that every rank must share: tokenizer, vocabulary (size and a
/// hash of its description, as meta.json would write it), token counts per split, and a hash of
/// a sample of the tokens.
pub fn data_entries(data: &Dataset) -> Vec<(String, String)> {
    // By content, not by where the file is: ranks may read node-local copies (`data.path` and
    // `data.tokenizer` are rank-local); the SHA-256 stays.
    let mut meta = Meta::for_tokenizer(&data.tokenizer);
    meta.tokenizer_file = meta.tokenizer_file.as_ref().map(|_| String::new());
    let meta_json = serde_json::to_string(&meta).unwrap_or_default();
    let mut sample = Fnv::new();
    for src in [&data.train, &data.val] {
        hash_sample(src, &mut sample);
    }
    vec![
        ("data.loaded_tokenizer".into(), data.tokenizer.kind().as_str().into()),
        ("data.vocab_size".into(), data.tokenizer.vocab_size().to_string()),
        ("data.vocab_hash".into(), format!("{:016x}", fnv(meta_json.as_bytes()))),
        ("data.train_tokens".into(), data.train.len().to_string()),
        ("data.val_tokens".into(), data.val.len().to_string()),
        ("data.token_sample_hash".into(), format!("{:016x}", sample.finish())),
    ]
}

fn hash_sample(src: &TokenSource, h: &mut Fnv) {
    let n = src.len();
    h.write(&(n as u64).to_le_bytes());
    if n == 0 {
        return;
    }
    let len = SAMPLE_WINDOW_LEN.min(n);
    for w in 0..SAMPLE_WINDOWS {
        // Window starts spread evenly over [0, n - len], both ends included.
        let start = if SAMPLE_WINDOWS > 1 { (n - len) * w / (SAMPLE_WINDOWS - 1) } else { 0 };
        for i in start..start + len {
            h.write(&src.get(i).to_le_bytes());
        }
    }
}

/// 64-bit FNV-1a: the same on every rank and build (std's hasher promises neither).
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

fn fnv(bytes: &[u8]) -> u64 {
    let mut h = Fnv::new();
    h.write(bytes);
    h.finish()
}

/// The hash compared for one entry: key and value, never 0 (0 pads shorter lists).
pub fn entry_hash(key: &str, value: &str) -> i64 {
    let mut h = Fnv::new();
    h.write(key.as_bytes());
    h.write(&[0]);
    h.write(value.as_bytes());
    match h.finish() as i64 {
        0 => 1,
        x => x,
    }
}

/// Collective over `comm`: `Ok` when every rank has the same `entries`; otherwise rank 0 returns
/// [`TrainError::Disagreement`] naming the first differing key and every other rank returns
/// [`TrainError::Elsewhere`], so the job stops on every rank and says why once.
///
/// Three all-gathers whose sizes are the same on every rank whatever the entries are: the
/// number of entries, one hash per entry (padded to the longest list), and, only when something
/// differs, the first differing key and value in fixed-size fields.
pub fn check_agreement(comm: &dyn Communicator, entries: &[(String, String)]) -> Result<(), TrainError> {
    let n = comm.size();
    if n == 1 {
        return Ok(());
    }
    let counts = gather_i64(comm, &[entries.len() as i64], 1)?;
    let longest = counts.iter().copied().max().unwrap_or(0).max(0) as usize;
    let mut mine = vec![0i64; longest];
    for (slot, (k, v)) in mine.iter_mut().zip(entries) {
        *slot = entry_hash(k, v);
    }
    let hashes = if longest == 0 { Vec::new() } else { gather_i64(comm, &mine, longest)? };
    let Some(index) = first_difference(&hashes, n, longest) else { return Ok(()) };

    let (key, value) = entries.get(index).map(|(k, v)| (k.as_str(), v.as_str())).unwrap_or(("", ""));
    let mut fields = encode_field(key);
    fields.extend(encode_field(value));
    let words = fields.len();
    let all = gather_i64(comm, &fields, words)?;
    let per_rank: Vec<(String, String)> = all.chunks(words).map(|c| (decode_field(&c[..words / 2]), decode_field(&c[words / 2..]))).collect();
    let column: Vec<i64> = (0..n).map(|r| hashes[r * longest + index]).collect();
    let message = describe(&per_rank, &column);
    if comm.rank() == 0 {
        Err(TrainError::Disagreement(message))
    } else {
        Err(TrainError::Elsewhere { rank: 0, user: true })
    }
}

fn gather_i64(comm: &dyn Communicator, mine: &[i64], per_rank: usize) -> Result<Vec<i64>, TrainError> {
    let (all, input) = tch::no_grad(|| -> Result<(Tensor, Tensor), tch::TchError> {
        Ok((Tensor::f_zeros([(per_rank * comm.size()) as i64], (Kind::Int64, Device::Cpu))?, Tensor::f_from_slice(mine)?))
    })?;
    comm.all_gather(&all, &input).map_err(TrainError::from)?;
    Ok(Vec::<i64>::try_from(&all)?)
}

/// The first entry index at which the ranks' hashes (`ranks` rows of `per_rank`) differ.
pub fn first_difference(hashes: &[i64], ranks: usize, per_rank: usize) -> Option<usize> {
    (0..per_rank).find(|&i| (1..ranks).any(|r| hashes[r * per_rank + i] != hashes[i]))
}

/// `s` as [`FIELD_BYTES`] bytes (UTF-8, cut at a character boundary, zero-padded) packed into
/// little-endian i64 words.
fn encode_field(s: &str) -> Vec<i64> {
    let mut end = s.len().min(FIELD_BYTES);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let mut bytes = [0u8; FIELD_BYTES];
    bytes[..end].copy_from_slice(&s.as_bytes()[..end]);
    bytes.chunks(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()
}

fn decode_field(words: &[i64]) -> String {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// One line: the first differing key and which ranks have which value. `per_rank[r]` is rank
/// r's (key, value) at that index (empty key: the rank has no entry there); `hashes[r]` its
/// full hash, so values that only differ beyond the truncated bytes are still told apart.
pub fn describe(per_rank: &[(String, String)], hashes: &[i64]) -> String {
    const TAIL: &str = "(every rank must be launched with the same configuration and data)";
    let keys_differ = per_rank.iter().any(|(k, _)| *k != per_rank[0].0);
    if keys_differ {
        let groups = group(per_rank.iter().map(|(k, _)| k.clone()).collect(), per_rank.iter().map(|(k, _)| fnv(k.as_bytes()) as i64).collect());
        let parts: Vec<String> = groups
            .iter()
            .map(|(ranks, k)| {
                format!("{} {}", ranks_phrase(ranks), if k.is_empty() { "no more keys".to_string() } else { format!("`{}`", shorten(k)) })
            })
            .collect();
        return format!("ranks disagree on the configuration keys themselves: {} (every rank must run the same fabbrica build)", parts.join(", "));
    }
    let key = &per_rank[0].0;
    let groups = group(per_rank.iter().map(|(_, v)| v.clone()).collect(), hashes.to_vec());
    let shown = 4;
    let mut parts: Vec<String> = groups.iter().take(shown).map(|(ranks, v)| format!("{} {}", ranks_phrase(ranks), shorten(v))).collect();
    if groups.len() > shown {
        parts.push(format!("and {} other values", groups.len() - shown));
    }
    format!("ranks disagree on {key}: {} {TAIL}", parts.join(", "))
}

/// Ranks grouped by hash, in order of their lowest rank, each with the value shown for it.
fn group(values: Vec<String>, hashes: Vec<i64>) -> Vec<(Vec<usize>, String)> {
    let mut groups: Vec<(i64, Vec<usize>, String)> = Vec::new();
    for (r, (v, h)) in values.into_iter().zip(hashes).enumerate() {
        match groups.iter_mut().find(|g| g.0 == h) {
            Some(g) => g.1.push(r),
            None => groups.push((h, vec![r], v)),
        }
    }
    groups.into_iter().map(|(_, r, v)| (r, v)).collect()
}

/// `rank 3 has`, `ranks 0-2, 5 have`.
fn ranks_phrase(ranks: &[usize]) -> String {
    let mut spans: Vec<String> = Vec::new();
    let mut i = 0;
    while i < ranks.len() {
        let mut j = i;
        while j + 1 < ranks.len() && ranks[j + 1] == ranks[j] + 1 {
            j += 1;
        }
        spans.push(if j > i { format!("{}-{}", ranks[i], ranks[j]) } else { ranks[i].to_string() });
        i = j + 1;
    }
    let many = ranks.len() > 1;
    format!("{} {} {}", if many { "ranks" } else { "rank" }, spans.join(", "), if many { "have" } else { "has" })
}

fn shorten(v: &str) -> String {
    let v = if v.is_empty() { "\"\"" } else { v };
    if v.chars().count() <= SHOWN_CHARS {
        v.to_string()
    } else {
        format!("{}...", v.chars().take(SHOWN_CHARS - 3).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(sets: &[&str]) -> Config {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Config::resolve(Some("tiny"), None, &sets).unwrap()
    }

    fn get<'a>(e: &'a [(String, String)], key: &str) -> Option<&'a str> {
        e.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    #[test]
    fn config_flattens_to_dotted_keys_without_the_rank_local_ones() {
        let e = config_entries(&cfg(&["train.lr=0.001", "model.n_layer=3", "run.threads=7", "data.path=/x/y.txt"]));
        assert_eq!(get(&e, "train.lr"), Some("0.001"));
        assert_eq!(get(&e, "model.n_layer"), Some("3"));
        assert_eq!(get(&e, "train.dtype"), Some("auto"), "strings without quotes");
        assert_eq!(get(&e, "parallel.overlap"), Some("true"));
        for k in RANK_LOCAL_KEYS {
            assert_eq!(get(&e, k), None, "{k} is rank-local");
        }
        // Every other key is there: as many as the schema has, less the exempt ones.
        let mut all = Vec::new();
        flatten("", &toml::Value::try_from(cfg(&[])).unwrap(), &mut all);
        assert_eq!(e.len(), all.len() - RANK_LOCAL_KEYS.len());
        for k in RANK_LOCAL_KEYS {
            assert!(all.iter().any(|(x, _)| x == k), "{k} is not a config key");
        }
    }

    #[test]
    fn rank_local_keys_do_not_change_the_fingerprint_but_others_do() {
        let a = config_entries(&cfg(&[]));
        let b = config_entries(&cfg(&["run.threads=3", "run.out_dir=/elsewhere", "data.path=/other/copy.txt", "comm.debug=true"]));
        assert_eq!(a, b);
        let c = config_entries(&cfg(&["train.lr=0.003"]));
        let i = a.iter().zip(&c).position(|(x, y)| x != y).unwrap();
        assert_eq!(a[i].0, "train.lr");
    }

    fn text_dataset(text: &str) -> Dataset {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.txt");
        std::fs::write(&p, text).unwrap();
        fabbrica_data::load(&p, &fabbrica_data::TokenizerSpec::Char, 8, 0.1).unwrap()
    }

    #[test]
    fn data_facts_tell_vocabularies_and_contents_apart() {
        let base = "the quick brown fox jumps over the lazy dog. ".repeat(20);
        let a = data_entries(&text_dataset(&base));
        assert_eq!(a, data_entries(&text_dataset(&base)), "same data, same facts");
        assert_eq!(get(&a, "data.loaded_tokenizer"), Some("char"));
        assert_eq!(
            get(&a, "data.train_tokens").unwrap().parse::<usize>().unwrap() + get(&a, "data.val_tokens").unwrap().parse::<usize>().unwrap(),
            base.len()
        );
        // A different vocabulary.
        let b = data_entries(&text_dataset(&base.replace('q', "Q")));
        assert_ne!(get(&a, "data.vocab_hash"), get(&b, "data.vocab_hash"));
        // Same vocabulary and length, different text: only the sample hash can tell.
        let swapped = base.replacen("the", "eht", 1);
        let c = data_entries(&text_dataset(&swapped));
        assert_eq!(get(&a, "data.vocab_hash"), get(&c, "data.vocab_hash"));
        assert_eq!(get(&a, "data.train_tokens"), get(&c, "data.train_tokens"));
        assert_ne!(get(&a, "data.token_sample_hash"), get(&c, "data.token_sample_hash"));
    }

    #[test]
    fn first_difference_is_found_at_the_same_index_from_any_rank() {
        // 3 ranks x 4 entries; rank 2 differs at index 1 and 3, rank 1 at index 3.
        let h = [1, 2, 3, 4, 1, 2, 3, 5, 1, 9, 3, 6];
        assert_eq!(first_difference(&h, 3, 4), Some(1));
        assert_eq!(first_difference(&[1, 2, 1, 2], 2, 2), None);
        // A shorter list is padded with 0, which no entry hashes to.
        assert_eq!(first_difference(&[7, 8, 7, 0], 2, 2), Some(1));
        assert_ne!(entry_hash("", ""), 0);
    }

    #[test]
    fn fields_round_trip_and_truncate_at_character_boundaries() {
        assert_eq!(decode_field(&encode_field("train.lr")), "train.lr");
        assert_eq!(encode_field("x").len() * 8, FIELD_BYTES);
        let long = "é".repeat(100); // 200 bytes
        let back = decode_field(&encode_field(&long));
        assert!(back.len() <= FIELD_BYTES && long.starts_with(&back) && !back.is_empty());
    }

    #[test]
    fn the_message_names_the_key_and_which_ranks_have_which_value() {
        let v = |s: &str| ("train.lr".to_string(), s.to_string());
        let m = describe(&[v("0.001"), v("0.002")], &[1, 2]);
        assert_eq!(
            m,
            "ranks disagree on train.lr: rank 0 has 0.001, rank 1 has 0.002 (every rank must be launched with the same configuration and data)"
        );
        let m = describe(&[v("a"), v("a"), v("a"), v("b"), v("a")], &[1, 1, 1, 2, 1]);
        assert!(m.contains("ranks 0-2, 4 have a, rank 3 has b"), "{m}");
        let long = "x".repeat(90);
        let m = describe(&[v(&long), v("y")], &[1, 2]);
        assert!(m.contains("rank 0 has xxx") && m.contains("...") && !m.contains(&long), "{m}");
        let m = describe(&[("a.b".into(), "1".into()), ("".into(), "".into())], &[1, 0]);
        assert!(m.contains("keys") && m.contains("`a.b`") && m.contains("no more keys"), "{m}");
        assert!(!m.contains('\n'));
    }
}
