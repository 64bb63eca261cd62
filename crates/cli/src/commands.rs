use std::path::PathBuf;

use clap::{Args, Subcommand};
use fabbrica_data::TokenizerSpec;
use fabbrica_models::flops_per_token;
use fabbrica_train::config::DeviceChoice;
use fabbrica_train::sample::{sample_from_checkpoint_streaming, SampleArgs as LibSampleArgs};
use fabbrica_train::{Config, TrainError, TrainOptions};

/// A failure to report: one line, and whether the user caused it (exit 2) or not (exit 1).
pub struct Failure {
    pub message: String,
    pub user: bool,
}

impl From<TrainError> for Failure {
    fn from(e: TrainError) -> Self {
        Failure { user: e.is_user_error(), message: e.to_string() }
    }
}

impl From<fabbrica_train::ConfigError> for Failure {
    fn from(e: fabbrica_train::ConfigError) -> Self {
        Failure { user: true, message: e.to_string() }
    }
}

impl From<fabbrica_data::DataError> for Failure {
    fn from(e: fabbrica_data::DataError) -> Self {
        Failure { user: true, message: e.to_string() }
    }
}

type Result<T> = std::result::Result<T, Failure>;

#[derive(Args)]
pub struct ConfigArgs {
    /// TOML file with [model], [data], [train], [run] sections, applied over the preset.
    #[arg(long, value_name = "FILE.toml")]
    pub config: Option<PathBuf>,
    /// Base settings (default tiny): tiny, gpt2-124m, gpt2-350m, gpt2-774m, gpt2-1.5b, llama-tiny,
    /// llama3.2-1b, llama3.2-3b, llama3.1-8b, llama3.1-70b, llama3.1-405b.
    #[arg(long, value_name = "NAME")]
    pub preset: Option<String>,
    /// Override one key, e.g. --set train.lr=3e-4 --set run.device=cpu (repeatable; applied last).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
}

impl ConfigArgs {
    fn resolve(&self) -> Result<Config> {
        Ok(Config::resolve(self.preset.as_deref(), self.config.as_deref(), &self.sets)?)
    }
}

#[derive(Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub cfg: ConfigArgs,
    /// Print the resolved config, parameter count, FLOPs per token and a memory estimate per
    /// device, then exit without reading data or touching a device.
    #[arg(long)]
    pub dry_run: bool,
}

/// Errors every rank meets alike (a layout that does not fit, or inputs that failed on every
/// rank): said once, by rank 0.
fn is_setup_error(e: &TrainError) -> bool {
    matches!(
        e,
        TrainError::Config(_)
            | TrainError::Data(_)
            | TrainError::Parallel(_)
            | TrainError::Checkpoint(_)
            | TrainError::CheckpointFile { .. }
            | TrainError::Device(_)
            | TrainError::Model(_)
            | TrainError::Disagreement(_)
            | TrainError::NotEnoughMemory(_)
    )
}

/// Under a launcher every rank resolves the same arguments and would print the same error: only
/// rank 0 says it (the message is blanked elsewhere; the exit code stays).
fn once(f: Failure) -> Failure {
    match fabbrica_comm::launch::detect() {
        Ok(env) if env.rank != 0 => Failure { message: String::new(), ..f },
        _ => f,
    }
}

pub fn train(a: TrainArgs) -> Result<()> {
    let cfg = a.cfg.resolve().map_err(once)?;
    if a.dry_run {
        return dry_run(&cfg);
    }
    let opts = fabbrica_train::comm_options(&cfg).map_err(|e| once(e.into()))?;
    let world = fabbrica_comm::init(opts).map_err(|e| once(Failure { message: e.to_string(), user: true }))?;
    let (rank, size) = (world.rank(), world.size());
    let out = match fabbrica_train::train_in(&world, &cfg, &TrainOptions { progress: true }) {
        Ok(out) => out,
        Err(e @ TrainError::Preempted { .. }) => {
            // Every rank stopped at the same step boundary after the checkpoint: a clean exit.
            drop(world);
            if rank == 0 {
                use std::io::Write;
                let _ = std::io::stderr().write_all(format!("note: {e}\n").as_bytes());
            }
            std::process::exit(fabbrica_train::signals::EXIT_PREEMPTED as i32);
        }
        Err(e) if size > 1 => {
            // Other ranks may be waiting in a collective for this one: finalising MPI would wait
            // for them too. Leaving without it makes the launcher end the job.
            std::mem::forget(world);
            // Setup errors come out of train_in already agreed (said once, by the rank that had
            // it); anything later happened on this rank.
            let message = match &e {
                TrainError::Elsewhere { .. } => String::new(),
                // Seen by every rank alike and said by rank 0 only: already names its ranks.
                TrainError::OnRank { .. } | TrainError::NonFinite(_) => e.to_string(),
                _ if rank == 0 && is_setup_error(&e) => e.to_string(),
                _ if is_setup_error(&e) => String::new(),
                _ => format!("rank {rank}: {e}"),
            };
            let f: Failure = e.into();
            return Err(Failure { message, ..f });
        }
        Err(e) => return Err(e.into()),
    };
    drop(world);
    if rank != 0 {
        return Ok(());
    }
    use fabbrica_train::metrics::say;
    say(&format!("finished {} steps: train loss {:.4}, val loss {:.4}", out.steps, out.train_loss, out.val_loss));
    say(&format!("checkpoint: {}", out.checkpoint.display()));
    say(&format!("metrics: {}", out.out_dir.join("metrics.jsonl").display()));
    if let Some(s) = out.sample {
        say(&format!("--- sample ---\n{s}\n--------------"));
    }
    Ok(())
}

/// What a run would be, without data or devices: the resolved config, the data-parallel layout
/// for the world the launcher describes, the cost model and a memory estimate. Under a launcher
/// only rank 0 prints.
fn dry_run(cfg: &Config) -> Result<()> {
    let launch = fabbrica_comm::launch::detect().map_err(|e| Failure { user: true, message: e.to_string() })?;
    // The trainer's own grid (degrees, rank order), for the world the launcher describes.
    let dims = fabbrica_train::grid::dims(cfg, launch.world_size).map_err(|e| once(Failure::from(e)))?;
    fabbrica_train::grid::check_tp_fits_node(dims.tp, launch.local_world_size, launch.world_size).map_err(|e| once(Failure::from(e)))?;
    if launch.rank != 0 {
        return Ok(());
    }
    println!("# resolved config\n{}", cfg.to_toml());
    let mut m = cfg.model.clone();
    let auto_vocab = m.vocab_size() == 0;
    if auto_vocab {
        m.set_vocab_size(256); // placeholder: the real size comes from the data's tokenizer
    }
    if !auto_vocab {
        fabbrica_models::Model::check_tensor_parallel(&m, cfg.parallel.tp).map_err(|e| once(Failure { user: true, message: e.to_string() }))?;
    }
    let t = &cfg.train;
    let n = fabbrica_models::flops::total_params(&m);
    let fpt = flops_per_token(&m, m.block_size());
    // The trainer's own rule (run.device, train.dtype), on the device it would get.
    let device = fabbrica_train::device::planned_device(cfg.run.device);
    let bf16 = fabbrica_train::device::resolve_bf16(t.dtype, device);
    let attention = fabbrica_train::memory::attention_kernel(device, &m);
    let p = &cfg.parallel;
    let mut mem = fabbrica_models::flops::stage_memory_estimate_tp(
        &m,
        &[fabbrica_models::StageSpec::whole(m.n_layer())],
        t.batch_size,
        m.block_size(),
        bf16,
        attention,
        cfg.recompute(),
        1,
        p.tp,
        p.sequence_parallel,
    );
    if cfg.parallel.zero == 1 {
        mem.optimizer = mem.optimizer.div_ceil(dims.dp as u64); // ZeRO-1: each rank keeps its shard of the moments
    }
    let mem = fabbrica_train::memory::on_device(mem, device);
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    if auto_vocab {
        println!("# model.vocab_size = 0 is taken from the tokenizer at start; figures below assume 256");
    }
    let seqs = t.batch_size * t.grad_accum * dims.dp;
    let shape = match &*m {
        fabbrica_models::ModelConfig::Gpt(g) => format!("gpt: {} layers, {} heads, width {}, {}", g.n_layer, g.n_head, g.n_embd, g.activation),
        fabbrica_models::ModelConfig::Llama(l) => format!(
            "llama: {} layers, {} query heads over {} key-value heads, width {}, SwiGLU {}, rope theta {}{}",
            l.n_layer,
            l.n_head,
            l.n_kv_head,
            l.n_embd,
            l.ffn_hidden(),
            l.rope_theta,
            if l.rope_scaling.kind == fabbrica_models::RopeKind::Llama3 {
                format!(" (llama3 scaling x{})", l.rope_scaling.factor)
            } else {
                String::new()
            }
        ),
    };
    let init = if m.init_from.as_os_str().is_empty() { String::new() } else { format!(", weights from {}", m.init_from.display()) };
    println!("model:             {shape}{}{init}", if m.tie_embeddings() { ", tied embeddings" } else { "" });
    if cfg.recompute() != fabbrica_models::Recompute::None {
        println!("recompute:         {} (the memory below accounts for it)", t.recompute);
    }
    println!("parameters:        {n} ({:.1}M)", n as f64 / 1e6);
    println!("flops per token:   {fpt:.4e} (6N + 12·L·H·Q·T, T = {})", m.block_size());
    let tensor = match (dims.tp, p.sequence_parallel) {
        (1, _) => String::new(),
        (tp, false) => format!("tensor parallel {tp} × "),
        (tp, true) => format!("tensor parallel {tp} (sequence parallel) × "),
    };
    let layout = if dims.pp > 1 {
        format!("{tensor}pipeline {} × data parallel {} ({})", dims.pp, dims.dp, dims.order)
    } else {
        format!("{tensor}data parallel {}", dims.dp)
    };
    println!("ranks:             {} ({}), {layout}{}", launch.world_size, launch.launcher, if cfg.parallel.zero == 1 { ", ZeRO-1" } else { "" });
    println!(
        "global batch:      {seqs} sequences = micro {} × accum {} × dp {}, {} tokens per step",
        t.batch_size,
        t.grad_accum,
        dims.dp,
        seqs * m.block_size()
    );
    println!("flops per step:    {:.4e}", fpt * (seqs * m.block_size()) as f64);
    let dtype = if bf16 { "bf16" } else { "fp32" };
    match fabbrica_train::memory::pipeline_plan(cfg, &m, bf16, device, dims.dp)? {
        None => println!(
            "memory per device: {:.2} GiB (params {:.2}, grads {:.2}, AdamW {:.2}, activations {:.2} at micro-batch {}, {dtype})",
            gib(mem.total()),
            gib(mem.params),
            gib(mem.grads),
            gib(mem.optimizer),
            gib(mem.activations),
            t.batch_size,
        ),
        Some(plans) => {
            let mean_bubble = plans.iter().map(|p| p.bubble).sum::<f64>() / plans.len() as f64;
            let (p, mb) = (dims.pp as f64, t.grad_accum as f64);
            println!(
                "pipeline:          {} schedule, {} stages ({} per rank), {} micro-batches; simulated bubble {:.1}% (theory (p-1)/(m+p-1) = {:.1}% for one chunk per rank)",
                cfg.parallel.schedule,
                dims.pp * cfg.parallel.virtual_stages,
                cfg.parallel.virtual_stages,
                t.grad_accum,
                100.0 * mean_bubble,
                100.0 * (p - 1.0) / (mb + p - 1.0)
            );
            println!("memory per device by pipeline rank (activations for the micro-batches in flight at the peak, {dtype}):");
            println!(
                "  rank  stages (layers)                 params      in flight  params GiB  grads GiB  AdamW GiB  activations GiB  total GiB  bubble"
            );
            for r in &plans {
                let stages: Vec<String> = r.stages.iter().map(|(s, b, _)| format!("{s} ({}..{})", b.start, b.end)).collect();
                let params: u64 = r.stages.iter().map(|(_, _, n)| n).sum();
                println!(
                    "  {:>4}  {:<30}  {:>10}  {:>9}  {:>10.2}  {:>9.2}  {:>9.2}  {:>15.2}  {:>9.2}  {:>5.1}%",
                    r.pp_rank,
                    stages.join(", "),
                    params,
                    r.in_flight,
                    gib(r.memory.params),
                    gib(r.memory.grads),
                    gib(r.memory.optimizer),
                    gib(r.memory.activations),
                    gib(r.memory.total()),
                    100.0 * r.bubble
                );
            }
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct PrepareArgs {
    /// UTF-8 text file to tokenize.
    #[arg(long, value_name = "FILE")]
    pub input: PathBuf,
    /// char (vocabulary = the file's characters), gpt2 (GPT-2 BPE, 50257 tokens), or
    /// hf:PATH/tokenizer.json (a Hugging Face tokenizer file, copied into --out).
    #[arg(long, default_value = "char")]
    pub tokenizer: String,
    /// Output directory for train.bin, val.bin (flat little-endian uint16, or uint32 above 65536
    /// tokens) and meta.json.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Fraction of the tokens (the end of the file) held out as val.bin.
    #[arg(long, default_value_t = 0.1)]
    pub val_fraction: f64,
}

pub fn prepare(a: PrepareArgs) -> Result<()> {
    let spec: TokenizerSpec = a.tokenizer.parse()?;
    let s = fabbrica_data::prepare(&a.input, &spec, &a.out, a.val_fraction)?;
    println!(
        "{}: {} train + {} val tokens, {} tokenizer (vocab {}, {} token files) -> {}",
        a.input.display(),
        s.train_tokens,
        s.val_tokens,
        s.tokenizer,
        s.vocab_size,
        s.dtype,
        a.out.display()
    );
    // Training needs more than one block of tokens in each split; the presets' blocks are 128
    // (tiny) to 1024 and more.
    let smallest = s.train_tokens.min(s.val_tokens);
    if smallest <= 1024 {
        let split = if s.val_tokens <= s.train_tokens { "val" } else { "train" };
        eprintln!(
            "note: the {split} split has {smallest} tokens, so model.block_size can be at most {} to train on it (the presets use 128 and up): give more text{}",
            smallest.saturating_sub(1),
            if split == "val" { " or a larger --val-fraction" } else { " or a smaller --val-fraction" }
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct SampleArgs {
    /// A run directory (run.out_dir; its latest checkpoint is used) or a checkpoints/step_* directory.
    #[arg(long, value_name = "DIR")]
    pub checkpoint: PathBuf,
    /// Text to continue (empty: start from what the tokenizer adds to any text, e.g. Llama 3's
    /// <|begin_of_text|>, else the end-of-text token, else a newline).
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// Number of tokens to generate.
    #[arg(long, default_value_t = 200)]
    pub tokens: usize,
    /// Softmax temperature (lower is more conservative).
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    /// Sample only among the k likeliest tokens (0 = all).
    #[arg(long, default_value_t = 200)]
    pub top_k: i64,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 1337)]
    pub seed: u64,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto", value_parser = |s: &str| s.parse::<DeviceChoice>().map_err(|e| e.to_string()))]
    pub device: DeviceChoice,
}

pub fn sample(a: SampleArgs) -> Result<()> {
    if !(a.temperature.is_finite() && a.temperature > 0.0) {
        return Err(Failure { user: true, message: format!("--temperature {} must be a positive number", a.temperature) });
    }
    if a.top_k < 0 {
        return Err(Failure { user: true, message: format!("--top-k {} must be >= 0 (0 = no limit)", a.top_k) });
    }
    // Printed as it is generated: a long sample shows from its first words.
    let mut emit = |piece: &str| {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(piece.as_bytes());
        let _ = out.flush();
    };
    let args = LibSampleArgs {
        checkpoint: &a.checkpoint,
        prompt: &a.prompt,
        tokens: a.tokens,
        temperature: a.temperature,
        top_k: (a.top_k > 0).then_some(a.top_k),
        seed: a.seed,
        device: a.device,
    };
    sample_from_checkpoint_streaming(&args, Some(&mut emit))?;
    println!();
    Ok(())
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Training-step throughput (tokens/s, step time, MFU) on synthetic tokens.
    Train(BenchTrainArgs),
    /// Collective bandwidth (nccl-tests style) beside a raw MPI baseline; run under mpirun -np N.
    Collectives(crate::bench_collectives::CollectivesArgs),
    /// Data-parallel step: overhead vs the plain step (1 process) and communication efficiency
    /// (under mpirun -np N), overlap on and off.
    Ddp(crate::bench_ddp::DdpArgs),
    /// Weak-scaling table and plot from `bench ddp --json` results (see scripts/scaling.sh).
    Scaling(crate::bench_ddp::ScalingArgs),
    /// Pipeline runs' measured bubble against theory and throughput, table and plot (see
    /// scripts/pipeline_bench.sh).
    Pipeline(crate::bench_pipeline::PipelineArgs),
}

#[derive(Args)]
pub struct BenchTrainArgs {
    #[command(flatten)]
    pub cfg: ConfigArgs,
    /// Micro-batch size (sequences per step); default: the preset's train.batch_size.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Sequence length; default: the preset's model.block_size.
    #[arg(long)]
    pub block: Option<usize>,
    /// Timed steps.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Untimed steps first (allocator, kernels, caches).
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Free the gradients after each step, as PyTorch's `zero_grad(set_to_none=True)` (what the
    /// PyTorch anchor of docs/BENCHMARKS.md's GPU comparison runs); by default they are zeroed in place and stay
    /// allocated, as the trainer's gradient buckets do (4 bytes per parameter more at the peak).
    #[arg(long)]
    pub free_grads: bool,
    /// After the timed steps, profile this many more: the device synchronised after each phase
    /// (forward, backward, clip, optimizer, zero grad), mean milliseconds per phase.
    #[arg(long, value_name = "STEPS", default_value_t = 0)]
    pub profile: usize,
    /// Also write the result as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

pub fn bench(b: BenchCommand) -> Result<()> {
    let a = match b {
        BenchCommand::Train(a) => a,
        BenchCommand::Collectives(c) => return crate::bench_collectives::run(c),
        BenchCommand::Ddp(d) => return crate::bench_ddp::run(d),
        BenchCommand::Scaling(s) => return crate::bench_ddp::scaling(s),
        BenchCommand::Pipeline(p) => return crate::bench_pipeline::run(p),
    };
    let mut sets = a.cfg.sets.clone();
    if let Some(bs) = a.batch {
        sets.push(format!("train.batch_size={bs}"));
    }
    if let Some(t) = a.block {
        sets.push(format!("model.block_size={t}"));
    }
    if a.steps == 0 {
        return Err(Failure { user: true, message: "--steps must be at least 1".into() });
    }
    let cfg = Config::resolve(a.cfg.preset.as_deref(), a.cfg.config.as_deref(), &sets)?;
    crate::files::check_outputs(&[("--json", a.json.as_deref())])?;
    let opts = fabbrica_train::bench::BenchOptions { steps: a.steps, warmup: a.warmup, free_grads: a.free_grads, profile_steps: a.profile };
    let r = fabbrica_train::bench::run(&cfg, opts)?;
    let mfu = r.mfu.map(|m| format!("{:.1}%", 100.0 * m)).unwrap_or_else(|| "n/a (set train.peak_flops)".into());
    println!("device        {}", r.device);
    println!("model         {} parameters, batch {} × block {}, {}", r.params, r.batch, r.block, r.precision);
    println!("step          {:.2} ms (mean of {} steps after {} warm-up)", r.step_ms, r.steps, a.warmup);
    println!("throughput    {:.0} tokens/s", r.tokens_per_s);
    println!("mfu           {mfu}");
    println!("peak memory   {:.2} GiB", r.peak_mem_bytes as f64 / (1u64 << 30) as f64);
    if let Some(b) = r.peak_allocated_bytes {
        println!(
            "peak allocated {:.2} GiB (libtorch's allocator: what train --dry-run estimates, before the CPU's resident overhead)",
            b as f64 / (1u64 << 30) as f64
        );
    }
    if let Some(p) = &r.profile {
        let phases = [
            ("forward", p.forward_ms),
            ("backward", p.backward_ms),
            ("clip", p.clip_ms),
            ("optimizer", p.optimizer_ms),
            ("zero grad", p.zero_grad_ms),
        ];
        let total: f64 = phases.iter().map(|(_, ms)| ms).sum();
        println!("profile       {} steps, the device synchronised after each phase:", p.steps);
        for (name, ms) in phases {
            println!("  {name:<12}{ms:9.2} ms  {:5.1}%", 100.0 * ms / total.max(f64::MIN_POSITIVE));
        }
    }
    if let Some(path) = a.json {
        let v = serde_json::json!({
            "device": r.device, "params": r.params, "batch": r.batch, "block": r.block, "steps": r.steps,
            "step_ms": r.step_ms, "tokens_per_s": r.tokens_per_s, "mfu": r.mfu, "peak_mem_bytes": r.peak_mem_bytes,
            "precision": r.precision, "peak_allocated_bytes": r.peak_allocated_bytes, "free_grads": a.free_grads, "profile": r.profile,
        });
        crate::files::write_bytes(&path, serde_json::to_string_pretty(&v).unwrap().as_bytes())
            .map_err(|e| Failure { user: true, message: format!("cannot write {}: {e}", path.display()) })?;
    }
    Ok(())
}
