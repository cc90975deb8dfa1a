use std::process::ExitCode;

fn main() -> ExitCode {
    let code = qpipe::cli::main(
        std::env::args_os().collect(),
        qpipe::stages::registry::REGISTRY,
    );
    ExitCode::from(code.clamp(0, 255) as u8)
}
