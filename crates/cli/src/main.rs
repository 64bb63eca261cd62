//! `fabbrica`: train, prepare, sample, bench, schedule.
//!
//! Errors caused by input (config, data, checkpoints) print one line and exit with code 2;
//! other failures exit with code 1.

mod bench_collectives;
mod bench_ddp;
mod bench_pipeline;
mod commands;
mod doctor;
mod export;
mod files;
mod plan;
mod schedule;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "fabbrica", version, about = "Distributed training runtime for GPT and Llama models (data and pipeline parallelism over MPI/NCCL)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a GPT or Llama model (one process, or many under mpirun/srun).
    Train(commands::TrainArgs),
    /// Tokenize a UTF-8 text file into nanoGPT's train.bin/val.bin/meta.json.
    Prepare(commands::PrepareArgs),
    /// Generate text from a checkpoint.
    Sample(commands::SampleArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(commands::BenchCommand),
    /// Print and dry-run a pipeline schedule (GPipe, 1F1B, interleaved): per-rank actions,
    /// timeline, bubble, activations in flight.
    Schedule(schedule::ScheduleArgs),
    /// Read the flight recorder dumps of a failed or hung job (DIR/flight/rank_<N>.json) and say
    /// which rank to look at: who is behind, where the ranks diverged, who left no dump.
    Doctor(doctor::DoctorArgs),
    /// Write a checkpoint as a Hugging Face model directory (config.json + safetensors),
    /// loadable by transformers' AutoModelForCausalLM.from_pretrained.
    Export(export::ExportArgs),
    /// Plan a training run on a cluster of up to 100,000 GPUs: the best layouts (tp × pp × dp,
    /// micro-batch, recompute, ZeRO) with step time, MFU, memory, time, energy and cost.
    Plan(Box<plan::PlanArgs>),
}

fn main() -> ExitCode {
    // An allocation failure inside fabbrica_train::memory::guard_alloc becomes a one-line error;
    // printing the panic (and a backtrace) first would break that. Other panics print as before.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !fabbrica_train::memory::panic_is_handled(info.payload()) {
            default_hook(info)
        }
    }));
    let cli = Cli::parse();
    // A training run outlives a closed standard output (`train | head`): its lines are written
    // with errors ignored, and SIGPIPE stays ignored as Rust sets it. Every other command's
    // output is its product: a closed pipe ends it quietly, as it ends `ls | head`.
    let training = matches!(&cli.command, Command::Train(a) if !a.dry_run);
    if !training {
        // SAFETY: restoring a signal's default action before any thread is started.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let result = match cli.command {
        Command::Train(a) => commands::train(a),
        Command::Prepare(a) => commands::prepare(a),
        Command::Sample(a) => commands::sample(a),
        Command::Bench(b) => commands::bench(b),
        Command::Schedule(a) => schedule::run(a),
        Command::Doctor(a) => doctor::run(a),
        Command::Plan(a) => plan::run(*a),
        Command::Export(a) => export::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if !e.message.is_empty() {
                // One write: launchers that tag output per write (mpirun --tag-output) keep it whole.
                use std::io::Write;
                let _ = std::io::stderr().write_all(format!("error: {}\n", e.message).as_bytes());
            }
            ExitCode::from(if e.user { 2 } else { 1 })
        }
    }
}
