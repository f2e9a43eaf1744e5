//! The engine's error type and the exit code each kind of failure maps to.
//!
//! Every message is written for an operator: lowercase, naming the job, file, key range or SQLSTATE
//! involved, and saying what to do next. Exit codes are part of the public contract (README).

use std::process::ExitCode;

/// Documented exit codes.
pub mod exit {
    pub const SUCCESS: u8 = 0;
    pub const FAILURE: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const NOT_SATISFIED: u8 = 3;
    pub const INTERRUPTED: u8 = 130;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad command line or invalid job definition (exit 2).
    #[error("{0}")]
    Usage(String),
    /// A gate or precondition is not satisfied (exit 3).
    #[error("{0}")]
    NotSatisfied(String),
    /// Stopped by a signal with progress saved (exit 130).
    #[error("{0}")]
    Interrupted(String),
    /// Anything that went wrong at run time (exit 1).
    #[error("{0}")]
    Runtime(String),
    /// The database could not be reached, or the connection was lost (SQLSTATE class 08,
    /// 57P01–57P03, 53300, a closed socket): worth waiting for, unlike other runtime errors
    /// (exit 1 when it is given up on).
    #[error("{0}")]
    Unavailable(String),
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) => exit::USAGE,
            Error::NotSatisfied(_) => exit::NOT_SATISFIED,
            Error::Interrupted(_) => exit::INTERRUPTED,
            Error::Runtime(_) | Error::Unavailable(_) => exit::FAILURE,
        }
    }

    pub fn process_exit_code(&self) -> ExitCode {
        ExitCode::from(self.exit_code())
    }

    /// Prefixes the message with context, keeping the kind (and so the exit code).
    pub fn context(self, prefix: impl std::fmt::Display) -> Error {
        let wrap = |m: String| format!("{prefix}: {m}");
        match self {
            Error::Usage(m) => Error::Usage(wrap(m)),
            Error::NotSatisfied(m) => Error::NotSatisfied(wrap(m)),
            Error::Interrupted(m) => Error::Interrupted(wrap(m)),
            Error::Runtime(m) => Error::Runtime(wrap(m)),
            Error::Unavailable(m) => Error::Unavailable(wrap(m)),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
