//! The `fastflow` program: train, eval, predict, demo and bench for FastFlow
//! anomaly detection. `main` only maps the result of `run` to an exit code.

use std::process::ExitCode;

use clap::Parser;

mod cli;
mod config;
mod fsutil;
mod heatmap;
mod progress;
mod report;

// mimalloc is markedly faster than the system allocator for candle's many
// short-lived tensor buffers, and it is deterministic across platforms.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // `{:#}` prints the whole chain: "invalid config file 'x.yaml': unknown field ...".
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: cli::Cli) -> anyhow::Result<()> {
    match cli.command {
        other => anyhow::bail!("command {other:?} is not wired to the model crates yet"),
    }
}
