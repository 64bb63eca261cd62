//! `Config` resolution and validation: layers, schema, types, bounds, architectures.
use super::*;

fn sets(s: &[&str]) -> Vec<String> {
    s.iter().map(|x| x.to_string()).collect()
}

#[test]
fn layers_apply_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.toml");
    std::fs::write(&f, "[train]\nlr = 1e-3\nmax_steps = 7\n[model]\nn_layer = 2\n").unwrap();
    let c = Config::resolve(Some("tiny"), Some(&f), &sets(&["train.max_steps=9", "run.device=cpu"])).unwrap();
    assert_eq!(c.train.lr, 1e-3);
    assert_eq!(c.train.max_steps, 9);
    assert_eq!(c.model.n_layer(), 2);
    assert_eq!(c.run.device, DeviceChoice::Cpu);
    let g = Config::resolve(Some("gpt2-124m"), None, &[]).unwrap();
    assert_eq!((g.model.n_layer(), g.model.n_embd(), g.data.tokenizer.as_str()), (12, 768, "gpt2"));
}

#[test]
fn the_architecture_is_a_tagged_choice_and_the_other_ones_keys_are_refused() {
    let l = Config::resolve(Some("llama-tiny"), None, &sets(&["model.n_kv_head=1", "model.rope_scaling.kind=llama3", "model.rope_scaling.factor=8"]))
        .unwrap();
    let ModelConfig::Llama(m) = &l.model.arch else { panic!("llama-tiny is a llama") };
    assert_eq!((m.n_kv_head, m.rope_scaling.kind.as_str(), m.rope_scaling.factor), (1, "llama3", 8.0));
    // Switching arch on a GPT preset starts from llama's defaults, then the user's keys.
    let s = Config::resolve(Some("tiny"), None, &sets(&["model.arch=llama", "model.n_layer=2"])).unwrap();
    assert!(matches!(&s.model.arch, ModelConfig::Llama(m) if m.n_layer == 2 && m.n_kv_head == 2));
    // A key of the model's architecture section, typed there too.
    let e = Config::resolve(Some("llama-tiny"), None, &sets(&["model.rope_scaling.kind=yarn"])).unwrap_err().to_string();
    assert!(e.starts_with("`model.rope_scaling.kind = \"yarn\"` is invalid") && e.contains("\"llama3\""), "{e}");
    let c = Config::resolve(Some("tiny"), None, &sets(&["model.activation=gelu_tanh"])).unwrap();
    assert!(matches!(&c.model.arch, ModelConfig::Gpt(g) if g.activation == fabbrica_models::Activation::GeluTanh));
    // The same from a file.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("l.toml");
    std::fs::write(&f, "[model]\narch = \"llama\"\nn_kv_head = 4\n[model.rope_scaling]\nkind = \"llama3\"\n").unwrap();
    let c = Config::resolve(None, Some(&f), &[]).unwrap();
    assert!(matches!(&c.model.arch, ModelConfig::Llama(m) if m.n_kv_head == 4 && m.rope_scaling.kind == fabbrica_models::RopeKind::Llama3));
    // The resolved config round-trips through its TOML (checkpoints store it).
    let back: Config = toml::from_str(&c.to_toml()).unwrap();
    assert_eq!(back, c);
    // A key of the other architecture is refused, naming it and the way out.
    for (preset, set, key) in [
        ("tiny", "model.n_kv_head=2", "model.n_kv_head"),
        ("llama-tiny", "model.bias=false", "model.bias"),
        ("tiny", "model.rope_scaling.factor=2", "model.rope_scaling"),
    ] {
        let e = Config::resolve(Some(preset), None, &sets(&[set])).unwrap_err().to_string();
        assert!(e.contains(key) && e.contains("model.arch"), "{set}: {e}");
    }
    let e = Config::resolve(None, None, &sets(&["model.arch=mamba"])).unwrap_err().to_string();
    assert!(e.contains("model.arch") && e.contains("llama"), "{e}");
    let e = Config::resolve(Some("llama-tiny"), None, &sets(&["model.n_kv_head=3"])).unwrap_err().to_string();
    assert!(e.contains("model.n_kv_head") && e.contains("multiple"), "{e}");
    let e = Config::resolve(None, None, &sets(&["train.recompute=some"])).unwrap_err().to_string();
    assert!(e.contains("train.recompute") && e.contains("selective"), "{e}");
    // Every preset resolves.
    for name in PRESET_NAMES {
        Config::resolve(Some(name), None, &[]).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn unknown_keys_presets_and_values_are_named() {
    let e = Config::resolve(None, None, &sets(&["train.lrr=1"])).unwrap_err().to_string();
    assert!(e.contains("train.lrr") && e.contains("train.lr"), "{e}");
    let e = Config::resolve(None, None, &sets(&["bogus.x=1"])).unwrap_err().to_string();
    assert!(e.contains("bogus") && e.contains("model"), "{e}");
    let e = Config::resolve(Some("gpt9"), None, &[]).unwrap_err().to_string();
    assert!(e.contains("gpt9") && e.contains("gpt2-124m"), "{e}");
    let e = Config::resolve(None, None, &sets(&["train.batch_size=0"])).unwrap_err().to_string();
    assert!(e.contains("train.batch_size"), "{e}");
    let e = Config::resolve(None, None, &sets(&["train.max_steps=abc"])).unwrap_err().to_string();
    assert!(e.contains("max_steps"), "{e}");
    let e = Config::resolve(None, None, &sets(&["run.device=tpu"])).unwrap_err().to_string();
    assert!(e.contains("run.device") && e.contains("cuda"), "{e}");
    let e = Config::resolve(None, None, &sets(&["model.n_embd=130"])).unwrap_err().to_string();
    assert!(e.contains("model.n_embd"), "{e}");
    let e = Config::resolve(None, None, &sets(&["noequals"])).unwrap_err().to_string();
    assert!(e.contains("key=value"), "{e}");
    let e = Config::resolve(None, None, &sets(&["train=3"])).unwrap_err().to_string();
    assert!(e.contains("train") && e.contains("section"), "{e}");
}

#[test]
fn malformed_toml_names_the_file_on_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.toml");
    std::fs::write(&f, "[train\nlr = ").unwrap();
    let e = Config::resolve(None, Some(&f), &[]).unwrap_err().to_string();
    assert!(e.contains("bad.toml") && !e.contains('\n'), "{e}");
}

/// The one-line contract: non-empty, no line break.
fn err_line(sets_: &[&str]) -> String {
    let e = Config::resolve(None, None, &sets(sets_)).unwrap_err().to_string();
    assert!(!e.is_empty() && !e.contains('\n') && !e.contains('\r'), "{sets_:?}: {e:?}");
    e
}

#[test]
fn every_numeric_key_is_bounded() {
    // (set, key, a word of the range the message must show)
    let cases = [
        ("comm.timeout_s=1e30", "comm.timeout_s", "604800"),
        ("comm.timeout_s=inf", "comm.timeout_s", "604800"),
        ("comm.timeout_s=0.0001", "comm.timeout_s", "0.001"),
        ("comm.timeout_s=nan", "comm.timeout_s", "604800"),
        ("train.max_steps=1000000000001", "train.max_steps", "1000000000000"),
        ("train.max_steps=0", "train.max_steps", "[1, "),
        ("train.batch_size=1048577", "train.batch_size", "1048576"),
        ("train.grad_accum=9223372036854775807", "train.grad_accum", "1048576"),
        ("train.warmup_steps=9223372036854775807", "train.warmup_steps", "1000000000000"),
        ("train.lr_decay_steps=9223372036854775807", "train.lr_decay_steps", "1000000000000"),
        ("train.log_interval=0", "train.log_interval", "[1, "),
        ("train.eval_interval=9223372036854775807", "train.eval_interval", "1000000000000"),
        ("train.eval_iters=10000000", "train.eval_iters", "1000000"),
        ("train.max_skipped_steps=9223372036854775807", "train.max_skipped_steps", "1000000000000"),
        ("train.weight_decay=1e9", "train.weight_decay", "100"),
        ("train.eps=0", "train.eps", "(0, 1]"),
        ("train.grad_clip=inf", "train.grad_clip", "1000000"),
        ("train.peak_flops=1e30", "train.peak_flops", "100000000000000000000"),
        ("train.lr=inf", "train.lr", "finite"),
        ("run.threads=4097", "run.threads", "4096"),
        ("run.keep_checkpoints=0", "run.keep_checkpoints", "[1, "),
        ("run.keep_checkpoints=10000000", "run.keep_checkpoints", "1000000"),
        ("run.sample_tokens=9223372036854775807", "run.sample_tokens", "1000000"),
        ("run.stop_at=9223372036854775807", "run.stop_at", "1000000000000"),
        ("run.checkpoint_interval=9223372036854775807", "run.checkpoint_interval", "1000000000000"),
        ("parallel.bucket_mb=1e6", "parallel.bucket_mb", "100000"),
        ("parallel.bucket_mb=0", "parallel.bucket_mb", "0.001"),
        ("parallel.dp=9223372036854775807", "parallel.dp", "1048576"),
        ("model.n_layer=100000", "model.n_layer", "1024"),
        ("model.block_size=9223372036854775807", "model.block_size", "1048576"),
        ("model.vocab_size=16777217", "model.vocab_size", "16777216"),
        ("model.dropout=1", "model.dropout", "[0, 1)"),
    ];
    for (set, key, range) in cases {
        let e = err_line(&[set]);
        assert!(e.contains(key) && e.contains(range), "{set}: {e}");
        assert!(e.contains("set e.g.") || e.contains("set model.vocab_size") || e.contains("e.g. train.lr"), "{set}: no fix in {e}");
    }
    // No single key is over its bound here, but the product is.
    let e = err_line(&["train.batch_size=1048576", "train.grad_accum=1048576"]);
    assert!(e.contains("tokens per rank per step"), "{e}");
    // The bounds themselves are accepted, and lr has no upper bound (NaN tests use 1e6).
    let c = Config::resolve(
        None,
        None,
        &sets(&[
            "comm.timeout_s=604800",
            "train.lr=1e6",
            "train.min_lr=0",
            "run.threads=4096",
            "train.max_steps=1000000000000",
            "parallel.bucket_mb=0.001",
        ]),
    )
    .unwrap();
    assert_eq!((c.comm.timeout_s, c.train.lr, c.run.threads), (604800.0, 1e6, 4096));
    assert!(Config::resolve(None, None, &sets(&["comm.timeout_s=0.001"])).is_ok());
}

#[test]
fn wrong_types_name_the_key_and_an_example() {
    let e = err_line(&["train.max_steps=abc"]);
    assert_eq!(e, "`train.max_steps = \"abc\"` has the wrong type: expected an integer, e.g. train.max_steps=600");
    let e = err_line(&["train.max_steps=-5"]);
    assert!(e.contains("train.max_steps") && e.contains("non-negative integer"), "{e}");
    let e = err_line(&["train.max_steps=5e3"]);
    assert!(e.contains("expected an integer"), "{e}");
    let e = err_line(&["train.lr=fast"]);
    assert!(e.contains("`train.lr = \"fast\"`") && e.contains("expected a number, e.g. train.lr=0.002"), "{e}");
    let e = err_line(&["run.resume=yes"]);
    assert!(e.contains("run.resume") && e.contains("true, false or \"auto\""), "{e}");
    let c = Config::resolve(None, None, &sets(&["run.resume=auto"])).unwrap();
    assert_eq!(c.run.resume, Resume::Auto);
    let back: Config = toml::from_str(&c.to_toml()).unwrap();
    assert_eq!(back.run.resume, Resume::Auto);
    assert_eq!(Config::resolve(None, None, &sets(&["run.resume=true"])).unwrap().run.resume, Resume::Yes);
    let e = err_line(&["train.batch_size=[1, 2]"]);
    assert!(e.contains("train.batch_size") && e.contains("an integer"), "{e}");
    // An integer where a float goes is fine; a number where a string goes is that text.
    let c = Config::resolve(None, None, &sets(&["train.lr=1", "run.out_dir=2024", "run.device=cpu"])).unwrap();
    assert_eq!((c.train.lr, c.run.out_dir.as_path()), (1.0, Path::new("2024")));
    // The same checks apply to a file, where a string key needs a string.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.toml");
    std::fs::write(&f, "[run]\nout_dir = 5\n").unwrap();
    let e = Config::resolve(None, Some(&f), &[]).unwrap_err().to_string();
    assert!(e.contains("run.out_dir") && e.contains("a string") && e.contains("run.out_dir=\"runs/tiny\""), "{e}");
    std::fs::write(&f, "[parallel]\nzero = 300\n").unwrap();
    let e = Config::resolve(None, Some(&f), &[]).unwrap_err().to_string();
    assert!(e.contains("zero") && !e.contains('\n'), "{e}");
}

#[test]
fn control_characters_stay_on_one_line() {
    let e = err_line(&["run.device=tp\nu"]);
    assert!(e.contains("run.device") && e.contains("\\n"), "{e}");
    let e = err_line(&["train.lr=1\nmax_steps = 5"]);
    assert!(e.contains("train.lr") && e.contains("a number"), "{e}");
    let e = err_line(&["train.l\nr=1"]);
    assert!(e.contains("train.l\\nr"), "{e}");
    let e = err_line(&["no\nequals"]);
    assert!(e.contains("key=value"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.toml");
    std::fs::write(&f, "[train]\n\"a\\nb\" = 1\n").unwrap();
    let e = Config::resolve(None, Some(&f), &[]).unwrap_err().to_string();
    assert!(e.contains("train.a\\nb") && !e.contains('\n'), "{e}");
}

#[test]
fn round_trips_through_toml() {
    let c = Config::resolve(Some("gpt2-350m"), None, &sets(&["train.lr=3e-4"])).unwrap();
    let back: Config = toml::from_str(&c.to_toml()).unwrap();
    assert_eq!(c, back);
}

/// Every enum-valued key is parsed once, into its type, when the config is read: a good value
/// arrives typed (and is written back as its spelling), a bad one is one line naming the key,
/// the value as given and what to set.
#[test]
fn enum_valued_keys_are_parsed_once_with_one_line_errors() {
    let c = Config::resolve(
        None,
        None,
        &sets(&[
            "train.dtype=fp32",
            "run.device=cpu",
            "parallel.reduce_dtype=bf16",
            "train.fused_adamw=off",
            "train.nonfinite=skip",
            "run.if_exists=archive",
            "run.checkpoint_failure=continue",
            "comm.backend=mpi",
            "train.recompute=selective",
            "parallel.order=tp-pp-dp",
            "parallel.schedule=gpipe",
        ]),
    )
    .unwrap();
    assert_eq!((c.train.dtype, c.run.device, c.parallel.reduce_dtype), (Dtype::Fp32, DeviceChoice::Cpu, ReduceDtype::Bf16));
    assert_eq!((c.train.fused_adamw, c.train.nonfinite), (Fused::Off, Nonfinite::Skip));
    assert_eq!((c.run.if_exists, c.run.checkpoint_failure), (IfExists::Archive, CheckpointFailure::Continue));
    assert_eq!(c.comm.backend, fabbrica_comm::BackendChoice::Mpi);
    assert_eq!(c.train.recompute, Recompute::Selective);
    assert_eq!(c.parallel.order, fabbrica_topology::RankOrder::TpPpDp);
    assert_eq!(c.parallel.schedule, fabbrica_pipeline::Kind::GPipe);
    assert!(!c.fused_adamw());
    // train.tf32: on by default (as the PyTorch anchor sets it), a plain boolean.
    assert!(Config::resolve(None, None, &[]).unwrap().train.tf32);
    assert!(!Config::resolve(None, None, &sets(&["train.tf32=false"])).unwrap().train.tf32);
    let e = err_line(&["train.tf32=maybe"]);
    assert!(e.contains("train.tf32") && e.contains("maybe") && e.contains("true or false"), "{e}");
    // Written back as the spellings, and read again to the same config.
    let text = c.to_toml();
    for line in ["dtype = \"fp32\"", "reduce_dtype = \"bf16\"", "recompute = \"selective\"", "order = \"tp-pp-dp\"", "schedule = \"gpipe\""] {
        assert!(text.contains(line), "{line} missing in\n{text}");
    }
    let back: Config = toml::from_str(&text).unwrap();
    assert_eq!(back, c);

    for (set, key, advice) in [
        ("train.dtype=fp16", "train.dtype", "`bf16`"),
        ("run.device=tpu", "run.device", "`cuda`"),
        ("parallel.reduce_dtype=fp8", "parallel.reduce_dtype", "`bf16`"),
        ("train.fused_adamw=yes", "train.fused_adamw", "`off`"),
        ("train.nonfinite=ignore", "train.nonfinite", "`skip`"),
        ("run.if_exists=overwrite", "run.if_exists", "`archive`"),
        ("run.checkpoint_failure=retry", "run.checkpoint_failure", "`continue`"),
        ("comm.backend=gloo", "comm.backend", "`nccl`"),
        ("train.recompute=some", "train.recompute", "`selective`"),
        ("parallel.order=pp-tp", "parallel.order", "\"tp-pp-dp\""),
        ("parallel.schedule=zigzag", "parallel.schedule", "interleaved"),
        ("model.activation=relu", "model.activation", "\"gelu_tanh\""),
    ] {
        let e = err_line(&[set]);
        let value = set.split_once('=').unwrap().1;
        assert!(e.contains(key) && e.contains(value) && e.contains(advice), "{set}: {e}");
        assert_eq!(e.matches(key).count(), 1, "{set}: the key once: {e}");
    }
    // A key of the model's architecture section, typed there too.
    let e = Config::resolve(Some("llama-tiny"), None, &sets(&["model.rope_scaling.kind=yarn"])).unwrap_err().to_string();
    assert!(e.starts_with("`model.rope_scaling.kind = \"yarn\"` is invalid") && e.contains("\"llama3\""), "{e}");
    let c = Config::resolve(Some("tiny"), None, &sets(&["model.activation=gelu_tanh"])).unwrap();
    assert!(matches!(&c.model.arch, ModelConfig::Gpt(g) if g.activation == fabbrica_models::Activation::GeluTanh));
    // The same from a file.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.toml");
    std::fs::write(&f, "[train]\ndtype = \"half\"\n").unwrap();
    let e = Config::resolve(None, Some(&f), &[]).unwrap_err().to_string();
    assert!(e.contains("train.dtype") && e.contains("half") && e.contains("`fp32`") && !e.contains('\n'), "{e}");
}
