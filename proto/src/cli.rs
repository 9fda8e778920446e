//! How the binaries end: a failure is one paragraph for people (the chain of causes), never a
//! backtrace, whatever `RUST_BACKTRACE` says.

use std::process::ExitCode;

/// The exit code of `result`, printing a failure as `NAME: cause: cause ...` on stderr.
pub fn exit<E: std::fmt::Display>(name: &str, result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` is anyhow's one-line chain of causes (its `{:?}` would add a backtrace).
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}
