//! The planner's one error: a line of text, and whether the input caused it (exit 2) or not (exit 1).

/// Why a plan could not be made. `message` is one line.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[error("{message}")]
pub struct PlanError {
    /// What went wrong and what to change, on one line.
    pub message: String,
    /// True when the input (model, cluster, layout, flags, files) caused it.
    pub user: bool,
}

impl PlanError {
    /// An error caused by the input.
    pub fn input(message: String) -> Self {
        PlanError { message: message.replace(['\n', '\r'], " "), user: true }
    }

    /// A bug or an environment failure.
    pub fn internal(message: String) -> Self {
        PlanError { message: message.replace(['\n', '\r'], " "), user: false }
    }
}
