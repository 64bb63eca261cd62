/// Errors of model construction and weight loading; each displays as one line for end users.
#[derive(thiserror::Error, Debug)]
pub enum ModelError {
    #[error("{key} = {value} is invalid: {why}")]
    InvalidConfig { key: &'static str, value: String, why: String },
    #[error("checkpoint tensor '{name}' has shape {found:?} but this model needs {expected:?}: the checkpoint was written by a model of another shape; use the config it was trained with or a fresh run.out_dir")]
    ShapeMismatch { name: String, expected: Vec<i64>, found: Vec<i64> },
    #[error("checkpoint has no tensor '{name}': it was written by a different model; use the config it was trained with or a fresh run.out_dir")]
    MissingTensor { name: String },
    #[error("checkpoint has an unexpected tensor '{name}': it was written by a different model; use the config it was trained with or a fresh run.out_dir")]
    UnexpectedTensor { name: String },
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

pub type Result<T> = std::result::Result<T, ModelError>;
