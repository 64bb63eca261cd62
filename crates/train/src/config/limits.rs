//! The bounds every numeric config value is checked against (one line naming the key and the
//! range when it is out of them).

/// Steps and step counts (`train.max_steps`, intervals, `run.stop_at`, ...).
pub const MAX_STEPS: u64 = 1_000_000_000_000;
/// `train.batch_size` and `train.grad_accum`.
pub const MAX_BATCH: u64 = 1 << 20;
/// `train.batch_size · train.grad_accum · model.block_size`.
pub const MAX_TOKENS_PER_RANK_STEP: u64 = 1 << 40;
/// `parallel.dp`.
pub const MAX_RANKS: u64 = 1 << 20;
/// Largest `parallel.pp` and `parallel.virtual_stages`.
pub const MAX_PP: usize = 1024;
/// Largest `parallel.tp` (a node of a gigafactory has at most a few dozen GPUs behind one switch).
pub const MAX_TP: usize = 1024;
/// Largest pipeline schedule (`pp × virtual_stages × grad_accum` stage-micro-batches).
pub const MAX_PIPELINE_ACTIONS: u64 = 1 << 22;
/// `train.eval_iters`.
pub const MAX_EVAL_ITERS: u64 = 1_000_000;
/// `run.keep_checkpoints`.
pub const MAX_KEEP_CHECKPOINTS: u64 = 1_000_000;
/// `run.threads`.
pub const MAX_THREADS: u64 = 4096;
/// `run.sample_tokens`.
pub const MAX_SAMPLE_TOKENS: u64 = 1_000_000;
/// `train.weight_decay`.
pub const MAX_WEIGHT_DECAY: f64 = 100.0;
/// `train.grad_clip`.
pub const MAX_GRAD_CLIP: f64 = 1e6;
/// `train.peak_flops` (FLOP/s of one device).
pub const MAX_PEAK_FLOPS: f64 = 1e20;
/// `parallel.bucket_mb` (1 KiB to 100 GB).
pub const MIN_BUCKET_MB: f64 = 0.001;
pub const MAX_BUCKET_MB: f64 = 1e5;
