//! A pipeline schedule as data: one ordered list of [`Action`]s per pipeline rank.
//!
//! Stage placement is the loop ("interleaved") placement of Megatron-LM and torch: the model
//! is cut into `pp·v` virtual stages and stage `s` lives on rank `s % pp`, so rank `r` holds
//! model chunks `r, r + pp, r + 2·pp, ...`. With `v = 1` this is the usual one stage per rank.
//! Chunk `c = s / pp` of rank `r` is virtual stage `c·pp + r`.

use std::fmt;
use std::str::FromStr;

use crate::action::Action;
use crate::generate;

// The settings' names in messages: the flags of `fabbrica schedule`, the one place that sets them
// today (the trainer runs pp = 1 until pipeline execution lands; its config keys will be mapped
// then).
/// The number of pipeline ranks.
pub const KEY_PP: &str = "--pp";
/// The number of micro-batches per optimizer step.
pub const KEY_MICROBATCHES: &str = "--microbatches";
/// The number of virtual stages (model chunks) per rank.
pub const KEY_VIRTUAL_STAGES: &str = "--virtual-stages";
/// The schedule kind.
pub const KEY_SCHEDULE: &str = "--schedule";

/// The most actions a compute-only schedule may hold: `2·pp·v·m` (one `F` and one `B` per
/// stage and micro-batch), at most `1 << 23`, i.e. at most `1 << 22` (stage, micro-batch) pairs,
/// the bound the trainer's config puts on `pp × virtual_stages × grad_accum` too.
/// [`Schedule::validate`] refuses larger shapes ([`ScheduleError::TooManyActions`]) before
/// anything is allocated; the lowered schedule holds at most 3 times as many (a receive before
/// and a send after each compute action).
pub const MAX_ACTIONS: usize = 1 << 23;

/// Which generator produced a schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// All forwards, then all backwards (Huang et al., 2019). Peak memory: m micro-batches.
    GPipe,
    /// Megatron's non-interleaved one-forward-one-backward (PipeDream-flush). Same bubble as
    /// GPipe, peak memory p - r micro-batches on rank r.
    OneFOneB,
    /// Megatron's interleaved 1F1B over v ≥ 2 model chunks per rank: bubble divided by v.
    Interleaved1F1B,
}

impl Kind {
    /// Every kind, in the order the CLI lists them.
    pub const ALL: [Kind; 3] = [Kind::GPipe, Kind::OneFOneB, Kind::Interleaved1F1B];

    /// The config spelling: `gpipe`, `1f1b` or `interleaved`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::GPipe => "gpipe",
            Kind::OneFOneB => "1f1b",
            Kind::Interleaved1F1B => "interleaved",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Kind {
    type Err = ScheduleError;

    /// Accepts the config spelling, ignoring ASCII case and surrounding whitespace.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim();
        Kind::ALL.into_iter().find(|k| k.name().eq_ignore_ascii_case(wanted)).ok_or_else(|| ScheduleError::UnknownKind { text: s.to_string() })
    }
}

/// Why a schedule cannot be built. Every message names the setting and says what to set.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum ScheduleError {
    /// No pipeline ranks.
    #[error("{KEY_PP} 0 is not a valid pipeline size: set {KEY_PP} to at least 1 (1 runs every stage on one rank)")]
    ZeroPp,

    /// No micro-batches.
    #[error("{KEY_MICROBATCHES} 0: set {KEY_MICROBATCHES} to at least 1 (at least {KEY_PP} {pp} keeps every rank busy)")]
    ZeroMicrobatches { pp: usize },

    /// No model chunks per rank.
    #[error("{KEY_VIRTUAL_STAGES} 0: set {KEY_VIRTUAL_STAGES} 1 (one model chunk per rank), or 2 or more with {KEY_SCHEDULE} interleaved")]
    ZeroVirtualStages,

    /// `gpipe` and `1f1b` run exactly one model chunk per rank.
    #[error("{KEY_VIRTUAL_STAGES} {v} needs {KEY_SCHEDULE} interleaved ({kind} runs one model chunk per rank): set {KEY_VIRTUAL_STAGES} 1, or {KEY_SCHEDULE} interleaved")]
    VirtualStagesNeedInterleaved { kind: Kind, v: usize },

    /// Interleaving one chunk is plain 1F1B.
    #[error("{KEY_SCHEDULE} interleaved needs {KEY_VIRTUAL_STAGES} >= 2 (got {v}): set {KEY_VIRTUAL_STAGES} 2 or more, or use {KEY_SCHEDULE} 1f1b")]
    InterleavedNeedsChunks { v: usize },

    /// Megatron's interleaved schedule walks micro-batches in groups of `pp`.
    #[error(
        "{KEY_MICROBATCHES} {m} is not a multiple of {KEY_PP} {pp}, which {KEY_SCHEDULE} interleaved \
         requires (micro-batches run in groups of {pp} per model chunk): use {}",
        multiples_near(*m, *pp)
    )]
    MicrobatchesNotMultiple { m: usize, pp: usize },

    /// `2·pp·v·m` actions would exceed [`MAX_ACTIONS`].
    #[error("{}", too_many_actions(*kind, *pp, *v, *m))]
    TooManyActions { kind: Kind, pp: usize, v: usize, m: usize },

    /// Not one of `gpipe`, `1f1b`, `interleaved`. The message names no key: the value comes from
    /// `--schedule` or from `parallel.schedule`, and the caller says which.
    #[error("{text:?} is not a schedule: use gpipe, 1f1b or interleaved")]
    UnknownKind { text: String },
}

/// The message of [`ScheduleError::TooManyActions`]: the three settings, the bound, and the one
/// setting to lower (the micro-batches when that alone can fit, else the chunks, else the ranks)
/// with the largest value that fits given the other two.
fn too_many_actions(kind: Kind, pp: usize, v: usize, m: usize) -> String {
    let max = MAX_ACTIONS as u128;
    // The largest value of one factor that fits with the other two (0 when none does).
    let fit = |a: usize, b: usize| (2 * a as u128).checked_mul(b as u128).map_or(0, |den| max / den);
    let interleaved = kind == Kind::Interleaved1F1B;
    // Interleaved needs m to be a multiple of pp.
    let m_fit = if interleaved { fit(pp, v) / pp as u128 * pp as u128 } else { fit(pp, v) };
    let v_fit = fit(pp, m);
    let fix = if m_fit >= 1 {
        format!("set {KEY_MICROBATCHES} to at most {m_fit}")
    } else if interleaved && v_fit >= 2 {
        format!("set {KEY_VIRTUAL_STAGES} to at most {v_fit}")
    } else if fit(v, m) >= 1 {
        format!("set {KEY_PP} to at most {}", fit(v, m))
    } else {
        format!("set smaller {KEY_PP}, {KEY_VIRTUAL_STAGES} and {KEY_MICROBATCHES}")
    };
    format!(
        "{KEY_PP} {pp} with {KEY_VIRTUAL_STAGES} {v} and {KEY_MICROBATCHES} {m} is more than \
         {MAX_ACTIONS} actions (2·pp·v·m, a forward and a backward per stage and micro-batch), \
         the most a schedule may hold: {fix}"
    )
}

/// "4 or 8" for (6, 4); "4" for (2, 4): the nearest non-zero multiples of `pp` around `m`.
fn multiples_near(m: usize, pp: usize) -> String {
    let below = m / pp * pp;
    let above = below.saturating_add(pp);
    if below == 0 {
        above.to_string()
    } else {
        format!("{below} or {above}")
    }
}

/// Per-rank action lists plus the shape they were built for.
///
/// `ranks[r]` is rank r's program, executed in order. A *compute-only* schedule (from
/// [`crate::generate`]) holds only `F`/`B`; a *lowered* one (from [`crate::lower()`]) also
/// holds the `SEND_*`/`RECV_*` that move activations and gradients between ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    /// The generator that produced `ranks`.
    pub kind: Kind,
    /// Number of pipeline ranks; `ranks.len() == pp`.
    pub pp: usize,
    /// Model chunks (virtual stages) per rank, v; the model has `pp·v` stages.
    pub virtual_stages: usize,
    /// Micro-batches per optimizer step, m.
    pub microbatches: usize,
    /// `ranks[r]`: rank r's actions, in execution order.
    pub ranks: Vec<Vec<Action>>,
}

impl Schedule {
    /// Validates the shape and generates the compute-only schedule of `kind`.
    pub fn new(kind: Kind, pp: usize, virtual_stages: usize, microbatches: usize) -> Result<Self, ScheduleError> {
        // Validate here too: the gpipe and 1f1b generators take no v to check.
        Self::validate(kind, pp, virtual_stages, microbatches)?;
        match kind {
            Kind::GPipe => generate::gpipe(pp, microbatches),
            Kind::OneFOneB => generate::one_f_one_b(pp, microbatches),
            Kind::Interleaved1F1B => generate::interleaved_1f1b(pp, virtual_stages, microbatches),
        }
    }

    /// Checks a shape without generating anything (e.g. to validate a config up front).
    ///
    /// Rules: `pp ≥ 1`, `microbatches ≥ 1`, `v ≥ 1`; `v == 1` for gpipe and 1f1b; `v ≥ 2` and
    /// `microbatches % pp == 0` for interleaved (Megatron's rule); at most [`MAX_ACTIONS`]
    /// actions, `2·pp·v·m` (computed without overflow). `microbatches < pp` is allowed for gpipe
    /// and 1f1b: the pipeline never fills, which is slow but correct.
    pub fn validate(kind: Kind, pp: usize, virtual_stages: usize, microbatches: usize) -> Result<(), ScheduleError> {
        if pp == 0 {
            return Err(ScheduleError::ZeroPp);
        }
        if microbatches == 0 {
            return Err(ScheduleError::ZeroMicrobatches { pp });
        }
        if virtual_stages == 0 {
            return Err(ScheduleError::ZeroVirtualStages);
        }
        match kind {
            Kind::GPipe | Kind::OneFOneB if virtual_stages != 1 => {
                return Err(ScheduleError::VirtualStagesNeedInterleaved { kind, v: virtual_stages })
            }
            Kind::Interleaved1F1B if virtual_stages < 2 => return Err(ScheduleError::InterleavedNeedsChunks { v: virtual_stages }),
            _ => {}
        }
        // In u128, where three usize factors times 2 cannot wrap to a small number unnoticed.
        let actions = [pp, virtual_stages, microbatches].into_iter().try_fold(2u128, |n, x| n.checked_mul(x as u128));
        if actions.is_none_or(|n| n > MAX_ACTIONS as u128) {
            return Err(ScheduleError::TooManyActions { kind, pp, v: virtual_stages, m: microbatches });
        }
        if kind == Kind::Interleaved1F1B && !microbatches.is_multiple_of(pp) {
            return Err(ScheduleError::MicrobatchesNotMultiple { m: microbatches, pp });
        }
        Ok(())
    }

    /// Number of virtual stages, `pp·v` (saturating at `usize::MAX` for a hand-built schedule
    /// whose product does not fit; a validated shape is far below that).
    pub fn stages(&self) -> usize {
        self.pp.saturating_mul(self.virtual_stages)
    }

    /// The rank that holds virtual stage `stage` (loop placement: `stage % pp`; 0 for a
    /// hand-built schedule with `pp == 0`, which has no stages to ask about).
    pub fn rank_of_stage(&self, stage: usize) -> usize {
        stage % self.pp.max(1)
    }

    /// True when any rank's list holds a `SEND_*` or `RECV_*`.
    pub fn is_lowered(&self) -> bool {
        self.ranks.iter().flatten().any(|a| a.op.is_comm())
    }

    /// Total number of actions over all ranks.
    pub fn len(&self) -> usize {
        self.ranks.iter().map(Vec::len).sum()
    }

    /// True when no rank has any action.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Each rank's actions as one line of text (`"0F0 0F1 0B0 0B1"`), without the `rank r:`
    /// prefix of the `Display` form.
    pub fn rank_lines(&self) -> Vec<String> {
        self.ranks.iter().map(|r| r.iter().map(ToString::to_string).collect::<Vec<_>>().join(" ")).collect()
    }
}

impl fmt::Display for Schedule {
    /// A header line, then `rank r: a0 a1 ...` per rank; the actions parse back with
    /// `str::parse::<Action>()`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} pp={} v={} microbatches={}{}",
            self.kind,
            self.pp,
            self.virtual_stages,
            self.microbatches,
            if self.is_lowered() { " (lowered)" } else { "" }
        )?;
        for (rank, actions) in self.ranks.iter().enumerate() {
            write!(f, "\nrank {rank}:")?;
            for a in actions {
                write!(f, " {a}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_parses_config_spellings() {
        for k in Kind::ALL {
            assert_eq!(k.name().parse::<Kind>(), Ok(k));
            assert_eq!(k.to_string().to_uppercase().parse::<Kind>(), Ok(k));
        }
        assert_eq!(" 1F1B ".parse::<Kind>(), Ok(Kind::OneFOneB));
        let err = "zero-bubble".parse::<Kind>().unwrap_err();
        assert_eq!(err, ScheduleError::UnknownKind { text: "zero-bubble".into() });
        let msg = err.to_string();
        // The caller names the key (`--schedule` or `parallel.schedule`).
        assert!(msg.starts_with("\"zero-bubble\" is not a schedule") && msg.contains("1f1b"), "{msg}");
    }

    #[test]
    fn validate_accepts_every_valid_shape() {
        for pp in 1..=8 {
            for m in 1..=16 {
                assert_eq!(Schedule::validate(Kind::GPipe, pp, 1, m), Ok(()));
                assert_eq!(Schedule::validate(Kind::OneFOneB, pp, 1, m), Ok(()));
                for v in 2..=4 {
                    let want = if m % pp == 0 { Ok(()) } else { Err(ScheduleError::MicrobatchesNotMultiple { m, pp }) };
                    assert_eq!(Schedule::validate(Kind::Interleaved1F1B, pp, v, m), want);
                }
            }
        }
    }

    #[test]
    fn each_invalid_input_has_its_error_and_message() {
        use ScheduleError as E;
        // (kind, pp, v, m, error, fragments its message must contain)
        type Case = (Kind, usize, usize, usize, E, &'static [&'static str]);
        let cases: Vec<Case> = vec![
            (Kind::OneFOneB, 0, 1, 4, E::ZeroPp, &["--pp 0", "at least 1"]),
            (Kind::GPipe, 4, 1, 0, E::ZeroMicrobatches { pp: 4 }, &["--microbatches 0", "at least 1", "--pp 4"]),
            (Kind::OneFOneB, 2, 0, 4, E::ZeroVirtualStages, &["--virtual-stages 0", "set --virtual-stages 1"]),
            (Kind::Interleaved1F1B, 2, 0, 4, E::ZeroVirtualStages, &["--virtual-stages 0"]),
            (
                Kind::GPipe,
                2,
                2,
                4,
                E::VirtualStagesNeedInterleaved { kind: Kind::GPipe, v: 2 },
                &["--virtual-stages 2", "gpipe", "--virtual-stages 1", "interleaved"],
            ),
            (Kind::OneFOneB, 2, 3, 4, E::VirtualStagesNeedInterleaved { kind: Kind::OneFOneB, v: 3 }, &["--virtual-stages 3", "1f1b"]),
            (Kind::Interleaved1F1B, 2, 1, 4, E::InterleavedNeedsChunks { v: 1 }, &["--virtual-stages >= 2", "got 1", "1f1b"]),
            (
                Kind::Interleaved1F1B,
                4,
                2,
                6,
                E::MicrobatchesNotMultiple { m: 6, pp: 4 },
                &["--microbatches 6 is not a multiple of --pp 4", "use 4 or 8"],
            ),
            (Kind::Interleaved1F1B, 4, 2, 2, E::MicrobatchesNotMultiple { m: 2, pp: 4 }, &["--microbatches 2", "use 4"]),
            (Kind::Interleaved1F1B, 3, 2, 7, E::MicrobatchesNotMultiple { m: 7, pp: 3 }, &["use 6 or 9"]),
        ];
        for (kind, pp, v, m, want, fragments) in cases {
            let got = Schedule::validate(kind, pp, v, m).unwrap_err();
            assert_eq!(got, want, "{kind} pp={pp} v={v} m={m}");
            assert_eq!(Schedule::new(kind, pp, v, m).unwrap_err(), want);
            let msg = got.to_string();
            for frag in fragments {
                assert!(msg.contains(frag), "{msg:?} lacks {frag:?}");
            }
        }
        // "use 4" alone, not "use 0 or 4".
        let msg = ScheduleError::MicrobatchesNotMultiple { m: 2, pp: 4 }.to_string();
        assert!(msg.ends_with("use 4"), "{msg}");
    }

    #[test]
    fn shapes_beyond_max_actions_are_refused_naming_what_to_lower() {
        use ScheduleError as E;
        let half = MAX_ACTIONS / 2; // pp·v·m at the bound
                                    // At the bound: valid (nothing is generated by validate).
        assert_eq!(Schedule::validate(Kind::OneFOneB, 1, 1, half), Ok(()));
        assert_eq!(Schedule::validate(Kind::GPipe, 8, 1, half / 8), Ok(()));
        assert_eq!(Schedule::validate(Kind::Interleaved1F1B, 4, 2, half / 8), Ok(()));
        // (kind, pp, v, m, fragments of the message)
        let max = usize::MAX;
        let cases: [(Kind, usize, usize, usize, &[&str]); 8] = [
            (Kind::OneFOneB, 1, 1, half + 1, &["set --microbatches to at most 4194304"]),
            (Kind::OneFOneB, 4, 1, max, &["--microbatches 18446744073709551615", "set --microbatches to at most 1048576"]),
            (Kind::GPipe, max, 1, 8, &["--pp 18446744073709551615", "set --pp to at most 524288"]),
            (Kind::OneFOneB, max, 1, max, &["set smaller --pp, --virtual-stages and --microbatches"]),
            // Interleaved: the micro-batches offered are a multiple of pp.
            (Kind::Interleaved1F1B, 3, 2, 3 << 22, &["set --microbatches to at most 699048"]),
            (Kind::Interleaved1F1B, 2, max, 2, &["--virtual-stages 18446744073709551615", "set --virtual-stages to at most 1048576"]),
            (Kind::Interleaved1F1B, max, 2, max, &["set smaller"]),
            // pp·v·m wraps to 0 in 64 bits: 2^32 · 2 · 2^31.
            (Kind::Interleaved1F1B, 1 << 32, 2, 1 << 31, &["--pp 4294967296", "more than 8388608 actions"]),
        ];
        for (kind, pp, v, m, fragments) in cases {
            let want = E::TooManyActions { kind, pp, v, m };
            assert_eq!(Schedule::validate(kind, pp, v, m), Err(want.clone()), "{kind} pp={pp} v={v} m={m}");
            assert_eq!(Schedule::new(kind, pp, v, m), Err(want.clone()), "{kind} pp={pp} v={v} m={m}");
            let msg = want.to_string();
            assert!(!msg.contains('\n'), "{msg}");
            for frag in fragments {
                assert!(msg.contains(frag), "{msg:?} lacks {frag:?}");
            }
        }
        // The generators check it too (they used to allocate, or overflow, first).
        assert!(matches!(crate::generate::gpipe(2, max), Err(E::TooManyActions { .. })));
        assert!(matches!(crate::generate::one_f_one_b(2, max), Err(E::TooManyActions { .. })));
        assert!(matches!(crate::generate::interleaved_1f1b(2, 2, max - 1), Err(E::TooManyActions { .. })));
        // The suggestion fits: 699048 = 3 · 233016 and 2·3·2·699048 ≤ MAX_ACTIONS.
        assert_eq!(Schedule::validate(Kind::Interleaved1F1B, 3, 2, 699048), Ok(()));
        assert!(Schedule::validate(Kind::Interleaved1F1B, 3, 2, 699048 + 3).is_err());
        // The shape errors that name the kind's own rules come first.
        assert_eq!(Schedule::validate(Kind::OneFOneB, 2, 3, max), Err(E::VirtualStagesNeedInterleaved { kind: Kind::OneFOneB, v: 3 }));
    }

    #[test]
    fn stages_saturates_for_hand_built_schedules() {
        let mut s = Schedule::new(Kind::GPipe, 2, 1, 1).unwrap();
        s.virtual_stages = usize::MAX;
        assert_eq!(s.stages(), usize::MAX);
    }

    #[test]
    fn multiples_near_brackets_m() {
        assert_eq!(multiples_near(6, 4), "4 or 8");
        assert_eq!(multiples_near(1, 8), "8");
        assert_eq!(multiples_near(17, 8), "16 or 24");
    }

    #[test]
    fn placement_and_display() {
        let s = Schedule::new(Kind::Interleaved1F1B, 2, 2, 2).unwrap();
        assert_eq!(s.stages(), 4);
        assert_eq!((0..4).map(|st| s.rank_of_stage(st)).collect::<Vec<_>>(), [0, 1, 0, 1]);
        assert!(!s.is_lowered());
        assert_eq!(s.len(), 2 * 2 * 2 * 2);
        let text = s.to_string();
        assert!(text.starts_with("interleaved pp=2 v=2 microbatches=2\nrank 0: 0F0 0F1 2F0"), "{text}");
        // Every listed action parses back.
        for line in text.lines().skip(1) {
            let (_, acts) = line.split_once(": ").unwrap();
            for a in acts.split(' ') {
                a.parse::<Action>().unwrap();
            }
        }
    }
}
