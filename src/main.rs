//! The binary: parse the command line, hand it to the library, exit with the code it returns.

use clap::Parser;

fn main() -> std::process::ExitCode {
    backfill::app::main(backfill::cli::Cli::parse())
}
