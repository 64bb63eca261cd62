//! Hugging Face interop against `transformers` itself (the project venv, nothing downloaded):
//! tiny random GPT-2 and Llama models made by `from_config` load into fabbrica with the same
//! logits, loss and gradients; fabbrica's export loads back bit-identically; bad directories are
//! refused with one line naming the file or tensor.

mod common;

use std::path::Path;

use fabbrica_models::{Model, ModelConfig, StageSpec};
use fabbrica_train::hf;
use tch::{Device, Kind, Tensor};

use common::hf_reference as python;

fn get(ts: &[(String, Tensor)], name: &str) -> Tensor {
    ts.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no {name}")).1.shallow_clone()
}

/// Largest absolute difference relative to the largest magnitude of `want`.
fn rel_diff(got: &Tensor, want: &Tensor) -> f64 {
    let d = (got - want).abs().max().double_value(&[]);
    d / want.abs().max().double_value(&[]).max(1e-12)
}

/// Loads `dir/model` into fabbrica and checks logits, loss and every gradient against
/// `dir/ref.safetensors` (what transformers computed).
fn check_against_reference(dir: &Path) -> ModelConfig {
    let cfg = hf::read_config(&dir.join("model")).unwrap();
    let weights = hf::read_weights(&dir.join("model"), &cfg).unwrap();
    let model = Model::build(&cfg, Device::Cpu, &StageSpec::whole(cfg.n_layer()), 0).unwrap();
    model.load_parameters(&weights).unwrap();
    let r = Tensor::read_safetensors(dir.join("ref.safetensors")).unwrap();
    let logits = model.forward(&get(&r, "ids"), true);
    // fp32 throughout; the two implementations order some sums differently.
    let dl = rel_diff(&logits, &get(&r, "logits"));
    assert!(dl < 1e-5, "{}: logits differ by {dl:e} (relative)", cfg.arch());
    let loss = Model::cross_entropy(&logits, &get(&r, "targets"));
    let want = get(&r, "loss").double_value(&[0]);
    assert!((loss.double_value(&[]) - want).abs() < 1e-5 * want.abs(), "loss {} vs {want}", loss.double_value(&[]));
    loss.backward();
    let gpt = matches!(cfg, ModelConfig::Gpt(_));
    let mut checked = 0;
    for (name, p) in model.parameters() {
        let mut g = p.grad();
        let conv1d = gpt && name.ends_with(".weight") && [".c_attn.", ".c_proj.", ".c_fc."].iter().any(|s| name.contains(s));
        if conv1d {
            g = g.transpose(0, 1);
        }
        let d = rel_diff(&g, &get(&r, &format!("grad.{name}")));
        assert!(d < 1e-4, "{}: gradient of {name} differs by {d:e} (relative)", cfg.arch());
        checked += 1;
    }
    assert_eq!(checked, model.parameters().len());
    assert!(checked > 10);
    cfg
}

#[test]
fn transformers_models_load_with_the_same_logits_loss_and_gradients() {
    let cases: [(&str, &[&str]); 5] = [
        ("gpt2", &[]),
        ("gpt2", &["--untied"]),
        ("llama", &[]),
        // Grouped-query attention and Llama 3.1's RoPE scaling (its original context of 8 is
        // shorter than the 16 tokens, so the scaled frequencies matter).
        ("llama", &["--kv-heads", "2", "--rope-scaling"]),
        ("llama", &["--kv-heads", "1", "--tied"]),
    ];
    for (arch, extra) in cases {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().to_str().unwrap();
        let mut args = vec!["make", "--arch", arch, "--out", out];
        args.extend_from_slice(extra);
        python(&args);
        let cfg = check_against_reference(dir.path());
        if let (ModelConfig::Llama(l), true) = (&cfg, extra.contains(&"--rope-scaling")) {
            assert_eq!((l.n_kv_head, l.rope_scaling.kind.as_str(), l.rope_scaling.factor), (2, "llama3", 8.0));
        }
    }
}

#[test]
fn a_loaded_model_exports_back_bit_identically_and_transformers_reads_it() {
    for (arch, extra) in [("gpt2", vec![]), ("llama", vec!["--kv-heads", "2", "--rope-scaling"])] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().to_str().unwrap();
        let mut args = vec!["make", "--arch", arch, "--out", out];
        args.extend(extra);
        python(&args);
        let src = dir.path().join("model");
        let cfg = hf::read_config(&src).unwrap();
        let weights = hf::read_weights(&src, &cfg).unwrap();
        let model = Model::build(&cfg, Device::Cpu, &StageSpec::whole(cfg.n_layer()), 0).unwrap();
        model.load_parameters(&weights).unwrap();
        // Whole, then sharded into several files with an index.
        for (name, shard) in [("whole", hf::DEFAULT_MAX_SHARD_BYTES), ("sharded", 20_000)] {
            let exp = dir.path().join(name);
            hf::export(&cfg, model.parameters(), &exp, shard, false, &[]).unwrap();
            assert_eq!(exp.join(hf::INDEX_FILE).exists(), name == "sharded");
            let said = python(&["compare", src.to_str().unwrap(), exp.to_str().unwrap()]);
            assert!(said.contains("tensors identical"), "{said}");
            // transformers loads it with no code of ours and computes the same logits.
            let ids = Tensor::randint(101, [2, 16], (Kind::Int64, Device::Cpu));
            let ids_file = dir.path().join(format!("ids-{name}.safetensors"));
            Tensor::write_safetensors(&[("ids", &ids)], &ids_file).unwrap();
            let lf = dir.path().join(format!("logits-{name}.safetensors"));
            python(&["logits", exp.to_str().unwrap(), "--ids", ids_file.to_str().unwrap(), "--out", lf.to_str().unwrap()]);
            let theirs = get(&Tensor::read_safetensors(&lf).unwrap(), "logits");
            let ours = tch::no_grad(|| model.forward(&ids, false));
            let d = rel_diff(&ours, &theirs);
            assert!(d < 1e-5, "{arch} {name}: logits of the export differ by {d:e}");
        }
        // An existing directory is never overwritten.
        let e = hf::export(&cfg, model.parameters(), &dir.path().join("whole"), hf::DEFAULT_MAX_SHARD_BYTES, false, &[]).unwrap_err();
        assert!(e.contains("exists"), "{e}");
    }
}

#[test]
fn bad_model_directories_are_one_line_naming_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    python(&["make", "--arch", "llama", "--out", out, "--kv-heads", "2"]);
    let src = dir.path().join("model");
    let cfg = hf::read_config(&src).unwrap();
    let one_line = |e: &str| assert!(!e.contains('\n'), "not one line: {e}");

    // Not a model directory.
    let e = hf::read_config(dir.path()).unwrap_err();
    one_line(&e);
    assert!(e.contains("config.json") && e.contains("model.init_from"), "{e}");
    // Unknown model_type.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("config.json"), r#"{"model_type": "mamba"}"#).unwrap();
    let e = hf::read_config(&other).unwrap_err();
    assert!(e.contains("mamba") && e.contains("llama"), "{e}");
    // Malformed and oversized config.json.
    std::fs::write(other.join("config.json"), "{not json").unwrap();
    assert!(hf::read_config(&other).unwrap_err().contains("not valid JSON"));
    std::fs::write(other.join("config.json"), vec![b' '; (hf::MAX_JSON_BYTES + 1) as usize]).unwrap();
    assert!(hf::read_config(&other).unwrap_err().contains("more than"));
    // No weights.
    std::fs::write(other.join("config.json"), std::fs::read(src.join("config.json")).unwrap()).unwrap();
    let e = hf::read_weights(&other, &cfg).unwrap_err();
    assert!(e.contains("model.safetensors"), "{e}");

    // A missing, an extra and a misshapen tensor, each named.
    let tensors = Tensor::read_safetensors(src.join("model.safetensors")).unwrap();
    let write = |ts: &[(String, Tensor)]| {
        let refs: Vec<(&str, &Tensor)> = ts.iter().map(|(n, t)| (n.as_str(), t)).collect();
        Tensor::write_safetensors(&refs, other.join("model.safetensors")).unwrap();
    };
    let victim = "model.layers.1.self_attn.k_proj.weight";
    write(&tensors.iter().filter(|(n, _)| n != victim).map(|(n, t)| (n.clone(), t.shallow_clone())).collect::<Vec<_>>());
    let e = hf::read_weights(&other, &cfg).unwrap_err();
    one_line(&e);
    assert!(e.contains(victim) && e.contains("no tensor"), "{e}");
    let mut extra: Vec<(String, Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
    extra.push(("model.layers.9.mlp.up_proj.weight".into(), Tensor::zeros([2], (Kind::Float, Device::Cpu))));
    write(&extra);
    let e = hf::read_weights(&other, &cfg).unwrap_err();
    assert!(e.contains("model.layers.9.mlp.up_proj.weight") && e.contains("unexpected"), "{e}");
    let misshapen: Vec<(String, Tensor)> =
        tensors.iter().map(|(n, t)| (n.clone(), if n == victim { t.narrow(0, 0, 8) } else { t.shallow_clone() })).collect();
    write(&misshapen);
    let e = hf::read_weights(&other, &cfg).unwrap_err();
    assert!(e.contains(victim) && e.contains("shape"), "{e}");

    // An index naming a file outside the directory.
    std::fs::remove_file(other.join("model.safetensors")).unwrap();
    std::fs::write(other.join(hf::INDEX_FILE), r#"{"weight_map": {"model.norm.weight": "../model/model.safetensors"}}"#).unwrap();
    let e = hf::read_weights(&other, &cfg).unwrap_err();
    assert!(e.contains("plain"), "{e}");
}

/// GPT-2's Conv1D weights are transposed on the way in: a tensor of the wrong rank or shape under
/// such a name is a one-line error naming it and both layouts, not a crash in the transpose.
#[test]
fn misshapen_gpt2_conv1d_weights_are_named_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    python(&["make", "--arch", "gpt2", "--out", dir.path().to_str().unwrap()]);
    let src = dir.path().join("model");
    let cfg = hf::read_config(&src).unwrap();
    let tensors = Tensor::read_safetensors(src.join("model.safetensors")).unwrap();
    let victim = tensors.iter().map(|(n, _)| n.clone()).find(|n| n.ends_with("h.0.attn.c_attn.weight")).unwrap();
    let (rows, cols) = tensors.iter().find(|(n, _)| *n == victim).map(|(_, t)| (t.size()[0], t.size()[1])).unwrap();
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::copy(src.join("config.json"), other.join("config.json")).unwrap();
    for bad in [
        Tensor::zeros([12], (Kind::Float, Device::Cpu)),
        Tensor::zeros([], (Kind::Float, Device::Cpu)),
        Tensor::zeros([cols, rows], (Kind::Float, Device::Cpu)),
    ] {
        let ts: Vec<(String, Tensor)> =
            tensors.iter().map(|(n, t)| (n.clone(), if *n == victim { bad.shallow_clone() } else { t.shallow_clone() })).collect();
        let refs: Vec<(&str, &Tensor)> = ts.iter().map(|(n, t)| (n.as_str(), t)).collect();
        Tensor::write_safetensors(&refs, other.join("model.safetensors")).unwrap();
        let e = hf::read_weights(&other, &cfg).unwrap_err();
        assert!(
            !e.contains('\n') && e.contains(&victim) && e.contains("Conv1D") && e.contains(&format!("[{rows}, {cols}]")),
            "{:?}: {e}",
            bad.size()
        );
    }
}
