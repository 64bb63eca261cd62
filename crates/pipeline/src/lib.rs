//! Pipeline-parallel schedules as data, in the style of torch.distributed.pipelining's
//! schedule IR and Megatron-LM's schedules.
//!
//! A model cut into `pp·v` virtual stages runs on `pp` ranks; stage `s` lives on rank
//! `s % pp` (loop placement, so with `v > 1` each rank holds `v` non-adjacent model chunks).
//! A *schedule* says, per rank, in which order that rank runs the forward (`F`) and backward
//! (`B`) of each (stage, micro-batch), and where tensors move between ranks. It is plain data:
//! a `Vec<Vec<Action>>` whose actions print and parse as torch's text (`2F0`, `0SEND_F1`).
//!
//! # The pipeline of this crate
//!
//! 1. **generate** ([`generate`]): compute-only lists from a [`Kind`] and a shape, validated
//!    first ([`ScheduleError`] names the config key to change; at most [`MAX_ACTIONS`]
//!    actions): [`gpipe`], [`one_f_one_b`] (Megatron's 1F1B) and [`interleaved_1f1b`]
//!    (Megatron's interleaved schedule).
//! 2. **lower** ([`lower()`]): insert `SEND_F`/`RECV_F`/`SEND_B`/`RECV_B` wherever neighbouring
//!    stages live on different ranks, each receive right before the compute that needs it.
//! 3. **simulate** ([`simulate()`]): dry-run every rank under [`Costs`] to get a [`Timeline`]
//!    (per-rank intervals, makespan, bubble fraction, peak activations in flight), or a
//!    [`Deadlock`] that names each stuck rank, the action it is stuck at and what it waits
//!    for (inside a [`SimError`], which also reports a time past `u64::MAX` instead of
//!    wrapping). [`to_text`] and [`to_svg`] draw the timeline.
//! 4. **execute** ([`execute()`]): walks one rank's lowered list through a [`Runner`] (forward,
//!    backward, send, recv over real tensors and a communicator), so what runs is exactly what
//!    was simulated, and returns the measured [`Trace`].
//!
//! ```
//! use fabbrica_pipeline::{lower, simulate, Costs, Kind, Schedule};
//!
//! let schedule = Schedule::new(Kind::OneFOneB, 4, 1, 8).unwrap();
//! assert_eq!(schedule.ranks[3][..4].iter().map(ToString::to_string).collect::<Vec<_>>(),
//!            ["3F0", "3B0", "3F1", "3B1"]);
//! let lowered = lower(&schedule);
//! assert_eq!(lowered.ranks[1][0].to_string(), "1RECV_F0");
//! let t = simulate(&lowered, Costs { f: 1, b: 2, comm: 0 }).unwrap();
//! assert_eq!(t.makespan, (8 + 4 - 1) * 3);             // (m + pp - 1)·(f + b)
//! assert_eq!(t.peak_in_flight, [4, 3, 2, 1]);           // pp - r on rank r
//!
//! let err = Schedule::new(Kind::Interleaved1F1B, 4, 2, 6).unwrap_err();
//! assert!(err.to_string().contains("use 4 or 8"));
//! ```

pub mod action;
pub mod deadlock;
pub mod execute;
pub mod generate;
pub mod lower;
pub mod render;
pub mod schedule;
pub mod simulate;
pub mod timeline;

pub use action::{Action, ActionParseError, Op};
pub use deadlock::{Blocked, Cause, Deadlock, Invalid};
pub use execute::{execute, ExecError, Runner, Trace};
pub use generate::{gpipe, interleaved_1f1b, interleaved_warmup, one_f_one_b};
pub use lower::{check_transfer_order, lower, peer};
pub use render::{summary, to_svg, to_text};
pub use schedule::{Kind, Schedule, ScheduleError, KEY_MICROBATCHES, KEY_PP, KEY_SCHEDULE, KEY_VIRTUAL_STAGES, MAX_ACTIONS};
pub use simulate::{simulate, SimError};
pub use timeline::{peak_in_flight, Costs, Entry, Timeline, MAX_COST};
