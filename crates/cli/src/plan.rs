//! `fabbrica plan`: the best layouts of a model on a cluster for one or more GPU counts, with
//! step time, MFU, memory and the cost to train (`crates/planner`); `--explain` breaks one layout
//! down; `fabbrica plan calibrate` writes a cluster file from `bench collectives` and
//! `bench train` results.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use fabbrica_planner::calibrate::{fit_compute, fit_link, parse_collectives, parse_train};
use fabbrica_planner::report::{estimate_json, explain, header, model_json, row, train_cost, unfit_reason};
use fabbrica_planner::{Cluster, Execution, Forced, ModelShape, PlanError, Planner, Workload};

use crate::commands::Failure;

type Result<T> = std::result::Result<T, Failure>;

impl From<PlanError> for Failure {
    fn from(e: PlanError) -> Self {
        Failure { user: e.user, message: e.message }
    }
}

fn user(message: String) -> Failure {
    Failure { user: true, message }
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct PlanArgs {
    #[command(subcommand)]
    pub command: Option<PlanCommand>,
    /// A trainer preset: tiny, gpt2-124m ... gpt2-1.5b, llama-tiny, llama3.2-1b ... llama3.1-405b.
    #[arg(long, value_name = "NAME")]
    pub model: Option<String>,
    /// A trainer config file ([model] section over the preset, as `fabbrica train --config`).
    #[arg(long, value_name = "FILE.toml")]
    pub config: Option<PathBuf>,
    /// a100, h100-sxm, h200, b200, cpu, or a cluster TOML file.
    #[arg(long, value_name = "PRESET|FILE.toml")]
    pub cluster: Option<String>,
    /// GPU counts, comma-separated, e.g. 8,64,512,4096,32768,100000.
    #[arg(long, value_name = "N[,N...]")]
    pub gpus: Option<String>,
    /// Sequences per optimizer step.
    #[arg(long, default_value_t = 1024)]
    pub global_batch: usize,
    /// Sequence length (default: the model's context length).
    #[arg(long)]
    pub seq: Option<usize>,
    /// Tokens to train on (K, M, B/G, T suffixes): time, GPU-hours, energy and cost to train.
    #[arg(long, value_name = "N")]
    pub tokens: Option<String>,
    /// Layouts shown per GPU count.
    #[arg(long, default_value_t = 5)]
    pub top: usize,
    /// One layout's whole breakdown: tp=8,pp=8,dp=16,v=2,mb=1,recompute=selective,zero=1 (keys left
    /// out are chosen by the search).
    #[arg(long, value_name = "KEY=VALUE,...")]
    pub explain: Option<String>,
    /// Also list the fastest layouts that do not fit in memory, with the reason.
    #[arg(long)]
    pub show_unfit: bool,
    /// Write every figure as JSON into this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Plot MFU and time to train (tokens/s without --tokens) against GPU count into this SVG.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum PlanCommand {
    /// Fit a cluster file from `bench collectives --json` and `bench train --json` results.
    Calibrate(CalibrateArgs),
}

#[derive(Args)]
pub struct CalibrateArgs {
    /// `bench collectives --json` results inside one node (repeatable).
    #[arg(long, value_name = "FILE")]
    pub collectives: Vec<PathBuf>,
    /// `bench collectives --json` results between nodes (repeatable).
    #[arg(long, value_name = "FILE")]
    pub inter: Vec<PathBuf>,
    /// `bench train --json` results (repeatable), all of --model.
    #[arg(long, value_name = "FILE")]
    pub train: Vec<PathBuf>,
    /// The trainer preset the --train results ran.
    #[arg(long, value_name = "NAME")]
    pub model: Option<String>,
    /// A trainer config file the --train results ran.
    #[arg(long, value_name = "FILE.toml")]
    pub config: Option<PathBuf>,
    /// The cluster whose other keys the file keeps.
    #[arg(long, default_value = "cpu", value_name = "PRESET")]
    pub base: String,
    /// Where to write the cluster TOML.
    #[arg(long, value_name = "FILE.toml")]
    pub out: PathBuf,
}

/// A count with an optional K, M, B/G or T suffix (powers of 1000).
fn parse_count(text: &str, flag: &str) -> Result<f64> {
    let t = text.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1e3,
                'M' => 1e6,
                'B' | 'G' => 1e9,
                'T' => 1e12,
                _ => return Err(user(format!("{flag} {t:?}: unknown suffix {c:?} (use K, M, B or T), e.g. {flag} 15T"))),
            };
            (&t[..i], m)
        }
        _ => (t, 1.0),
    };
    match num.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 && x * mult < 1e20 => Ok(x * mult),
        _ => Err(user(format!("{flag} {t:?} is not a positive count, e.g. {flag} 15T"))),
    }
}

fn parse_gpus(text: &str) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim) {
        match part.parse::<usize>() {
            Ok(n) if (1..=10_000_000).contains(&n) => out.push(n),
            _ => return Err(user(format!("--gpus {text:?}: {part:?} is not a GPU count in [1, 10000000]; e.g. --gpus 8,64,512"))),
        }
    }
    Ok(out)
}

/// The model as the trainer resolves it (preset ← config file), at `seq`.
fn resolve_model(model: Option<&str>, config: Option<&std::path::Path>, seq: Option<usize>) -> Result<ModelShape> {
    if model.is_none() && config.is_none() {
        return Err(user("no model: give --model NAME (a trainer preset) or --config FILE.toml".into()));
    }
    let cfg = fabbrica_train::Config::resolve(model, config, &[])?;
    let name = match (model, config) {
        (_, Some(p)) => p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "config".into()),
        (Some(m), None) => m.to_string(),
        (None, None) => unreachable!("checked above"),
    };
    Ok(ModelShape::from_config(&name, &cfg.model, seq.unwrap_or(cfg.model.block_size()))?)
}

fn write(path: &std::path::Path, text: &str, flag: &str) -> Result<()> {
    crate::files::write_bytes(path, text.as_bytes())
        .map_err(|e| user(format!("{flag} {}: cannot write ({e}): choose a writable path", path.display())))
}

pub fn run(a: PlanArgs) -> Result<()> {
    if let Some(PlanCommand::Calibrate(c)) = a.command {
        return calibrate(c);
    }
    if let Some(p) = &a.plot {
        if !p.extension().is_some_and(|e| e.eq_ignore_ascii_case("svg")) {
            return Err(user(format!("--plot {}: the plot is drawn as SVG: use a file name ending in .svg", p.display())));
        }
    }
    crate::files::check_outputs(&[("--json", a.json.as_deref()), ("--plot", a.plot.as_deref())])?;
    let cluster =
        Cluster::resolve(a.cluster.as_deref().ok_or_else(|| user("no cluster: give --cluster a100|h100-sxm|h200|b200|cpu|FILE.toml".into()))?)?;
    let model = resolve_model(a.model.as_deref(), a.config.as_deref(), a.seq)?;
    let counts = parse_gpus(a.gpus.as_deref().ok_or_else(|| user("no GPU count: give --gpus N (or a list, e.g. --gpus 8,64,512)".into()))?)?;
    if a.global_batch == 0 || a.global_batch > 1 << 24 {
        return Err(user(format!("--global-batch {} must be in [1, {}] sequences", a.global_batch, 1 << 24)));
    }
    if a.top == 0 || a.top > 1000 {
        return Err(user(format!("--top {} must be in [1, 1000]", a.top)));
    }
    let tokens = a.tokens.as_deref().map(|t| parse_count(t, "--tokens")).transpose()?;
    let forced = match &a.explain {
        Some(spec) => {
            let f = Forced::parse(spec)?;
            if counts.len() != 1 {
                return Err(user(format!("--explain takes one GPU count, got --gpus {}", a.gpus.as_deref().unwrap_or(""))));
            }
            f.check_gpus(counts[0])?;
            f
        }
        None => Forced::default(),
    };
    let mut planner = Planner::new(&model, &cluster, Workload { global_batch: a.global_batch }, Execution::default());
    let mut found = Vec::new();
    for &n in &counts {
        found.push(planner.search(n, &forced, if a.explain.is_some() { 1 } else { a.top })?);
    }
    if found.iter().all(|f| f.best.is_empty()) {
        return Err(fits_nowhere(&mut planner, &found, &model, &cluster, a.global_batch)?);
    }
    if a.explain.is_some() {
        return explain_one(&a, &model, &cluster, &found[0], tokens);
    }
    println!(
        "{} ({} parameters, {:.3e} FLOPs/token at seq {}) on {} (peak {} TFLOP/s, {} GiB per GPU), global batch {} × {} tokens",
        model.name, model.params, model.flops_per_token, model.seq, cluster.name, cluster.peak_tflops, cluster.hbm_gib, a.global_batch, model.seq
    );
    let mut results = Vec::new();
    let mut points = Vec::new();
    for f in &found {
        println!("\n{} GPUs: {} layouts considered, {} simulated; step split in % of the step", f.gpus, f.considered, f.simulated);
        if f.best.is_empty() {
            println!(
                "  no layout fits in {:.1} GiB per GPU{}",
                cluster.usable_bytes() / fabbrica_planner::GIB,
                if a.show_unfit { ":" } else { " (--show-unfit says why)" }
            );
        } else {
            println!("{}", header(tokens.is_some()));
        }
        let mut best = Vec::new();
        for (i, e) in f.best.iter().enumerate() {
            let cost = tokens.map(|t| train_cost(e, &cluster, t));
            println!("{}", row(i + 1, e, cost.as_ref()));
            best.push(estimate_json(e, cost.as_ref()));
        }
        if let Some(e) = f.best.first() {
            let cost = tokens.map(|t| train_cost(e, &cluster, t));
            let second = cost.map_or(e.tokens_per_s, |c| c.time_s / 86400.0);
            points.push(fabbrica_planner::plot::Point {
                gpus: f.gpus as f64,
                mfu: e.mfu,
                second,
                label: format!("tp{} pp{} dp{}", e.layout.tp, e.layout.pp, e.layout.dp),
            });
        }
        if a.show_unfit {
            for e in &f.unfit {
                println!("  does not fit: {}: {}", e.layout.spec(), unfit_reason(e));
            }
        }
        let unfit: Vec<_> = f
            .unfit
            .iter()
            .map(|e| serde_json::json!({"layout": e.layout.spec(), "reason": unfit_reason(e), "estimate": estimate_json(e, None)}))
            .collect();
        results.push(serde_json::json!({"gpus": f.gpus, "considered": f.considered, "simulated": f.simulated, "best": best, "unfit": unfit}));
    }
    if let Some(path) = &a.json {
        let doc = serde_json::json!({
            "model": model_json(&model), "cluster": cluster, "global_batch": a.global_batch, "tokens": tokens, "results": results,
        });
        write(path, &(serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n"), "--json")?;
        println!("json: {}", path.display());
    }
    if let Some(path) = &a.plot {
        let title = format!("{} on {}: best layout per GPU count (global batch {} × {})", model.name, cluster.name, a.global_batch, model.seq);
        let axis = if tokens.is_some() { "days to train" } else { "tokens/s" };
        let (svg, text) = fabbrica_planner::plot::svg(&title, &points, axis)
            .map_err(|e| Failure { user: false, message: format!("--plot {}: {e}", path.display()) })?;
        write(path, &svg, "--plot")?;
        println!("plot: {}{}", path.display(), if text { "" } else { " (drawn without text: no usable font)" });
    }
    Ok(())
}

/// The one-line error for a model that fits on none of the GPU counts asked.
fn fits_nowhere(planner: &mut Planner, found: &[fabbrica_planner::Found], model: &ModelShape, c: &Cluster, batch: usize) -> Result<Failure> {
    let counts: Vec<String> = found.iter().map(|f| f.gpus.to_string()).collect();
    let leanest = found.iter().flat_map(|f| f.unfit.first()).min_by(|a, b| a.memory.total().total_cmp(&b.memory.total()));
    let why = leanest.map(|e| format!(" (the leanest, {}, {})", e.layout.spec(), unfit_reason(e))).unwrap_or_default();
    let fix = match planner.smallest_fit()? {
        Some(l) => format!("it would fit on {} GPUs ({})", l.gpus(), l.spec()),
        None => format!("it fits on no number of {} GPUs at --global-batch {batch}: a larger batch or a GPU with more memory", c.name),
    };
    Ok(user(format!("{} fits nowhere on {} GPUs of {}{why}: {fix}", model.name, counts.join(", "), c.name)))
}

fn explain_one(a: &PlanArgs, model: &ModelShape, c: &Cluster, f: &fabbrica_planner::Found, tokens: Option<f64>) -> Result<()> {
    let e = f
        .best
        .first()
        .or(f.unfit.first())
        .ok_or_else(|| user(format!("--explain {}: no layout of {} GPUs matches it", a.explain.as_deref().unwrap_or(""), f.gpus)))?;
    let cost = tokens.map(|t| train_cost(e, c, t));
    print!("{}", explain(model, c, e, cost.as_ref()));
    if !e.fits() {
        println!("note: this layout does not fit: {}", unfit_reason(e));
    }
    if let Some(path) = &a.json {
        let mut v = estimate_json(e, cost.as_ref());
        if let serde_json::Value::Object(m) = &mut v {
            m.insert("model".into(), model_json(model));
            m.insert("cluster".into(), serde_json::to_value(c).unwrap_or_default());
        }
        write(path, &(serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"), "--json")?;
        println!("json: {}", path.display());
    }
    Ok(())
}

fn calibrate(a: CalibrateArgs) -> Result<()> {
    let mut c = Cluster::preset(&a.base)
        .ok_or_else(|| user(format!("--base {:?} is not a preset: use one of {}", a.base, fabbrica_planner::PRESETS.join(", "))))?;
    c.name = a.out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "calibrated".into());
    if a.collectives.is_empty() && a.inter.is_empty() && a.train.is_empty() {
        return Err(user("nothing to calibrate from: give --collectives FILE, --inter FILE and/or --train FILE".into()));
    }
    let read = |p: &PathBuf| {
        fabbrica_data::bounded::read_to_string(p, crate::files::MAX_INPUT_BYTES).map_err(|e| user(format!("cannot read {}: {e}", p.display())))
    };
    for (files, intra) in [(&a.collectives, true), (&a.inter, false)] {
        if files.is_empty() {
            continue;
        }
        let mut fits = Vec::new();
        for p in files.iter() {
            let t = parse_collectives(&read(p)?, &p.display().to_string())?;
            let (alpha, beta) = fit_link(&t).map_err(|e| user(format!("{}: {}", p.display(), e.message)))?;
            println!(
                "{}: {} over {} ranks: latency {:.2} µs per step, bus bandwidth {:.3} GB/s",
                p.display(),
                t.op,
                t.world_size,
                alpha * 1e6,
                beta / 1e9
            );
            fits.push((alpha, beta));
        }
        let n = fits.len() as f64;
        let (alpha, beta) = (fits.iter().map(|f| f.0).sum::<f64>() / n, fits.iter().map(|f| f.1).sum::<f64>() / n);
        let (lat, bw) = (f64::max(alpha * 1e6, 1e-3), beta / 1e9);
        if intra {
            (c.intra_latency_us, c.intra_gbps) = (lat, bw);
        } else {
            (c.inter_latency_us, c.inter_gbps) = (lat, bw);
        }
    }
    if !a.train.is_empty() {
        let mut runs = Vec::new();
        for p in &a.train {
            let bench = parse_train(&read(p)?, &p.display().to_string())?;
            let model = resolve_model(a.model.as_deref(), a.config.as_deref(), Some(bench.block))?;
            runs.push((model, bench));
        }
        let found = fit_compute(&mut c, &runs)?;
        for ((m, b), f) in runs.iter().zip(&found) {
            println!(
                "{}: {} at batch {} × {}: {:.0} tokens/s = matmul efficiency {:.3} of {:.4} TFLOP/s",
                m.name, m.params, b.batch, b.block, b.tokens_per_s, f, c.peak_tflops
            );
        }
    }
    c.validate()?;
    write(
        &a.out,
        &format!("# Written by `fabbrica plan calibrate` from measurements; keys not measured are the {} preset's.\n{}", a.base, c.to_toml()),
        "--out",
    )?;
    println!("cluster: {}", a.out.display());
    Ok(())
}
