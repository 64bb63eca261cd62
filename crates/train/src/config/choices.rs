//! The enum-valued config keys, parsed once: when the config is read, into enums, so that no
//! code downstream matches on strings (and no two places can disagree on the spellings).
//!
//! Every one is stored in TOML as its text (`train.dtype = "bf16"`) through [`text`], which uses
//! the type's `FromStr` and `Display`: the keys whose values are another crate's types
//! (`parallel.schedule`: the pipeline's `Kind`, `parallel.order`: the topology's `RankOrder`,
//! `train.recompute`: the model's `Recompute`, `comm.backend`: the communicator's
//! `BackendChoice`) parse with those crates' own spellings. A bad value fails deserialisation
//! with the type's one-line message (what to set), which `Config::resolve` reports with the key
//! and the value.

use std::fmt;
use std::str::FromStr;

/// Serde for a config value stored as text: `FromStr` to read it, `Display` to write it.
pub mod text {
    use std::fmt::Display;
    use std::str::FromStr;

    use serde::{de, Deserialize, Deserializer, Serializer};

    pub fn serialize<T: Display, S: Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(value)
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

/// Why a value is none of a key's choices: what to set instead (the key and the value are added
/// by the config's error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotAChoice(pub &'static str);

impl fmt::Display for NotAChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// A config enum: its variants with their spellings, `as_str`, `Display`, and a `FromStr` whose
/// error says what to set.
macro_rules! choice {
    ($(#[$m:meta])* $name:ident, $help:literal, { $($(#[$vm:meta])* $var:ident = $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vm])* $var),+
        }

        impl $name {
            /// Every value, in the order the help lists them.
            pub const ALL: &'static [$name] = &[$($name::$var),+];

            /// The config spelling.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$var => $text),+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = NotAChoice;
            fn from_str(s: &str) -> Result<Self, NotAChoice> {
                $name::ALL.iter().copied().find(|v| v.as_str() == s).ok_or(NotAChoice($help))
            }
        }
    };
}

choice!(
    /// `train.dtype`: what the forward and backward compute in.
    Dtype, "use `auto` (bf16 autocast on CUDA, fp32 on the CPU), `fp32` or `bf16` (bf16 autocast on either)", {
        Auto = "auto",
        Fp32 = "fp32",
        Bf16 = "bf16",
    }
);

choice!(
    /// `run.device`: where the model lives.
    DeviceChoice, "use `auto` (CUDA when libtorch sees a GPU), `cpu` or `cuda`", {
        Auto = "auto",
        Cpu = "cpu",
        Cuda = "cuda",
    }
);

choice!(
    /// `parallel.reduce_dtype`: the dtype gradients travel in.
    ReduceDtype, "use `fp32` (the gradients' own) or `bf16` (half the bytes)", {
        Fp32 = "fp32",
        Bf16 = "bf16",
    }
);

choice!(
    /// `train.fused_adamw`: ATen's fused AdamW kernel (`auto` = `on`) or the tensor-op
    /// reference path (`off`).
    Fused, "use `auto`, `on` (ATen's fused AdamW kernel) or `off` (the tensor-op reference path)", {
        Auto = "auto",
        On = "on",
        Off = "off",
    }
);

choice!(
    /// `train.nonfinite`: what a NaN/Inf loss or gradient norm does.
    Nonfinite, "use `stop` (end the job at a NaN/Inf loss or gradient) or `skip` (drop that update)", {
        Stop = "stop",
        Skip = "skip",
    }
);

choice!(
    /// `run.if_exists`: a fresh run into an `out_dir` that holds an earlier run's checkpoints.
    IfExists, "use `refuse` or `archive` (move the earlier run into out_dir/archive/)", {
        Refuse = "refuse",
        Archive = "archive",
    }
);

choice!(
    /// `run.checkpoint_failure`: a checkpoint that cannot be written.
    CheckpointFailure, "use `stop` or `continue` (retry at the next checkpoint interval)", {
        Stop = "stop",
        Continue = "continue",
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_choice_round_trips_through_its_spelling() {
        fn check<T: FromStr + fmt::Display + PartialEq + fmt::Debug + Copy>(all: &[T]) {
            for &v in all {
                assert_eq!(v.to_string().parse::<T>().ok(), Some(v));
            }
        }
        check(Dtype::ALL);
        check(DeviceChoice::ALL);
        check(ReduceDtype::ALL);
        check(Fused::ALL);
        check(Nonfinite::ALL);
        check(IfExists::ALL);
        check(CheckpointFailure::ALL);
        assert_eq!(
            "BF16".parse::<Dtype>(),
            Err(NotAChoice("use `auto` (bf16 autocast on CUDA, fp32 on the CPU), `fp32` or `bf16` (bf16 autocast on either)"))
        );
    }
}
