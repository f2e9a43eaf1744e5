use backfill::{app, cli::Cli, out};
use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.global.log_format == backfill::cli::LogFormat::Json;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(app::execute(cli));
    // A reader that went away is a normal end (`out`); any other lost output is a failure.
    let result = match (result, out::stdout_error()) {
        (Ok(_), Some(e)) => Err(backfill::Error::Runtime(format!(
            "writing to stdout failed: {e}; the output is incomplete"
        ))),
        (r, _) => r,
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            if json {
                out::stderr(format_args!(
                    "{}\n",
                    serde_json::json!({ "level": "error", "msg": e.to_string(), "exit_code": e.exit_code() })
                ));
            } else {
                out::stderr(format_args!("error: {e}\n"));
            }
            e.process_exit_code()
        }
    }
}
