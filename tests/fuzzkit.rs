//! A tiny mutation-fuzzing harness shared by the crates' `tests/fuzz*.rs` (included with
//! `#[path = ...] mod fuzzkit;`): a seeded PRNG, byte/text mutators, a run budget from the
//! environment, and a failure log. Stable toolchain only, no dependencies.
//!
//! Budget (environment):
//! * `FABBRICA_FUZZ_SECONDS=S`: mutate for about S seconds per target (`scripts/fuzz.sh`);
//! * `FABBRICA_FUZZ_ITERS=N`: exactly N mutations per target;
//! * neither: the target's small default, sized for CI (well under a second or two each).
//! * `FABBRICA_FUZZ_SEED=X`: the PRNG seed (default fixed, so CI runs are deterministic; with a
//!   time budget and no seed, one is drawn from the clock and printed).
//! * `FABBRICA_FUZZ_OUT=DIR`: where failing inputs are written (default `target/fuzz-failures`).
//!
//! A failing input (a panic, or a broken property such as a multi-line error) is written to
//! `DIR/<target>/<seed>-<iteration>/`, one file per part, ready to be copied into the crate's
//! `tests/fuzz_regressions/<target>/` directory, whose cases every run replays first.
#![allow(dead_code)]

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// SplitMix64: tiny, seedable, good enough to drive mutations.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// An "interesting" integer: boundaries, powers of two, small values, random.
    pub fn interesting_int(&mut self) -> i128 {
        const EDGES: [i128; 20] = [
            0,
            1,
            -1,
            2,
            7,
            255,
            256,
            65535,
            65536,
            65537,
            i32::MAX as i128,
            i32::MIN as i128,
            u32::MAX as i128,
            i64::MAX as i128,
            i64::MIN as i128,
            u64::MAX as i128,
            1 << 40,
            1_000_000_000_000,
            1_000_000_000_001,
            -9_223_372_036_854_775_807,
        ];
        match self.below(4) {
            0 => *self.pick(&EDGES),
            1 => self.below(100) as i128,
            2 => (1i128 << self.below(70)) + self.below(3) as i128 - 1,
            _ => self.next_u64() as i128 - (1i128 << 63),
        }
    }

    /// An "interesting" float text (TOML/JSON spellings included).
    pub fn interesting_float(&mut self) -> String {
        const EDGES: [&str; 16] =
            ["0.0", "-0.0", "1e30", "1e308", "1e309", "-1e30", "5e-324", "1e-9", "0.5", "1.0", "0.999999", "inf", "-inf", "nan", "604800.0", "0.001"];
        if self.chance(60) {
            self.pick(&EDGES).to_string()
        } else {
            format!("{:e}", f64::from_bits(self.next_u64()))
        }
    }
}

/// Text fragments that tend to break parsers.
pub const TEXT_TOKENS: [&str; 32] = [
    "\n",
    "\r\n",
    "\"",
    "'",
    "=",
    "[",
    "]",
    "{",
    "}",
    ",",
    ".",
    ":",
    "#",
    "\\",
    "\\u0000",
    "\\n",
    "\0",
    "\u{7f}",
    "é",
    "\u{2028}",
    "\u{fffd}",
    "true",
    "false",
    "null",
    "-",
    "+",
    "e",
    "0",
    "9999999999999999999999",
    "-1",
    " ",
    "\t",
];

/// Mutates `data` in place with 1..=4 random edits: bit flips, byte sets, inserts, deletes,
/// duplicated or swapped chunks, truncation, and splices of `dict` words.
pub fn mutate_bytes(rng: &mut Rng, data: &mut Vec<u8>, dict: &[&[u8]]) {
    let edits = 1 + rng.below(4);
    for _ in 0..edits {
        let len = data.len();
        match rng.below(10) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = *rng.pick(&[0u8, 0xff, 0x7f, 0x80, b'0', b'9', b'"', b'{', b'}', b'\n', b'-', b'e']);
            }
            2 => {
                let i = rng.below(len + 1);
                data.insert(i, rng.next_u64() as u8);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(16));
                data.drain(i..i + n);
            }
            4 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                let chunk = data[i..i + n].to_vec();
                let at = rng.below(data.len() + 1);
                data.splice(at..at, chunk);
            }
            5 if len > 0 => data.truncate(rng.below(len)),
            6 | 7 if !dict.is_empty() => {
                let word = *rng.pick(dict);
                let at = rng.below(len + 1);
                if rng.chance(50) || len == 0 {
                    data.splice(at..at, word.iter().copied());
                } else {
                    // Overwrite in place.
                    let end = (at + word.len()).min(len);
                    data.splice(at..end, word.iter().copied());
                }
            }
            8 if len > 1 => {
                let (i, j) = (rng.below(len), rng.below(len));
                data.swap(i, j);
            }
            _ => {
                let i = rng.below(len + 1);
                let word = rng.pick(&TEXT_TOKENS).as_bytes();
                data.splice(i..i, word.iter().copied());
            }
        }
    }
}

/// One input part: a file name and its bytes (written out when the input fails).
pub type Part = (String, Vec<u8>);

/// A fuzz target's run: budget, PRNG, counts and saved failures.
pub struct Fuzz {
    pub name: String,
    pub seed: u64,
    pub rng: Rng,
    pub iters: u64,
    pub replayed: u64,
    max_iters: Option<u64>,
    deadline: Option<Instant>,
    failures: Vec<(String, PathBuf)>,
    out: PathBuf,
    /// The regression case being replayed, if any (names failures instead of the iteration).
    case: Option<String>,
}

fn env_num(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = if let Some(hex) = v.strip_prefix("0x") { u64::from_str_radix(hex, 16).ok() } else { v.parse().ok() };
    Some(parsed.unwrap_or_else(|| panic!("{name}={v:?} is not a number")))
}

impl Fuzz {
    /// `default_iters`: mutations when neither FABBRICA_FUZZ_ITERS nor FABBRICA_FUZZ_SECONDS is set.
    /// `workspace`: the workspace root (for the default failure directory).
    pub fn new(name: &str, default_iters: u64, workspace: &Path) -> Fuzz {
        let seconds = env_num("FABBRICA_FUZZ_SECONDS");
        let iters = env_num("FABBRICA_FUZZ_ITERS");
        let seed = env_num("FABBRICA_FUZZ_SEED").unwrap_or_else(|| {
            if seconds.is_some() {
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
            } else {
                0x0fab_b1ca_5eed
            }
        });
        let out = std::env::var_os("FABBRICA_FUZZ_OUT").map(PathBuf::from).unwrap_or_else(|| workspace.join("target/fuzz-failures"));
        let (max_iters, deadline) = match (iters, seconds) {
            (Some(n), _) => (Some(n), None),
            (None, Some(s)) => (None, Some(Instant::now() + Duration::from_secs(s))),
            (None, None) => (Some(default_iters), None),
        };
        // Seed mixed with the target name: the targets of one run draw different streams.
        let salt = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        Fuzz {
            name: name.into(),
            seed,
            rng: Rng::new(seed ^ salt),
            iters: 0,
            replayed: 0,
            max_iters,
            deadline,
            failures: Vec::new(),
            out,
            case: None,
        }
    }

    /// Whether to run another mutation.
    pub fn more(&mut self) -> bool {
        let go = match (self.max_iters, self.deadline) {
            (Some(n), _) => self.iters < n,
            (None, Some(d)) => Instant::now() < d,
            (None, None) => false,
        };
        if go {
            self.iters += 1;
        }
        go
    }

    /// Runs `f` on one input; a panic or an `Err` (a broken property) is a failure, and the
    /// input `parts` are written to the failure directory.
    pub fn check(&mut self, parts: &[Part], f: impl FnOnce() -> Result<(), String>) {
        let outcome = catch_unwind(AssertUnwindSafe(f));
        let why = match outcome {
            Ok(Ok(())) => return,
            Ok(Err(why)) => why,
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "non-string panic".into());
                format!("panic: {msg}")
            }
        };
        let (label, id) = match &self.case {
            Some(case) => (format!("regression case {case}"), format!("regression-{case}")),
            None => (format!("iteration {}", self.iters), format!("{:x}-{}", self.seed, self.iters)),
        };
        let dir = self.out.join(&self.name).join(id);
        let saved = std::fs::create_dir_all(&dir).and_then(|()| parts.iter().try_for_each(|(name, bytes)| std::fs::write(dir.join(name), bytes)));
        if let Err(e) = saved {
            eprintln!("fuzz {}: cannot save the failing input to {}: {e}", self.name, dir.display());
        }
        eprintln!("fuzz {}: FAILURE at {label}: {why}\n  input saved in {}", self.name, dir.display());
        self.failures.push((why, dir));
    }

    /// Checks one regression case (counted as replayed, not as a mutation).
    pub fn regression(&mut self, parts: &[Part], f: impl FnOnce() -> Result<(), String>) {
        self.replayed += 1;
        self.case = Some(format!("#{}", self.replayed));
        self.check(parts, f);
        self.case = None;
    }

    /// Replays every case directory under `dir` (each a set of files named as `parts`) with `run`.
    pub fn replay(&mut self, dir: &Path, mut run: impl FnMut(&mut Fuzz, Vec<Part>)) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        let mut cases: Vec<PathBuf> = entries.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()).collect();
        cases.sort();
        for case in cases {
            let mut parts: Vec<Part> = std::fs::read_dir(&case)
                .unwrap()
                .filter_map(|e| e.ok())
                .filter(|e| e.path().is_file())
                .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
                .collect();
            parts.sort();
            self.replayed += 1;
            self.case = Some(case.file_name().unwrap_or_default().to_string_lossy().into_owned());
            run(self, parts);
            self.case = None;
        }
    }

    /// Prints `fuzz <name>: N iterations (A inputs accepted), R regression cases, F failures` and fails the test if
    /// anything failed.
    pub fn finish(self) {
        eprintln!(
            "fuzz {}: {} iterations ({} inputs accepted), {} regression cases, {} failures (seed {:#x})",
            self.name,
            self.iters,
            ACCEPTED.load(Ordering::Relaxed),
            self.replayed,
            self.failures.len(),
            self.seed
        );
        if !self.failures.is_empty() {
            let list: Vec<String> = self.failures.iter().map(|(why, dir)| format!("{why} [{}]", dir.display())).collect();
            panic!("fuzz {}: {} failing inputs:\n{}", self.name, self.failures.len(), list.join("\n"));
        }
    }
}

static ACCEPTED: AtomicU64 = AtomicU64::new(0);

/// Counts an input the code under test accepted (reported by [`Fuzz::finish`], to show how much
/// of the fuzzing got past the first check).
pub fn note_accepted() {
    ACCEPTED.fetch_add(1, Ordering::Relaxed);
}

/// The one-line error contract: non-empty, no line break, no Debug dump of a struct.
pub fn one_line_error(msg: &str) -> Result<(), String> {
    if msg.trim().is_empty() {
        return Err("empty error message".into());
    }
    if msg.contains('\n') || msg.contains('\r') {
        return Err(format!("multi-line error message: {msg:?}"));
    }
    Ok(())
}

/// The part named `name`, if present.
pub fn part<'a>(parts: &'a [Part], name: &str) -> Option<&'a [u8]> {
    parts.iter().find(|(n, _)| n == name).map(|(_, b)| b.as_slice())
}
