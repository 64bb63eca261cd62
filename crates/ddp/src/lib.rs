//! Data parallelism, applied to a model from outside (the model knows nothing of communicators).
//!
//! [`buckets`] assigns gradients to buckets (a pure function); [`reducer`] applies data
//! parallelism to a parameter list: parameters' `.grad` become views into bucket storage
//! (`fabbrica_torch_ext::hooks::set_grad`), each bucket is all-reduced from the gradient-ready
//! hooks (`fabbrica_torch_ext::hooks`) while backward is still running, and under ZeRO-1 the
//! optimizer is handed only this rank's shard of each bucket to update and keep state for.
//!
//! # Bucketing rule, and why
//!
//! All-reducing each gradient separately pays one collective's latency per parameter (GPT-2 small
//! has 148 of them); all-reducing one flat buffer of all gradients at the end of backward overlaps
//! nothing with compute. DDP sits between the two: gradients are grouped into *buckets*, each a
//! contiguous storage that the parameters' `.grad` tensors are views into, and a bucket's
//! all-reduce starts as soon as the last gradient in it has been accumulated, while backward goes
//! on computing earlier layers. [`buckets::assign_buckets`] decides the groups:
//!
//! - **Reverse registration order.** Backward produces gradients roughly in the reverse of the
//!   order in which forward used the parameters, which for a model that registers its layers in
//!   forward order (ours does) is the reverse of registration order. Filling buckets along that
//!   order makes each bucket's gradients become ready close together, so a bucket does not wait
//!   for a parameter from the other end of the network, and buckets become ready one after the
//!   other, in bucket order (every rank must launch the collectives in the same order).
//! - **A size cap (`parallel.bucket_mb`, default 25 MiB, PyTorch's default).** Larger buckets mean
//!   fewer collectives (less per-call latency); smaller ones mean the first all-reduce starts
//!   earlier and the last one, which nothing overlaps, is shorter. A bucket closes before the
//!   parameter that would take it past the cap; a parameter larger than the cap gets a bucket of
//!   its own (it cannot be split: its `.grad` is one view).
//! - **A small first bucket (`parallel.first_bucket_mb`, default 1 MiB, PyTorch's
//!   `_DEFAULT_FIRST_BUCKET_BYTES`).** The first gradients of backward are typically small (final
//!   LayerNorm, biases); a small first bucket gets the first all-reduce onto the wire almost
//!   immediately instead of waiting for 25 MiB of gradients.
//! - **One dtype (and device) per bucket**, because a bucket is one tensor: each bucket key has its
//!   own open bucket and its own small first bucket.
//! - **Plain packing**: parameter `k` of a bucket starts where parameter `k - 1` ends (as in
//!   PyTorch's reducer); see [`buckets`] for why no alignment padding.
//!
//! The assignment is a pure function of the parameter sizes and the caps, so every rank computes
//! the same buckets without exchanging anything.
//!
//! ```
//! use fabbrica_ddp::buckets::{assign_buckets, BucketCaps, ParamSpec};
//!
//! // Four f32 parameters of 16, 16, 4 and 4 elements, in registration order.
//! let params: Vec<ParamSpec> = [16, 16, 4, 4].iter().map(|&n| ParamSpec::new(n, 4)).collect();
//! // Caps: 64 bytes per bucket, 32 bytes for the first.
//! let a = assign_buckets(&params, BucketCaps::new(64, 32).unwrap()).unwrap();
//! let groups: Vec<Vec<usize>> = a.buckets.iter().map(|b| b.params().collect()).collect();
//! assert_eq!(groups, vec![vec![3, 2], vec![1], vec![0]]);
//! assert_eq!(a.entry(2).unwrap().offset, 4); // p2's gradient is elements 4..8 of bucket 0
//! ```

pub mod buckets;
pub mod error;
pub mod reducer;

pub use buckets::{assign_buckets, Bucket, BucketAssignment, BucketCaps, BucketEntry, ParamSpec, Slot};
pub use error::{DdpError, Result};
pub use reducer::{clip_coef, AllReduce, Bf16Compress, CommHook, Ddp, DdpOptions, HookBucket, HookError, OptParam, Piece};
