//! Hugging Face model directories, in and out: `config.json` (`model_type` `gpt2` or `llama`)
//! and `model.safetensors` or a sharded `model.safetensors.index.json`, as `transformers`'
//! `save_pretrained` writes them and `from_pretrained` reads them.
//!
//! Names: Llama's are ours already; GPT-2's are nanoGPT's, which are Hugging Face's, with its
//! Conv1D weights (`c_attn`, `c_proj`, `c_fc`) stored transposed (in × out). Hugging Face's rotary
//! layout (halves rotated, `rotate_half`) is the one the Llama model uses, so q and k need no
//! permutation. Weights load as fp32 whatever their stored dtype.
//!
//! Everything read is bounded: config.json and the index by size, every file name an index gives
//! must be a plain `*.safetensors` name inside the directory.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use fabbrica_models::{GptConfig, LlamaConfig, ModelConfig, RopeScaling};
use serde_json::{json, Map, Value};
use tch::{Kind, Tensor};

/// Largest config.json or index read.
pub const MAX_JSON_BYTES: u64 = 4 << 20;
/// Exported weights go into shards of at most this many bytes (Hugging Face's default, 5 GB).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;
pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

fn read_json(path: &Path) -> Result<Value, String> {
    let bytes = fabbrica_data::bounded::read(path, MAX_JSON_BYTES).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{} is not valid JSON: {e}", path.display()))
}

/// The model a Hugging Face directory holds, from its `config.json`.
pub fn read_config(dir: &Path) -> Result<ModelConfig, String> {
    let path = dir.join(CONFIG_FILE);
    if !path.is_file() {
        return Err(format!(
            "{} has no {CONFIG_FILE}: point model.init_from at a Hugging Face model directory (save_pretrained's output)",
            dir.display()
        ));
    }
    let v = read_json(&path)?;
    let obj = v.as_object().ok_or_else(|| format!("{} is not a JSON object", path.display()))?;
    let here = path.display().to_string();
    let int = |k: &str| -> Result<usize, String> {
        obj.get(k).and_then(Value::as_u64).map(|x| x as usize).ok_or_else(|| format!("{here}: `{k}` is missing or not a non-negative integer"))
    };
    let int_or = |k: &str, d: usize| -> Result<usize, String> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(d),
            Some(x) => x.as_u64().map(|x| x as usize).ok_or_else(|| format!("{here}: `{k}` is not a non-negative integer")),
        }
    };
    let num_or = |k: &str, d: f64| -> Result<f64, String> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(d),
            Some(x) => x.as_f64().ok_or_else(|| format!("{here}: `{k}` is not a number")),
        }
    };
    let flag = |k: &str, d: bool| obj.get(k).and_then(Value::as_bool).unwrap_or(d);
    let refuse = |k: &str, why: &str| Err(format!("{here}: {k} {why}; fabbrica's model does not have it"));
    let model_type = obj.get("model_type").and_then(Value::as_str).unwrap_or("");
    let cfg = match model_type {
        "gpt2" => {
            let act = obj.get("activation_function").and_then(Value::as_str).unwrap_or("gelu_new");
            let activation = match act {
                "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => fabbrica_models::Activation::GeluTanh,
                "gelu" => fabbrica_models::Activation::Gelu,
                other => return refuse("activation_function", &format!("is {other:?}")),
            };
            if int_or("n_inner", 0)? != 0 && int_or("n_inner", 0)? != 4 * int("n_embd")? {
                return refuse("n_inner", "is not 4 × n_embd");
            }
            if (num_or("layer_norm_epsilon", 1e-5)? - 1e-5).abs() > 1e-12 {
                return refuse("layer_norm_epsilon", "is not 1e-5");
            }
            if flag("scale_attn_by_inverse_layer_idx", false) || flag("reorder_and_upcast_attn", false) || !flag("scale_attn_weights", true) {
                return refuse("scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn / scale_attn_weights", "differ from GPT-2's defaults");
            }
            ModelConfig::Gpt(GptConfig {
                vocab_size: int("vocab_size")?,
                block_size: int("n_positions")?,
                n_layer: int("n_layer")?,
                n_head: int("n_head")?,
                n_embd: int("n_embd")?,
                dropout: 0.0,
                bias: true,
                tie_embeddings: flag("tie_word_embeddings", true),
                activation,
            })
        }
        "llama" => {
            let (c, h) = (int("hidden_size")?, int("num_attention_heads")?);
            if flag("attention_bias", false) || flag("mlp_bias", false) {
                return refuse("attention_bias / mlp_bias", "is true");
            }
            if obj.get("hidden_act").and_then(Value::as_str).unwrap_or("silu") != "silu" {
                return refuse("hidden_act", "is not silu");
            }
            if h > 0 && int_or("head_dim", c / h)? != c / h {
                return refuse("head_dim", "is not hidden_size / num_attention_heads");
            }
            // transformers ≥ 5 writes `rope_parameters` (with rope_theta inside); earlier versions
            // `rope_theta` and `rope_scaling`.
            let rope = obj.get("rope_parameters").or_else(|| obj.get("rope_scaling")).and_then(Value::as_object);
            let rope_num = |k: &str, d: f64| rope.and_then(|r| r.get(k)).and_then(Value::as_f64).unwrap_or(d);
            let rope_type = rope.and_then(|r| r.get("rope_type").or_else(|| r.get("type"))).and_then(Value::as_str).unwrap_or("default");
            let rope_scaling = match rope_type {
                "default" => RopeScaling::default(),
                "llama3" => RopeScaling {
                    kind: fabbrica_models::RopeKind::Llama3,
                    factor: rope_num("factor", 8.0),
                    low_freq_factor: rope_num("low_freq_factor", 1.0),
                    high_freq_factor: rope_num("high_freq_factor", 4.0),
                    original_max_position_embeddings: rope_num("original_max_position_embeddings", 8192.0) as usize,
                },
                other => return refuse("rope_parameters.rope_type", &format!("is {other:?} (supported: default, llama3)")),
            };
            let theta = rope.and_then(|r| r.get("rope_theta")).and_then(Value::as_f64).map_or_else(|| num_or("rope_theta", 10000.0), Ok)?;
            ModelConfig::Llama(LlamaConfig {
                vocab_size: int("vocab_size")?,
                block_size: int("max_position_embeddings")?,
                n_layer: int("num_hidden_layers")?,
                n_head: h,
                n_kv_head: int_or("num_key_value_heads", h)?,
                n_embd: c,
                ffn_hidden: int("intermediate_size")?,
                rope_theta: theta,
                rope_scaling,
                norm_eps: num_or("rms_norm_eps", 1e-6)?,
                tie_embeddings: flag("tie_word_embeddings", false),
                dropout: num_or("attention_dropout", 0.0)?,
            })
        }
        other => return Err(format!("{here}: model_type {other:?} is not supported: fabbrica reads \"gpt2\" and \"llama\" models")),
    };
    cfg.validate().map_err(|e| format!("{here}: {e}"))?;
    Ok(cfg)
}

/// GPT-2's Conv1D weights, stored (in, out) by Hugging Face and (out, in) by us.
fn is_conv1d(name: &str) -> bool {
    name.ends_with(".weight") && [".attn.c_attn.", ".attn.c_proj.", ".mlp.c_fc.", ".mlp.c_proj."].iter().any(|p| name.contains(p))
}

/// The safetensors files of a directory: `model.safetensors`, or those its index lists (plain
/// names inside the directory only), with the tensor names each holds.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let index = dir.join(INDEX_FILE);
    if index.is_file() {
        let v = read_json(&index)?;
        let map = v.get("weight_map").and_then(Value::as_object).ok_or_else(|| format!("{}: no `weight_map` object", index.display()))?;
        let mut files: Vec<String> = Vec::new();
        for (name, f) in map {
            let f = f.as_str().ok_or_else(|| format!("{}: the file of {name} is not a string", index.display()))?;
            let plain = !f.contains('/') && !f.contains('\\') && f != ".." && f.ends_with(".safetensors");
            if !plain {
                return Err(format!("{}: {name} is in {f:?}, which is not a plain .safetensors file name in this directory", index.display()));
            }
            if !files.iter().any(|x| x == f) {
                files.push(f.to_string());
            }
        }
        files.sort();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join(WEIGHTS_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(format!("{} has neither {WEIGHTS_FILE} nor {INDEX_FILE}: point model.init_from at a Hugging Face model directory", dir.display()))
}

/// The weights of a Hugging Face directory under our names and layouts, fp32 on the CPU, checked
/// against the model `cfg` describes: every parameter present with its shape, nothing else.
pub fn read_weights(dir: &Path, cfg: &ModelConfig) -> Result<Vec<(String, Tensor)>, String> {
    let expected: BTreeMap<String, Vec<i64>> = fabbrica_models::Model::parameter_shapes(cfg, &fabbrica_models::StageSpec::whole(cfg.n_layer()))
        .map_err(|e| e.to_string())?
        .into_iter()
        .collect();
    let gpt = matches!(cfg, ModelConfig::Gpt(_));
    let mut out: Vec<(String, Tensor)> = Vec::new();
    for file in weight_files(dir)? {
        if !file.is_file() {
            return Err(format!("{} is missing (listed in {INDEX_FILE})", file.display()));
        }
        let tensors = Tensor::read_safetensors(&file)
            .map_err(|e| format!("cannot read {}: {}", file.display(), crate::checkpoint::one_line(&e.to_string())))?;
        for (raw, t) in tensors {
            // GPT2Model (no LM head) saves without the `transformer.` prefix; its attention masks
            // are buffers, not weights.
            let mut name =
                if gpt && !raw.starts_with("transformer.") && !raw.starts_with("lm_head.") { format!("transformer.{raw}") } else { raw.clone() };
            if gpt && (name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias")) && !expected.contains_key(&name) {
                continue;
            }
            // A tied model saved with its head anyway: the head is the embedding.
            if name == "lm_head.weight" && cfg.tie_embeddings() {
                continue;
            }
            let Some(shape) = expected.get(&name) else {
                return Err(format!(
                    "{}: unexpected tensor {raw:?}: the weights do not belong to the model its config.json describes",
                    file.display()
                ));
            };
            let mut t = t.to_kind(Kind::Float);
            // GPT-2's Conv1D stores (in, out), the transpose of a Linear's weight; the shape is
            // checked first, as the file holds it.
            if gpt && is_conv1d(&name) {
                let stored: Vec<i64> = shape.iter().rev().copied().collect();
                if t.size() != stored {
                    return Err(format!(
                        "{}: tensor {raw:?} has shape {:?} but the model needs {stored:?} (GPT-2's Conv1D layout, the transpose of {shape:?})",
                        file.display(),
                        t.size()
                    ));
                }
                t = t.transpose(0, 1).contiguous();
            }
            if &t.size() != shape {
                return Err(format!("{}: tensor {raw:?} has shape {:?} but the model needs {shape:?}", file.display(), t.size()));
            }
            name.shrink_to_fit();
            out.push((name, t));
        }
    }
    if let Some(missing) = expected.keys().find(|n| !out.iter().any(|(o, _)| o == *n)) {
        return Err(format!("{}: no tensor {missing:?}: the weights are incomplete for the model its config.json describes", dir.display()));
    }
    Ok(out)
}

/// The `config.json` of an exported model.
pub fn config_json(cfg: &ModelConfig, dtype: &str) -> Value {
    match cfg {
        ModelConfig::Gpt(g) => json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": g.vocab_size,
            "n_positions": g.block_size,
            "n_embd": g.n_embd,
            "n_layer": g.n_layer,
            "n_head": g.n_head,
            "n_inner": null,
            "activation_function": if g.activation == fabbrica_models::Activation::GeluTanh { "gelu_new" } else { "gelu" },
            "layer_norm_epsilon": 1e-5,
            "resid_pdrop": g.dropout, "embd_pdrop": g.dropout, "attn_pdrop": g.dropout,
            "scale_attn_weights": true,
            "tie_word_embeddings": g.tie_embeddings,
            "dtype": dtype,
        }),
        ModelConfig::Llama(l) => {
            let mut rope = Map::new();
            rope.insert("rope_theta".into(), json!(l.rope_theta));
            if l.rope_scaling.kind == fabbrica_models::RopeKind::Llama3 {
                let s = &l.rope_scaling;
                rope.insert("rope_type".into(), json!("llama3"));
                rope.insert("factor".into(), json!(s.factor));
                rope.insert("low_freq_factor".into(), json!(s.low_freq_factor));
                rope.insert("high_freq_factor".into(), json!(s.high_freq_factor));
                rope.insert("original_max_position_embeddings".into(), json!(s.original_max_position_embeddings));
            } else {
                rope.insert("rope_type".into(), json!("default"));
            }
            json!({
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "vocab_size": l.vocab_size,
                "hidden_size": l.n_embd,
                "intermediate_size": l.ffn_hidden(),
                "num_hidden_layers": l.n_layer,
                "num_attention_heads": l.n_head,
                "num_key_value_heads": l.n_kv_head,
                "head_dim": l.head_size(),
                "hidden_act": "silu",
                "max_position_embeddings": l.block_size,
                "rms_norm_eps": l.norm_eps,
                "rope_parameters": Value::Object(rope),
                "attention_bias": false,
                "attention_dropout": l.dropout,
                "mlp_bias": false,
                "tie_word_embeddings": l.tie_embeddings,
                "dtype": dtype,
            })
        }
    }
}

/// Writes `tensors` (our names, a whole model's parameters) as a Hugging Face directory `out`:
/// config.json, and model.safetensors, or shards of at most `max_shard_bytes` with an index.
/// `bf16` stores the weights in bfloat16. Files go to a temporary sibling first; `out` appears
/// complete or not at all. `extra` files (name, bytes; e.g. tokenizer.json) are written too.
pub fn export(
    cfg: &ModelConfig,
    tensors: &[(String, Tensor)],
    out: &Path,
    max_shard_bytes: u64,
    bf16: bool,
    extra: &[(String, Vec<u8>)],
) -> Result<(), String> {
    if out.exists() {
        return Err(format!("{} exists: choose a new --out directory (nothing is overwritten)", out.display()));
    }
    let gpt = matches!(cfg, ModelConfig::Gpt(_));
    let kind = if bf16 { Kind::BFloat16 } else { Kind::Float };
    let mapped: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| {
            let t = t.detach().to_device(tch::Device::Cpu).to_kind(kind);
            let t = if gpt && is_conv1d(n) { t.transpose(0, 1) } else { t };
            (n.clone(), t.contiguous())
        })
        .collect();
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if out.file_name().is_none() {
        return Err(format!("{}: not a directory name", out.display()));
    }
    // Named as every temporary is (`fabbrica_data::atomic`): `.<name>.tmp-<pid>@<host>`.
    let tmp = fabbrica_data::atomic::temp_path(out);
    let result = (|| -> Result<(), String> {
        fs::create_dir_all(&tmp).map_err(|e| {
            format!("cannot write the export into {} ({e}): give --out a new directory in an existing, writable one", parent.display())
        })?;
        let io = |p: &Path, e: std::io::Error| format!("cannot write {}: {e}", p.display());
        // Shards in parameter order, each at most max_shard_bytes (a bigger tensor alone).
        let mut shards: Vec<Vec<(String, Tensor)>> = vec![Vec::new()];
        let mut size = 0u64;
        for (n, t) in &mapped {
            let bytes = (t.numel() * t.kind().elt_size_in_bytes()) as u64;
            if size + bytes > max_shard_bytes && !shards.last().expect("one shard").is_empty() {
                shards.push(Vec::new());
                size = 0;
            }
            shards.last_mut().expect("one shard").push((n.clone(), t.shallow_clone()));
            size += bytes;
        }
        let total: u64 = mapped.iter().map(|(_, t)| (t.numel() * t.kind().elt_size_in_bytes()) as u64).sum();
        let n = shards.len();
        let mut weight_map = Map::new();
        for (i, shard) in shards.iter().enumerate() {
            let file = if n == 1 { WEIGHTS_FILE.to_string() } else { format!("model-{:05}-of-{:05}.safetensors", i + 1, n) };
            let refs: Vec<(&str, &Tensor)> = shard.iter().map(|(n, t)| (n.as_str(), t)).collect();
            Tensor::write_safetensors(&refs, tmp.join(&file)).map_err(|e| format!("cannot write {}: {}", tmp.join(&file).display(), e))?;
            for (name, _) in shard {
                weight_map.insert(name.clone(), json!(file));
            }
        }
        if n > 1 {
            let index = json!({ "metadata": { "total_size": total }, "weight_map": Value::Object(weight_map) });
            let p = tmp.join(INDEX_FILE);
            fs::write(&p, serde_json::to_vec_pretty(&index).expect("json")).map_err(|e| io(&p, e))?;
        }
        let p = tmp.join(CONFIG_FILE);
        let config = config_json(cfg, if bf16 { "bfloat16" } else { "float32" });
        fs::write(&p, serde_json::to_vec_pretty(&config).expect("json")).map_err(|e| io(&p, e))?;
        for (name, bytes) in extra {
            let p = tmp.join(name);
            fs::write(&p, bytes).map_err(|e| io(&p, e))?;
        }
        // Every file on disk before the directory is published, and the rename itself after.
        let sync = |p: &Path| fs::File::open(p).and_then(|f| f.sync_all()).map_err(|e| format!("cannot sync {}: {e}", p.display()));
        for entry in fs::read_dir(&tmp).map_err(|e| format!("cannot list {}: {e}", tmp.display()))? {
            sync(&entry.map_err(|e| format!("cannot list {}: {e}", tmp.display()))?.path())?;
        }
        sync(&tmp)?;
        fs::rename(&tmp, out).map_err(|e| format!("cannot move {} to {}: {e}", tmp.display(), out.display()))?;
        sync(parent)
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

/// `fabbrica export`: the model of a checkpoint (or a run directory's newest valid one) as a
/// Hugging Face directory `out` (see [`export`]), with the run's `tokenizer.json` when it used a
/// Hugging Face tokenizer (verified against the checksum the run recorded). Returns the
/// checkpoint it exported.
pub fn export_checkpoint(checkpoint: &Path, out: &Path, max_shard_bytes: u64, bf16: bool) -> Result<PathBuf, crate::TrainError> {
    let ck = crate::checkpoint::resolve(checkpoint)?;
    let extra = match ck.state.tokenizer.tokenizer()? {
        fabbrica_data::Tokenizer::Hf(t) => vec![("tokenizer.json".to_string(), t.json().to_vec())],
        _ => Vec::new(),
    };
    let cfg = &ck.state.config.model;
    // The checkpoint's names are the model's (the tied head is the embedding, stored once).
    let shapes = fabbrica_models::Model::parameter_shapes(cfg, &fabbrica_models::StageSpec::whole(cfg.n_layer()))?;
    let mut ordered = Vec::with_capacity(shapes.len());
    for (name, shape) in shapes {
        let t = ck.model.iter().find(|(n, _)| *n == name).map(|(_, t)| t.shallow_clone()).ok_or_else(|| {
            crate::TrainError::Checkpoint(format!(
                "{}: no tensor {name:?}: the checkpoint does not hold the model its config describes",
                ck.dir.display()
            ))
        })?;
        if t.size() != shape {
            return Err(crate::TrainError::Checkpoint(format!(
                "{}: tensor {name:?} has shape {:?}, its config says {shape:?}",
                ck.dir.display(),
                t.size()
            )));
        }
        ordered.push((name, t));
    }
    export(cfg, &ordered, out, max_shard_bytes, bf16, &extra).map_err(crate::TrainError::Checkpoint)?;
    Ok(ck.dir)
}
