//! The `fastflow` program: train, eval, predict, demo and bench for FastFlow
//! anomaly detection. `main` only maps the result of `run` to an exit code.

use std::process::ExitCode;

use clap::Parser;

mod bench;
mod checkpoint;
mod cli;
mod config;
mod data;
mod demo;
mod engine;
mod evaluate;
mod fsutil;
mod heatmap;
mod predict;
mod progress;
mod report;
mod train;

// candle allocates and frees a buffer for nearly every tensor operation, from
// several threads; mimalloc serves that churn from per-thread free lists
// instead of glibc's shared arenas.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Steps reuse their large buffers instead of faulting them in anew.
    ff_kernels::alloc::retain_freed_memory();
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
        cli::Command::Train(args) => train::run_train(args),
        cli::Command::Eval(args) => evaluate::run_eval(args),
        cli::Command::Predict(args) => predict::run_predict(args),
        cli::Command::Demo(args) => demo::run_demo(args),
        cli::Command::Bench(args) => bench::run_bench(args),
    }
}
