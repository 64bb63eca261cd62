//! `[model]`: the architecture (`arch`, a tagged enum from the models crate) and `init_from`, a
//! Hugging Face model directory to start from. Resolving the section is the one place that knows
//! both architectures' keys: a key of the other architecture is refused, naming it; switching
//! `arch` starts from that architecture's defaults; `init_from` takes the shape from the
//! directory's `config.json`.

use std::ops::{Deref, DerefMut};
use std::path::PathBuf;

use fabbrica_models::ModelConfig;
use serde::{Deserialize, Serialize};

use super::printable;
use crate::error::{ConfigError, Result};

/// The `[model]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSection {
    #[serde(flatten)]
    pub arch: ModelConfig,
    /// A Hugging Face model directory (`config.json` + safetensors) whose weights a fresh run
    /// starts from; its architecture and shape replace the preset's. Empty: random initialisation.
    #[serde(default, skip_serializing_if = "is_empty")]
    pub init_from: PathBuf,
}

fn is_empty(p: &std::path::Path) -> bool {
    p.as_os_str().is_empty()
}

impl Deref for ModelSection {
    type Target = ModelConfig;
    fn deref(&self) -> &ModelConfig {
        &self.arch
    }
}

impl DerefMut for ModelSection {
    fn deref_mut(&mut self) -> &mut ModelConfig {
        &mut self.arch
    }
}

impl From<ModelConfig> for ModelSection {
    fn from(arch: ModelConfig) -> Self {
        ModelSection { arch, init_from: PathBuf::new() }
    }
}

/// Keys a user may set on a model whose shape comes from `init_from`: training choices, and a
/// shorter context.
const FREE_WITH_INIT: [&str; 4] = ["init_from", "dropout", "block_size", "arch"];

fn table_of(m: &ModelConfig) -> toml::value::Table {
    match toml::Value::try_from(ModelSection::from(m.clone())).expect("model config serializes") {
        toml::Value::Table(t) => t,
        _ => unreachable!("a struct serializes to a table"),
    }
}

/// The schema of `[model]` for checking keys: every key of both architectures (with the preset's
/// values where it has them) and `init_from`, so that any of them merges; which ones the final
/// architecture accepts is decided by [`finish`].
pub(super) fn widen_schema(schema: &mut toml::Value, base: &ModelConfig) {
    let Some(toml::Value::Table(model)) = schema.get_mut("model") else { return };
    for arch in ["gpt", "llama"] {
        for (k, v) in table_of(&ModelConfig::default_for(arch).expect("known arch")) {
            model.entry(k).or_insert(v);
        }
    }
    model.insert("init_from".into(), toml::Value::String(String::new()));
    model.insert("arch".into(), toml::Value::String(base.arch().into()));
}

/// The final `[model]` table: `merged` holds the preset overlaid with everything the user set
/// (`user`, the keys as written). With `init_from`, the shape comes from its config.json; when
/// the user's `arch` differs from the preset's, from that architecture's defaults; the user's
/// keys then apply on top, and a key the final architecture does not have is refused.
pub(super) fn finish(merged: &mut toml::Value, user: &toml::value::Table, base: &ModelConfig) -> Result<()> {
    let Some(toml::Value::Table(model)) = merged.get_mut("model") else { return Ok(()) };
    let init_from = model.get("init_from").and_then(|v| v.as_str()).unwrap_or("").to_string();
    let arch = model.get("arch").and_then(|v| v.as_str()).unwrap_or(base.arch()).to_string();
    let start = if !init_from.is_empty() {
        let cfg = crate::hf::read_config(std::path::Path::new(&init_from)).map_err(|e| ConfigError::Invalid {
            key: "model.init_from".into(),
            value: printable(&format!("{init_from:?}")),
            why: e,
        })?;
        for k in user.keys() {
            if !FREE_WITH_INIT.contains(&k.as_str()) {
                return Err(ConfigError::Invalid {
                    key: format!("model.{}", printable(k)),
                    value: printable(&user[k].to_string()),
                    why: format!(
                        "the model's shape comes from {init_from}/config.json (model.init_from): remove model.{}; only {} may be set with it",
                        printable(k),
                        FREE_WITH_INIT.iter().map(|k| format!("model.{k}")).collect::<Vec<_>>().join(", ")
                    ),
                });
            }
        }
        if let Some(a) = user.get("arch").and_then(|v| v.as_str()) {
            if a != cfg.arch() {
                return Err(ConfigError::Invalid {
                    key: "model.arch".into(),
                    value: printable(&format!("{a:?}")),
                    why: format!("{init_from}/config.json holds a {} model: remove model.arch", cfg.arch()),
                });
            }
        }
        // GPT's positions are a learned table of n_positions rows: a longer block has no rows to
        // load (rotary positions, Llama's, extend to any length).
        if let (ModelConfig::Gpt(g), Some(b)) = (&cfg, user.get("block_size").and_then(|v| v.as_integer())) {
            if b > g.block_size as i64 {
                return Err(ConfigError::Invalid {
                    key: "model.block_size".into(),
                    value: b.to_string(),
                    why: format!(
                        "the GPT-2 model in {init_from} has learned positions for {} tokens (n_positions): set model.block_size to {} or less",
                        g.block_size, g.block_size
                    ),
                });
            }
        }
        cfg
    } else if arch != base.arch() {
        ModelConfig::default_for(&arch).ok_or_else(|| ConfigError::Invalid {
            key: "model.arch".into(),
            value: printable(&format!("{arch:?}")),
            why: "use \"gpt\" or \"llama\"".into(),
        })?
    } else {
        base.clone()
    };
    let mut table = table_of(&start);
    let allowed: Vec<String> = table.keys().cloned().chain(["init_from".to_string()]).collect();
    for (k, v) in user {
        if !allowed.contains(k) {
            let other = if start.arch() == "gpt" { "llama" } else { "gpt" };
            return Err(ConfigError::Invalid {
                key: format!("model.{}", printable(k)),
                value: printable(&v.to_string()),
                why: format!(
                    "model.arch = \"{}\" has no such key (it belongs to model.arch = \"{other}\"): remove it, or set model.arch=\"{other}\"",
                    start.arch()
                ),
            });
        }
        match (table.get_mut(k), v) {
            (Some(toml::Value::Table(dst)), toml::Value::Table(src)) => {
                // The merged (type-checked) values of the keys the user set.
                let checked = model.get(k).and_then(|t| t.as_table());
                for (kk, vv) in src {
                    dst.insert(kk.clone(), checked.and_then(|t| t.get(kk)).cloned().unwrap_or_else(|| vv.clone()));
                }
            }
            _ => {
                table.insert(k.clone(), model.get(k).cloned().unwrap_or_else(|| v.clone()));
            }
        }
    }
    if !init_from.is_empty() {
        table.insert("init_from".into(), toml::Value::String(init_from));
    }
    // The architecture's own struct, alone: a value it refuses (`model.activation = "relu"`) is
    // then reported with its key, which the tagged enum's error would not name.
    let mut fields = table.clone();
    fields.remove("arch");
    fields.remove("init_from");
    let fields = toml::Value::Table(fields);
    let checked = match start {
        ModelConfig::Gpt(_) => fields.clone().try_into::<fabbrica_models::GptConfig>().map(drop),
        ModelConfig::Llama(_) => fields.clone().try_into::<fabbrica_models::LlamaConfig>().map(drop),
    };
    checked.map_err(|e| super::type_error(&e, &fields, "model."))?;
    *model = table;
    Ok(())
}
