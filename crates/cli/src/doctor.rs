//! `fabbrica doctor DIR`: reads the flight recorder dumps every rank wrote (`DIR/flight/rank_<N>.json`,
//! see `fabbrica_comm::flight`) and says which rank to look at: per group, who is behind, where the
//! ranks diverged, and which ranks left no dump. The analysis is `fabbrica_comm::flight::analyze`.

use std::path::PathBuf;

use clap::Args;
use fabbrica_comm::flight::analyze;

use crate::commands::Failure;

#[derive(Args)]
pub struct DoctorArgs {
    /// The run's out_dir (its flight/ subdirectory is read), or a directory of rank_<N>.json dumps.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Print the report as one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: DoctorArgs) -> Result<(), Failure> {
    // One line, whatever the path holds.
    let loaded = analyze::load_dir(&a.dir).map_err(|e| Failure { message: e.replace(['\n', '\r'], " "), user: true })?;
    let report = analyze::analyze(&loaded.dir.display().to_string(), &loaded.dumps, &loaded.unreadable);
    let out = if a.json { report.to_json() } else { report.to_text() };
    use std::io::Write;
    let _ = std::io::stdout().write_all(out.as_bytes());
    Ok(())
}
