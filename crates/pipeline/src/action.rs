//! One step of one rank's pipeline program, in torch.distributed.pipelining's text form.
//!
//! An action is `<stage><OP><micro>`: `2F0` is "virtual stage 2 runs the forward of
//! micro-batch 0", `0SEND_F1` is "stage 0 sends its forward output of micro-batch 1 to
//! stage 1", `1RECV_F1` is "stage 1 receives that input". Communication actions are named
//! by the stage that executes them (the sender for `SEND_*`, the receiver for `RECV_*`), so
//! `sSEND_F m` matches `(s+1)RECV_F m` and `sSEND_B m` matches `(s-1)RECV_B m`.
//!
//! The text form is the same as torch's `_Action.__repr__` / `_Action.from_str`, so
//! schedules can be compared with, or pasted from, torch's `_format_pipeline_order` output.

use std::fmt;
use std::str::FromStr;

/// What an action does. `F`/`B` are compute; the others move one tensor between stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// Forward of one micro-batch through one stage.
    F,
    /// Full backward (input and weight gradients) of one micro-batch through one stage.
    B,
    /// Send this stage's forward output (activations) to stage + 1.
    SendF,
    /// Receive this stage's forward input from stage - 1.
    RecvF,
    /// Send this stage's input gradient to stage - 1.
    SendB,
    /// Receive this stage's output gradient from stage + 1.
    RecvB,
}

impl Op {
    /// Every op. Parsing matches the whole text between the two numbers against these.
    pub const ALL: [Op; 6] = [Op::F, Op::B, Op::SendF, Op::RecvF, Op::SendB, Op::RecvB];

    /// The op's text in an action string (`F`, `SEND_F`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Op::F => "F",
            Op::B => "B",
            Op::SendF => "SEND_F",
            Op::RecvF => "RECV_F",
            Op::SendB => "SEND_B",
            Op::RecvB => "RECV_B",
        }
    }

    /// `F` or `B`: runs a stage's model chunk.
    pub fn is_compute(self) -> bool {
        matches!(self, Op::F | Op::B)
    }

    /// `SEND_*` or `RECV_*`: moves a tensor between ranks.
    pub fn is_comm(self) -> bool {
        !self.is_compute()
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One step of a rank's program: `op` on virtual stage `stage` for micro-batch `micro`.
///
/// Fields are in struct order (stage, micro, op); the text form puts the op in the middle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Action {
    /// Virtual stage index in `0..pp·v`; it lives on rank `stage % pp`.
    pub stage: usize,
    /// Micro-batch index in `0..microbatches`.
    pub micro: usize,
    /// What to do.
    pub op: Op,
}

impl Action {
    /// `Action::new(2, Op::F, 0)` is `2F0` (arguments in text order).
    pub const fn new(stage: usize, op: Op, micro: usize) -> Self {
        Action { stage, micro, op }
    }

    /// Forward of `micro` through `stage` (`sFm`).
    pub const fn f(stage: usize, micro: usize) -> Self {
        Action::new(stage, Op::F, micro)
    }

    /// Backward of `micro` through `stage` (`sBm`).
    pub const fn b(stage: usize, micro: usize) -> Self {
        Action::new(stage, Op::B, micro)
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}{}", self.stage, self.op, self.micro)
    }
}

/// Why a string is not an action. Every message quotes the text and shows a valid example.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum ActionParseError {
    /// The string is empty (or only whitespace).
    #[error("an empty string is not a pipeline action: write <stage><op><micro-batch>, e.g. 2F0 or 0SEND_F1")]
    Empty,

    /// The string does not start with the stage number.
    #[error("{text:?} is not a pipeline action: it must start with the stage number, e.g. 2F0 (stage 2, forward, micro-batch 0)")]
    MissingStage { text: String },

    /// The string does not end with the micro-batch number.
    #[error("{text:?} is not a pipeline action: it must end with the micro-batch number, e.g. 2F0 (stage 2, forward, micro-batch 0)")]
    MissingMicro { text: String },

    /// The text between the two numbers is not one of the known ops.
    #[error("{text:?} is not a pipeline action: unknown op {op:?}; use F, B, SEND_F, RECV_F, SEND_B or RECV_B, e.g. 1B3 or 0RECV_B0")]
    UnknownOp { text: String, op: String },

    /// A number does not fit in `usize`.
    #[error("{text:?} is not a pipeline action: {number} does not fit in a {bits}-bit index", bits = usize::BITS)]
    TooLarge { text: String, number: String },
}

impl FromStr for Action {
    type Err = ActionParseError;

    /// Parses `<digits><OP><digits>`; surrounding whitespace is ignored (torch strips it too).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        if text.is_empty() {
            return Err(ActionParseError::Empty);
        }
        let owned = || text.to_string();
        let op_start = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
        if op_start == 0 {
            return Err(ActionParseError::MissingStage { text: owned() });
        }
        // End of the last non-digit character (which may take several bytes, e.g. 'é').
        let op_end = text.char_indices().rev().find(|(_, c)| !c.is_ascii_digit()).map_or(op_start, |(i, c)| i + c.len_utf8());
        if op_end == text.len() {
            return Err(ActionParseError::MissingMicro { text: owned() });
        }
        let (stage_text, op_text, micro_text) = (&text[..op_start], &text[op_start..op_end], &text[op_end..]);
        let op = Op::ALL
            .into_iter()
            .find(|op| op.as_str() == op_text)
            .ok_or_else(|| ActionParseError::UnknownOp { text: owned(), op: op_text.to_string() })?;
        let number = |digits: &str| digits.parse::<usize>().map_err(|_| ActionParseError::TooLarge { text: owned(), number: digits.to_string() });
        Ok(Action::new(number(stage_text)?, op, number(micro_text)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_in_torch_text_form() {
        assert_eq!(Action::f(2, 0).to_string(), "2F0");
        assert_eq!(Action::b(1, 3).to_string(), "1B3");
        assert_eq!(Action::new(0, Op::SendF, 1).to_string(), "0SEND_F1");
        assert_eq!(Action::new(1, Op::RecvF, 1).to_string(), "1RECV_F1");
        assert_eq!(Action::new(1, Op::SendB, 0).to_string(), "1SEND_B0");
        assert_eq!(Action::new(0, Op::RecvB, 0).to_string(), "0RECV_B0");
        assert_eq!(Action::f(12, 345).to_string(), "12F345");
    }

    #[test]
    fn round_trips_every_op_and_many_indices() {
        for op in Op::ALL {
            for stage in [0, 1, 9, 10, 31, 1000] {
                for micro in [0, 1, 7, 16, 99, 12345] {
                    let a = Action::new(stage, op, micro);
                    assert_eq!(a.to_string().parse::<Action>(), Ok(a), "{a}");
                }
            }
        }
    }

    #[test]
    fn trims_whitespace() {
        assert_eq!(" 3B2\n".parse::<Action>(), Ok(Action::b(3, 2)));
    }

    #[test]
    fn rejects_bad_strings_naming_the_text() {
        let cases: [(&str, ActionParseError); 9] = [
            ("", ActionParseError::Empty),
            ("   ", ActionParseError::Empty),
            ("F1", ActionParseError::MissingStage { text: "F1".into() }),
            ("SEND_F0", ActionParseError::MissingStage { text: "SEND_F0".into() }),
            ("12", ActionParseError::MissingMicro { text: "12".into() }),
            ("2F", ActionParseError::MissingMicro { text: "2F".into() }),
            ("3X1", ActionParseError::UnknownOp { text: "3X1".into(), op: "X".into() }),
            ("1SEND_Q2", ActionParseError::UnknownOp { text: "1SEND_Q2".into(), op: "SEND_Q".into() }),
            ("1f2", ActionParseError::UnknownOp { text: "1f2".into(), op: "f".into() }),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<Action>(), Err(want), "{text:?}");
        }
        // Digits inside the op are part of the op, not the micro-batch.
        assert_eq!("1F2F3".parse::<Action>(), Err(ActionParseError::UnknownOp { text: "1F2F3".into(), op: "F2F".into() }));
        // A multi-byte character right before the micro-batch number (found by fuzzing: it
        // used to slice inside the character and panic).
        assert_eq!("2F1\u{fffd}0".parse::<Action>(), Err(ActionParseError::UnknownOp { text: "2F1\u{fffd}0".into(), op: "F1\u{fffd}".into() }));
        assert!(matches!("0B\u{e9}".parse::<Action>(), Err(ActionParseError::MissingMicro { .. })));
        let huge = format!("{}F0", "9".repeat(40));
        assert!(matches!(huge.parse::<Action>(), Err(ActionParseError::TooLarge { .. })));
    }

    #[test]
    fn error_messages_quote_the_text_and_the_fix() {
        let msg = "3X1".parse::<Action>().unwrap_err().to_string();
        assert!(msg.contains("\"3X1\"") && msg.contains("\"X\"") && msg.contains("SEND_F"), "{msg}");
        let msg = "F1".parse::<Action>().unwrap_err().to_string();
        assert!(msg.contains("\"F1\"") && msg.contains("stage number"), "{msg}");
        let msg = "".parse::<Action>().unwrap_err().to_string();
        assert!(msg.contains("empty"), "{msg}");
        let msg = "1SEND_Q2".parse::<Action>().unwrap_err().to_string();
        assert!(msg.contains("\"1SEND_Q2\"") && msg.contains("\"SEND_Q\""), "{msg}");
    }

    #[test]
    fn op_classes() {
        assert!(Op::F.is_compute() && Op::B.is_compute());
        for op in [Op::SendF, Op::RecvF, Op::SendB, Op::RecvB] {
            assert!(op.is_comm() && !op.is_compute());
        }
    }
}
