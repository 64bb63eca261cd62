//! Gradient bucket assignment: which parameters share one contiguous gradient buffer (a *bucket*)
//! and where each one's gradient lives inside it. A pure function of the parameters' sizes and
//! the caps, so every rank computes the same assignment without talking to the others.
//!
//! The rule is PyTorch DDP's `compute_bucket_assignment_by_size` (see the crate docs for the why):
//! walk the parameters in **reverse** registration order; per bucket key (dtype/device) keep one
//! open bucket and append parameters to it; a parameter that would push the open bucket past its
//! cap closes it first; the first bucket of each key has the smaller `first_cap`, the others `cap`.
//! Two differences from PyTorch, both to keep the cap a real bound:
//! - PyTorch closes a bucket *after* the parameter that reaches the cap, so a bucket may exceed the
//!   cap by up to one parameter; here a bucket exceeds its cap only when it holds a single
//!   parameter that is alone larger than the cap.
//! - PyTorch assigns in forward order and reverses the bucket list; here the walk itself is in
//!   reverse, so the small first bucket holds the *last* parameters (the first gradients ready).
//!
//! Offsets are plain packing (each parameter starts where the previous one ends), as in PyTorch's
//! reducer. Aligning offsets (say to 16 elements) would help vectorised kernels only where a
//! parameter's size is not already a multiple of 16: every GPT-2 tensor is a multiple of the
//! embedding width (768 or more, multiples of 64), so padding would buy nothing here and would make
//! a bucket's storage larger than the gradients it holds.

use std::collections::HashMap;

use crate::error::{DdpError, Result};

/// Config key of the bucket cap, in MiB.
pub const KEY_BUCKET_MB: &str = "parallel.bucket_mb";
/// Config key of the first bucket's cap, in MiB.
pub const KEY_FIRST_BUCKET_MB: &str = "parallel.first_bucket_mb";
/// Default bucket cap in MiB (PyTorch DDP's `bucket_cap_mb`).
pub const DEFAULT_BUCKET_MB: f64 = 25.0;
/// Default first-bucket cap in MiB (PyTorch's `dist._DEFAULT_FIRST_BUCKET_BYTES`).
pub const DEFAULT_FIRST_BUCKET_MB: f64 = 1.0;

const MIB: f64 = 1024.0 * 1024.0;

/// Size caps of the buckets, in bytes. Both are > 0 (checked on construction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketCaps {
    cap_bytes: usize,
    first_cap_bytes: usize,
}

impl Default for BucketCaps {
    /// 25 MiB per bucket, 1 MiB for the first one.
    fn default() -> Self {
        BucketCaps { cap_bytes: (DEFAULT_BUCKET_MB * MIB) as usize, first_cap_bytes: (DEFAULT_FIRST_BUCKET_MB * MIB) as usize }
    }
}

impl BucketCaps {
    /// Caps in bytes. A first cap above `cap_bytes` is lowered to it (a small
    /// `parallel.bucket_mb` must not be an error just because the first-bucket default is larger).
    pub fn new(cap_bytes: usize, first_cap_bytes: usize) -> Result<Self> {
        if cap_bytes == 0 {
            return Err(bad_cap(KEY_BUCKET_MB, "0 bytes".into()));
        }
        if first_cap_bytes == 0 {
            return Err(bad_cap(KEY_FIRST_BUCKET_MB, "0 bytes".into()));
        }
        Ok(BucketCaps { cap_bytes, first_cap_bytes: first_cap_bytes.min(cap_bytes) })
    }

    /// Caps from the config values `parallel.bucket_mb` and `parallel.first_bucket_mb` (MiB, as
    /// PyTorch's `bucket_cap_mb`: 1 MiB = 2^20 bytes). Values below one byte are errors.
    pub fn from_mb(bucket_mb: f64, first_bucket_mb: f64) -> Result<Self> {
        let bytes = |mb: f64, key: &'static str| {
            let b = mb * MIB;
            if !b.is_finite() || b < 1.0 {
                return Err(bad_cap(key, format!("{mb}")));
            }
            Ok(b.min(usize::MAX as f64) as usize)
        };
        Self::new(bytes(bucket_mb, KEY_BUCKET_MB)?, bytes(first_bucket_mb, KEY_FIRST_BUCKET_MB)?)
    }

    /// Cap of every bucket but the first of each key, in bytes.
    pub fn cap_bytes(&self) -> usize {
        self.cap_bytes
    }

    /// Cap of the first bucket of each key, in bytes (≤ `cap_bytes`).
    pub fn first_cap_bytes(&self) -> usize {
        self.first_cap_bytes
    }
}

fn bad_cap(key: &'static str, got: String) -> DdpError {
    let default = if key == KEY_BUCKET_MB { "25" } else { "1" };
    DdpError::BadBucketCap { key, got, default }
}

/// One parameter as the assignment sees it: its element count, the size of one element of its
/// gradient in bytes, and a bucket key. Parameters with different keys never share a bucket: give
/// each (dtype, device) pair its own key; parameters with the same key must have the same
/// element size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ParamSpec {
    pub numel: usize,
    pub elem_size: usize,
    pub key: u64,
}

impl ParamSpec {
    /// A parameter with bucket key 0.
    pub fn new(numel: usize, elem_size: usize) -> Self {
        ParamSpec { numel, elem_size, key: 0 }
    }

    /// The same parameter with another bucket key.
    pub fn with_key(self, key: u64) -> Self {
        ParamSpec { key, ..self }
    }
}

/// Where one parameter's gradient lives in its bucket: elements `offset .. offset + numel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketEntry {
    /// Index of the parameter in registration order.
    pub param: usize,
    /// First element of the gradient inside the bucket's storage.
    pub offset: usize,
    pub numel: usize,
}

/// A group of parameters whose gradients share one contiguous storage of `numel` elements and
/// are all-reduced together. `entries` are in the order they were assigned (reverse registration
/// order), with increasing offsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub key: u64,
    pub elem_size: usize,
    /// The cap this bucket was filled against (the first cap for the first bucket of its key).
    pub cap_bytes: usize,
    pub entries: Vec<BucketEntry>,
    /// Total elements of the storage: the sum of the entries' `numel` (plain packing).
    pub numel: usize,
}

impl Bucket {
    /// Bytes of the bucket's storage.
    pub fn bytes(&self) -> usize {
        self.numel * self.elem_size
    }

    /// Parameter indices in assignment order.
    pub fn params(&self) -> impl Iterator<Item = usize> + '_ {
        self.entries.iter().map(|e| e.param)
    }
}

/// Position of one parameter in an assignment: `buckets[bucket].entries[entry]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub bucket: usize,
    pub entry: usize,
}

/// The result of [`assign_buckets`]: buckets in the order their gradients are expected to become
/// ready (ordered by their first parameter in the reverse walk), and each parameter's slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketAssignment {
    pub buckets: Vec<Bucket>,
    slots: Vec<Slot>,
}

impl BucketAssignment {
    /// The slot of parameter `param` (registration index); `None` if out of range.
    pub fn slot(&self, param: usize) -> Option<Slot> {
        self.slots.get(param).copied()
    }

    /// The bucket entry of parameter `param`; `None` if out of range.
    pub fn entry(&self, param: usize) -> Option<&BucketEntry> {
        self.slot(param).map(|s| &self.buckets[s.bucket].entries[s.entry])
    }

    /// Number of parameters assigned.
    pub fn num_params(&self) -> usize {
        self.slots.len()
    }
}

/// The open bucket of one key while walking.
struct Open {
    walk_pos: usize,
    bucket: Bucket,
}

/// Per-key state while walking.
struct KeyState {
    elem_size: usize,
    closed: usize,
    open: Option<Open>,
}

/// Assigns parameters (in registration order) to gradient buckets. See the module docs for the
/// rule. Every parameter lands in exactly one bucket; no bucket is empty.
pub fn assign_buckets(params: &[ParamSpec], caps: BucketCaps) -> Result<BucketAssignment> {
    // (walk position of its first parameter, bucket): sorted at the end.
    let mut done: Vec<(usize, Bucket)> = Vec::new();
    let mut keys: HashMap<u64, KeyState> = HashMap::new();
    let close = |st: &mut KeyState, done: &mut Vec<(usize, Bucket)>| {
        if let Some(open) = st.open.take() {
            done.push((open.walk_pos, open.bucket));
            st.closed += 1;
        }
    };

    for (walk_pos, param) in (0..params.len()).rev().enumerate() {
        let p = params[param];
        if p.elem_size == 0 {
            return Err(DdpError::ZeroElementSize { param });
        }
        let bytes = p.numel.checked_mul(p.elem_size).ok_or(DdpError::SizeOverflow { param, numel: p.numel, elem_size: p.elem_size })?;
        let st = keys.entry(p.key).or_insert(KeyState { elem_size: p.elem_size, closed: 0, open: None });
        if st.elem_size != p.elem_size {
            return Err(DdpError::MixedElementSize { param, key: p.key, expected: st.elem_size, got: p.elem_size });
        }
        // Close the open bucket if this parameter does not fit (a bucket holding only empty
        // parameters is not worth its own all-reduce: they ride along with this one).
        if let Some(open) = &st.open {
            let used = open.bucket.bytes();
            if used > 0 && used.saturating_add(bytes) > open.bucket.cap_bytes {
                close(st, &mut done);
            }
        }
        let cap_bytes = if st.closed == 0 { caps.first_cap_bytes } else { caps.cap_bytes };
        let open = st.open.get_or_insert_with(|| Open {
            walk_pos,
            bucket: Bucket { key: p.key, elem_size: p.elem_size, cap_bytes, entries: Vec::new(), numel: 0 },
        });
        let b = &mut open.bucket;
        b.entries.push(BucketEntry { param, offset: b.numel, numel: p.numel });
        b.numel += p.numel;
        // A full (or single oversize) bucket closes now, so the next parameter starts a new one.
        if b.bytes() >= b.cap_bytes {
            close(st, &mut done);
        }
    }
    for st in keys.values_mut() {
        close(st, &mut done);
    }
    done.sort_by_key(|(walk_pos, _)| *walk_pos);

    let buckets: Vec<Bucket> = done.into_iter().map(|(_, b)| b).collect();
    let mut slots = vec![Slot { bucket: usize::MAX, entry: usize::MAX }; params.len()];
    for (bi, b) in buckets.iter().enumerate() {
        for (ei, e) in b.entries.iter().enumerate() {
            slots[e.param] = Slot { bucket: bi, entry: ei };
        }
    }
    Ok(BucketAssignment { buckets, slots })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Minimal LCG (Knuth's MMIX constants): seeded, reproducible, no dependency.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            self.0 >> 33
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn caps(cap: usize, first: usize) -> BucketCaps {
        BucketCaps::new(cap, first).unwrap()
    }

    fn f32s(numels: &[usize]) -> Vec<ParamSpec> {
        numels.iter().map(|&n| ParamSpec::new(n, 4)).collect()
    }

    fn layout(a: &BucketAssignment) -> Vec<Vec<usize>> {
        a.buckets.iter().map(|b| b.params().collect()).collect()
    }

    /// Every invariant the reducer relies on, checked for any input.
    fn check_invariants(params: &[ParamSpec], caps: BucketCaps, a: &BucketAssignment) {
        // Every parameter exactly once, and `slot`/`entry` agree with the buckets.
        let mut seen = vec![0usize; params.len()];
        for (bi, b) in a.buckets.iter().enumerate() {
            assert!(!b.entries.is_empty(), "empty bucket {bi}");
            for (ei, e) in b.entries.iter().enumerate() {
                seen[e.param] += 1;
                assert_eq!(a.slot(e.param), Some(Slot { bucket: bi, entry: ei }));
                assert_eq!(a.entry(e.param), Some(e));
            }
        }
        assert!(seen.iter().all(|&c| c == 1), "each parameter exactly once: {seen:?}");
        assert_eq!(a.num_params(), params.len());
        assert_eq!(a.slot(params.len()), None);

        let mut per_key: HashMap<u64, Vec<&Bucket>> = HashMap::new();
        for b in &a.buckets {
            // Plain packing: offsets contiguous from 0, non-overlapping, inside the storage.
            let mut off = 0;
            for e in &b.entries {
                let p = params[e.param];
                assert_eq!(e.numel, p.numel);
                assert_eq!((p.key, p.elem_size), (b.key, b.elem_size), "bucket mixes keys");
                assert_eq!(e.offset, off, "offsets are packed");
                off += e.numel;
                assert!(e.offset + e.numel <= b.numel);
            }
            assert_eq!(off, b.numel);
            // Cap respected, except by a single parameter that alone exceeds it.
            if b.bytes() > b.cap_bytes {
                let nonempty: Vec<_> = b.entries.iter().filter(|e| e.numel > 0).collect();
                assert_eq!(nonempty.len(), 1, "over-cap bucket must hold one parameter: {b:?}");
                assert!(nonempty[0].numel * b.elem_size > b.cap_bytes);
            }
            per_key.entry(b.key).or_default().push(b);
        }

        // Buckets are ordered by their first parameter in the reverse walk.
        let firsts: Vec<usize> = a.buckets.iter().map(|b| b.entries[0].param).collect();
        assert!(firsts.windows(2).all(|w| w[0] > w[1]), "bucket order: {firsts:?}");

        for bs in per_key.values() {
            // Within a key, concatenated entries are strictly decreasing parameter indices.
            let order: Vec<usize> = bs.iter().flat_map(|b| b.params()).collect();
            assert!(order.windows(2).all(|w| w[0] > w[1]), "reverse order: {order:?}");
            // Only the first bucket of a key uses the first cap.
            assert_eq!(bs[0].cap_bytes, caps.first_cap_bytes());
            assert!(bs[1..].iter().all(|b| b.cap_bytes == caps.cap_bytes()));
            // Greedy: a bucket was closed only because it was full or the next parameter of its
            // key (the first of the next bucket) did not fit.
            for w in bs.windows(2) {
                let next = params[w[1].entries[0].param];
                let next_bytes = next.numel * next.elem_size;
                assert!(
                    w[0].bytes() >= w[0].cap_bytes || w[0].bytes() + next_bytes > w[0].cap_bytes,
                    "bucket closed early: {:?} then {:?}",
                    w[0],
                    w[1]
                );
            }
        }
    }

    #[test]
    fn defaults_are_pytorchs() {
        let c = BucketCaps::default();
        assert_eq!(c.cap_bytes(), 25 * 1024 * 1024);
        assert_eq!(c.first_cap_bytes(), 1024 * 1024);
        assert_eq!(BucketCaps::from_mb(25.0, 1.0).unwrap(), c);
    }

    #[test]
    fn zero_or_invalid_caps_are_errors_naming_the_key() {
        let e = BucketCaps::new(0, 1).unwrap_err();
        assert!(e.to_string().starts_with("parallel.bucket_mb must be > 0"), "{e}");
        let e = BucketCaps::new(1, 0).unwrap_err();
        assert!(e.to_string().starts_with("parallel.first_bucket_mb must be > 0"), "{e}");
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e-9] {
            let e = BucketCaps::from_mb(bad, 1.0).unwrap_err();
            assert!(matches!(e, DdpError::BadBucketCap { key: KEY_BUCKET_MB, .. }), "{bad}: {e}");
            let e = BucketCaps::from_mb(25.0, bad).unwrap_err();
            assert!(matches!(e, DdpError::BadBucketCap { key: KEY_FIRST_BUCKET_MB, .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn first_cap_is_clamped_to_cap() {
        let c = BucketCaps::from_mb(0.5, 1.0).unwrap();
        assert_eq!(c.first_cap_bytes(), c.cap_bytes());
        assert_eq!(c.cap_bytes(), 512 * 1024);
    }

    #[test]
    fn empty_input_gives_no_buckets() {
        let a = assign_buckets(&[], BucketCaps::default()).unwrap();
        assert!(a.buckets.is_empty());
        assert_eq!(a.num_params(), 0);
        assert_eq!(a.slot(0), None);
    }

    #[test]
    fn hand_worked_example() {
        // f32 sizes in bytes: p0 40, p1 40, p2 8, p3 24, p4 4. First cap 32 bytes, cap 64 bytes.
        // Reverse walk: p4 (4) + p3 (24) = 28 <= 32; p2 would make 36 > 32: close [4, 3].
        // p2 (8) + p1 (40) = 48 <= 64; p0 would make 88 > 64: close [2, 1]. Then [0].
        let p = f32s(&[10, 10, 2, 6, 1]);
        let c = caps(64, 32);
        let a = assign_buckets(&p, c).unwrap();
        check_invariants(&p, c, &a);
        assert_eq!(layout(&a), vec![vec![4, 3], vec![2, 1], vec![0]]);
        assert_eq!(a.buckets[0].entries[1], BucketEntry { param: 3, offset: 1, numel: 6 });
        assert_eq!(a.buckets[1].entries[1], BucketEntry { param: 1, offset: 2, numel: 10 });
        assert_eq!(a.buckets.iter().map(|b| b.numel).collect::<Vec<_>>(), vec![7, 12, 10]);
        assert_eq!(a.buckets.iter().map(|b| b.cap_bytes).collect::<Vec<_>>(), vec![32, 64, 64]);
        assert_eq!(a.slot(1), Some(Slot { bucket: 1, entry: 1 }));
    }

    #[test]
    fn exactly_full_bucket_closes() {
        // 4 params of 16 bytes, cap 32 (first too): [3, 2], [1, 0].
        let p = f32s(&[4, 4, 4, 4]);
        let a = assign_buckets(&p, caps(32, 32)).unwrap();
        assert_eq!(layout(&a), vec![vec![3, 2], vec![1, 0]]);
    }

    #[test]
    fn oversize_parameter_gets_its_own_bucket() {
        // Cap 40 bytes: the 400-byte parameter in the middle is alone.
        let p = f32s(&[2, 2, 100, 2, 2]);
        let c = caps(40, 40);
        let a = assign_buckets(&p, c).unwrap();
        check_invariants(&p, c, &a);
        assert_eq!(layout(&a), vec![vec![4, 3], vec![2], vec![1, 0]]);
        assert_eq!(a.buckets[1].bytes(), 400);
        // Also when the oversize parameter comes first in the walk (the first bucket).
        let p = f32s(&[2, 2, 100]);
        let a = assign_buckets(&p, c).unwrap();
        assert_eq!(layout(&a), vec![vec![2], vec![1, 0]]);
    }

    #[test]
    fn tiny_cap_gives_one_parameter_per_bucket() {
        let p = f32s(&[3, 1, 4, 1, 5, 9, 2, 6]);
        for c in [caps(1, 1), caps(3, 1), caps(4, 4)] {
            let a = assign_buckets(&p, c).unwrap();
            check_invariants(&p, c, &a);
            assert_eq!(layout(&a), (0..p.len()).rev().map(|i| vec![i]).collect::<Vec<_>>());
        }
    }

    #[test]
    fn huge_cap_gives_one_bucket_after_the_first() {
        // The first bucket takes what fits under the first cap, then everything else shares one.
        let p = f32s(&[100, 100, 100, 1, 1]);
        let c = caps(usize::MAX, 8);
        let a = assign_buckets(&p, c).unwrap();
        check_invariants(&p, c, &a);
        assert_eq!(layout(&a), vec![vec![4, 3], vec![2, 1, 0]]);
    }

    #[test]
    fn dtypes_never_share_a_bucket() {
        // Interleaved f32 (key 0) and bf16 (key 1); each key has its own first bucket.
        let p: Vec<ParamSpec> = (0..8).map(|i| if i % 2 == 0 { ParamSpec::new(4, 4) } else { ParamSpec::new(4, 2).with_key(1) }).collect();
        let c = caps(32, 16);
        let a = assign_buckets(&p, c).unwrap();
        check_invariants(&p, c, &a);
        // bf16 (8 bytes each): first cap 16 → [7, 5], then cap 32 → [3, 1].
        // f32 (16 bytes each): first cap 16 → [6], then cap 32 → [4, 2], [0].
        // Buckets are listed by their first parameter in the reverse walk.
        assert_eq!(layout(&a), vec![vec![7, 5], vec![6], vec![4, 2], vec![3, 1], vec![0]]);
        for b in &a.buckets {
            assert!(b.params().all(|i| p[i].key == b.key));
        }
    }

    #[test]
    fn mixed_element_sizes_under_one_key_are_an_error() {
        let p = vec![ParamSpec::new(4, 4), ParamSpec::new(4, 2)];
        let e = assign_buckets(&p, BucketCaps::default()).unwrap_err();
        // The walk is in reverse: parameter 1 sets the key's element size, parameter 0 disagrees.
        assert!(matches!(e, DdpError::MixedElementSize { param: 0, key: 0, expected: 2, got: 4 }), "{e:?}");
        assert!(e.to_string().contains("different keys"), "{e}");
    }

    #[test]
    fn zero_element_size_and_overflow_are_errors() {
        let e = assign_buckets(&[ParamSpec::new(4, 0)], BucketCaps::default()).unwrap_err();
        assert!(matches!(e, DdpError::ZeroElementSize { param: 0 }), "{e:?}");
        let e = assign_buckets(&[ParamSpec::new(usize::MAX, 2)], BucketCaps::default()).unwrap_err();
        assert!(matches!(e, DdpError::SizeOverflow { param: 0, .. }), "{e}");
    }

    #[test]
    fn empty_parameters_ride_along() {
        // Zero-element parameters take no space and never open a bucket of their own.
        let p = f32s(&[0, 4, 0, 0, 4, 0]);
        let c = caps(16, 16);
        let a = assign_buckets(&p, c).unwrap();
        check_invariants(&p, c, &a);
        assert_eq!(layout(&a), vec![vec![5, 4], vec![3, 2, 1], vec![0]]);
        let p = f32s(&[0, 0]);
        let a = assign_buckets(&p, c).unwrap();
        check_invariants(&p, c, &a);
        assert_eq!(layout(&a), vec![vec![1, 0]]);
    }

    #[test]
    fn gpt2_small_layout_with_default_caps() {
        // nanoGPT GPT-2 124M in registration order (wte, wpe, 12 blocks, ln_f), f32.
        let (c, v, t, l) = (768usize, 50304usize, 1024usize, 12);
        let mut numels = vec![v * c, t * c];
        for _ in 0..l {
            numels.extend([c, c, 3 * c * c, 3 * c, c * c, c, c, c, 4 * c * c, 4 * c, 4 * c * c, c]);
        }
        numels.extend([c, c]);
        let p = f32s(&numels);
        let caps = BucketCaps::default();
        let a = assign_buckets(&p, caps).unwrap();
        check_invariants(&p, caps, &a);
        let n = p.len();
        // First bucket (≤ 1 MiB): ln_f bias, ln_f weight, the last block's c_proj bias (9 KiB in
        // all); its c_proj weight (9 MiB) does not fit.
        assert_eq!(layout(&a)[0], vec![n - 1, n - 2, n - 3]);
        // The tied embedding (154 MiB) is alone and last.
        assert_eq!(layout(&a).last().unwrap(), &vec![0]);
        let total: usize = a.buckets.iter().map(|b| b.numel).sum();
        assert_eq!(total, numels.iter().sum::<usize>());
    }

    #[test]
    fn random_inputs_keep_every_invariant() {
        let mut rng = Lcg(0x5eed);
        for case in 0..3000 {
            let n = rng.below(64) as usize;
            let nkeys = 1 + rng.below(3);
            let params: Vec<ParamSpec> = (0..n)
                .map(|_| {
                    let key = rng.below(nkeys);
                    let elem_size = [4, 2, 8][key as usize];
                    // Mostly small, some empty, some large (oversize for small caps).
                    let numel = match rng.below(10) {
                        0 => 0,
                        1 => rng.below(100_000) as usize,
                        _ => 1 + rng.below(300) as usize,
                    };
                    ParamSpec::new(numel, elem_size).with_key(key)
                })
                .collect();
            let cap = 1 + rng.below(if case % 2 == 0 { 64 } else { 8192 }) as usize;
            let first = 1 + rng.below(2 * cap as u64) as usize;
            let c = caps(cap, first);
            let a = assign_buckets(&params, c).unwrap();
            check_invariants(&params, c, &a);
            // Deterministic: the same input gives the same assignment (every rank agrees).
            assert_eq!(assign_buckets(&params, c).unwrap(), a);
        }
    }
}
