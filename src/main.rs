use std::process::ExitCode;

fn main() -> ExitCode {
    match qpipe_cli() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

fn qpipe_cli() -> qpipe::Result<ExitCode> {
    Err(qpipe::Error::usage("no commands yet"))
}
