//! `fabbrica export`: a checkpoint as a Hugging Face model directory (`config.json`,
//! safetensors, the tokenizer file when the run used one), loadable by `transformers`'
//! `AutoModelForCausalLM.from_pretrained` with no code of ours.

use std::path::PathBuf;

use clap::Args;

use crate::commands::Failure;

#[derive(Args)]
pub struct ExportArgs {
    /// A checkpoint directory (checkpoints/step_*) or a run directory (its newest valid checkpoint).
    #[arg(long, value_name = "DIR")]
    pub checkpoint: PathBuf,
    /// The directory to create (must not exist).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Largest weights file; above it the weights are sharded with an index (e.g. 5GB, 500MB).
    #[arg(long, value_name = "SIZE", default_value = "5GB")]
    pub max_shard_size: String,
    /// Stored dtype of the weights: fp32 (as trained) or bf16.
    #[arg(long, value_name = "DTYPE", default_value = "fp32")]
    pub dtype: String,
}

/// `5GB`, `500MB`, `10KiB`, `123` (bytes), as Hugging Face's `max_shard_size` reads them.
fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let bytes = n * mult;
    (1.0..=1e15).contains(&bytes).then_some(bytes as u64)
}

pub fn run(a: ExportArgs) -> Result<(), Failure> {
    let user = |message: String| Failure { message, user: true };
    let max = parse_size(&a.max_shard_size)
        .ok_or_else(|| user(format!("--max-shard-size {:?} is not a size: use e.g. 5GB, 500MB or a number of bytes", a.max_shard_size)))?;
    let bf16 = match a.dtype.as_str() {
        "fp32" => false,
        "bf16" => true,
        other => return Err(user(format!("--dtype {other:?}: use fp32 or bf16"))),
    };
    let from = fabbrica_train::hf::export_checkpoint(&a.checkpoint, &a.out, max, bf16)?;
    println!("exported {} to {}", from.display(), a.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_read_like_hugging_face() {
        assert_eq!(parse_size("5GB"), Some(5_000_000_000));
        assert_eq!(parse_size("500MB"), Some(500_000_000));
        assert_eq!(parse_size("1KiB"), Some(1024));
        assert_eq!(parse_size("123"), Some(123));
        for bad in ["", "GB", "5XB", "-1", "0"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
    }
}
