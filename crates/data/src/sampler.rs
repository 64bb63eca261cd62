//! Stateless, counter-based batch sampling.
//!
//! The window of sample `i` at step `s` is a pure function of
//! `(seed, split, s, i)`. So:
//!
//! * Resumption needs no sampler state: restarting at step `s` reproduces
//!   exactly the batches an uninterrupted run would have drawn.
//! * Data parallelism needs no coordination: a global batch at step `s` is
//!   samples `0..G` (G = ranks * accum * batch_size). Rank `r` at micro-step
//!   `m` reads `batch_size` samples starting at `(r * accum + m) * batch_size`,
//!   so N ranks together see exactly the samples a 1-rank run with N×
//!   gradient accumulation sees, and the averaged gradient is the same.

use std::fmt;

use crate::tokens::TokenSource;

/// Which split a batch is drawn from (also salts the hash, so train and val
/// draws are independent streams).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Val,
}

impl Split {
    /// `"train"` or `"val"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
        }
    }

    /// Arbitrary distinct constants mixed into the hash.
    fn salt(self) -> u64 {
        match self {
            Split::Train => 0x7472_6169_6e00_0001, // "train"
            Split::Val => 0x7661_6c00_0000_0002,   // "val"
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// SplitMix64 finalizer (Steele et al.): a bijection on u64 with good
/// avalanche, so distinct inputs give distinct, well-spread outputs. The one implementation:
/// batches, per-step seeds and per-parameter init seeds all derive from it.
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Draws training windows from a seed; holds no other state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sampler {
    pub seed: u64,
}

impl Sampler {
    pub fn new(seed: u64) -> Sampler {
        Sampler { seed }
    }

    /// 64-bit hash of `(seed, split, step, sample)`. Each stage is
    /// `splitmix64(previous ^ input)`, a bijection in `input` for fixed
    /// previous stages, so e.g. different samples of one step never collide
    /// before reduction.
    fn hash(&self, split: Split, step: u64, sample: u64) -> u64 {
        let h = splitmix64(self.seed);
        let h = splitmix64(h ^ split.salt());
        let h = splitmix64(h ^ step);
        splitmix64(h ^ sample)
    }

    /// Start of the window for `sample` at `step`, uniform over
    /// `[0, n_tokens - block_size - 1]` inclusive: x needs `block_size`
    /// tokens and y the same shifted by one, so
    /// `offset + block_size + 1 <= n_tokens`.
    ///
    /// Reduction is `hash % range`; with a 64-bit hash and ranges far below
    /// 2^64 the modulo bias is < range / 2^64, negligible.
    ///
    /// # Panics
    /// If `n_tokens < block_size + 1` (`dataset::load` rules this out).
    pub fn window_offset(&self, split: Split, step: u64, sample: u64, n_tokens: usize, block_size: usize) -> usize {
        assert!(n_tokens > block_size, "{split} split has {n_tokens} tokens, fewer than block_size+1 = {}", block_size + 1);
        let range = (n_tokens - block_size) as u64; // number of valid offsets
        (self.hash(split, step, sample) % range) as usize
    }

    /// One micro-batch: `(x, y)`, each flattened row-major `[batch_size, block_size]`.
    /// Row `i` is sample `first_sample + i`: `x = tokens[o..o+block_size]`,
    /// `y = tokens[o+1..o+block_size+1]` with `o = window_offset(.., first_sample + i, ..)`.
    ///
    /// # Panics
    /// If `source` has fewer than `block_size + 1` tokens.
    pub fn batch(
        &self,
        source: &TokenSource,
        split: Split,
        step: u64,
        first_sample: u64,
        batch_size: usize,
        block_size: usize,
    ) -> (Vec<i64>, Vec<i64>) {
        let n = source.len();
        let mut x = vec![0i64; batch_size * block_size];
        let mut y = vec![0i64; batch_size * block_size];
        // Row i occupies [i*block_size, (i+1)*block_size) of x and y.
        let rows = x.chunks_exact_mut(block_size.max(1)).zip(y.chunks_exact_mut(block_size.max(1)));
        for (i, (xr, yr)) in rows.enumerate() {
            let o = self.window_offset(split, step, first_sample + i as u64, n, block_size);
            source.fill_window(o, xr);
            source.fill_window(o + 1, yr);
        }
        (x, y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_is_the_reference_generator() {
        // Vigna's splitmix64.c from state 0: its first three outputs are the finalizer of
        // 1, 2 and 3 steps of the golden-ratio increment, i.e. of 0, γ and 2γ here.
        const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
        assert_eq!(splitmix64(GAMMA), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(splitmix64(GAMMA.wrapping_mul(2)), 0x06C4_5D18_8009_454F);
    }

    #[test]
    fn deterministic() {
        let a = Sampler::new(42);
        let b = Sampler::new(42);
        for step in 0..50 {
            for sample in 0..8 {
                assert_eq!(a.window_offset(Split::Train, step, sample, 10_000, 64), b.window_offset(Split::Train, step, sample, 10_000, 64));
            }
        }
    }

    #[test]
    fn samples_steps_splits_seeds_differ() {
        let s = Sampler::new(1);
        let n = 1 << 30; // large range: a collision would be a real defect
        let off = |seed, split, step, sample| Sampler::new(seed).window_offset(split, step, sample, n, 256);
        let base = off(1, Split::Train, 3, 5);
        assert_ne!(base, off(1, Split::Train, 3, 6), "sample");
        assert_ne!(base, off(1, Split::Train, 4, 5), "step");
        assert_ne!(base, off(1, Split::Val, 3, 5), "split");
        assert_ne!(base, off(2, Split::Train, 3, 5), "seed");
        // Within one step, 1000 samples are (almost surely) all distinct.
        let mut v: Vec<_> = (0..1000).map(|i| s.window_offset(Split::Train, 0, i, n, 256)).collect();
        v.sort_unstable();
        v.dedup();
        assert_eq!(v.len(), 1000);
    }

    #[test]
    fn offsets_in_range_exhaustive_small() {
        let s = Sampler::new(7);
        for block_size in 0..6 {
            for n_tokens in block_size + 1..block_size + 12 {
                let max = n_tokens - block_size - 1;
                let mut seen = vec![false; max + 1];
                for step in 0..20 {
                    for sample in 0..20 {
                        let o = s.window_offset(Split::Val, step, sample, n_tokens, block_size);
                        assert!(o + block_size < n_tokens, "o={o} n={n_tokens} b={block_size}");
                        seen[o] = true;
                    }
                }
                // 400 draws over <= 12 offsets: every offset should appear (uniformity smoke test).
                assert!(seen.iter().all(|&b| b), "n={n_tokens} b={block_size}: {seen:?}");
            }
        }
        // Only one window fits: offset is always 0.
        for sample in 0..100 {
            assert_eq!(s.window_offset(Split::Train, 9, sample, 17, 16), 0);
        }
    }

    #[test]
    #[should_panic(expected = "fewer than block_size+1")]
    fn too_short_panics() {
        Sampler::new(0).window_offset(Split::Train, 0, 0, 16, 16);
    }

    #[test]
    fn batch_shapes_and_shift() {
        let tokens: Vec<u32> = (0..100).collect();
        let src = TokenSource::from(tokens);
        let (b, t) = (4, 8);
        let (x, y) = Sampler::new(3).batch(&src, Split::Train, 5, 0, b, t);
        assert_eq!((x.len(), y.len()), (b * t, b * t));
        for r in 0..b {
            let xr = &x[r * t..(r + 1) * t];
            let yr = &y[r * t..(r + 1) * t];
            // Source is 0..100, so tokens equal positions: rows are consecutive runs.
            let o = Sampler::new(3).window_offset(Split::Train, 5, r as u64, 100, t);
            assert_eq!(xr[0], o as i64);
            for j in 0..t {
                assert_eq!(xr[j], o as i64 + j as i64);
                assert_eq!(yr[j], xr[j] + 1);
            }
        }
    }

    #[test]
    fn data_parallel_equals_one_big_batch() {
        let tokens: Vec<u32> = (0..5000u32).map(|i| i * 7919 % 128_257).collect();
        let src = TokenSource::from(tokens);
        let s = Sampler::new(1234);
        let (ranks, accum, b, t) = (4usize, 3usize, 2usize, 16usize);
        for step in [0u64, 1, 77] {
            let global = ranks * accum * b;
            let (gx, gy) = s.batch(&src, Split::Train, step, 0, global, t);
            let (mut cx, mut cy) = (Vec::new(), Vec::new());
            for r in 0..ranks {
                for m in 0..accum {
                    let first = ((r * accum + m) * b) as u64;
                    let (x, y) = s.batch(&src, Split::Train, step, first, b, t);
                    cx.extend(x);
                    cy.extend(y);
                }
            }
            assert_eq!(cx, gx);
            assert_eq!(cy, gy);
        }
    }
}
