use backfill::{app, cli::Cli};
use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.global.log_format == backfill::cli::LogFormat::Json;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(app::execute(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            if json {
                eprintln!(
                    "{}",
                    serde_json::json!({ "level": "error", "msg": e.to_string(), "exit_code": e.exit_code() })
                );
            } else {
                eprintln!("error: {e}");
            }
            e.process_exit_code()
        }
    }
}
