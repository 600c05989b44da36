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
mod feature_cache;
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
    // One level of parallelism: the heavy work runs on rayon's pool through
    // ff-kernels, and candle's own worker pool (by default one thread per
    // core besides the caller, spinning 25k times before it parks) only
    // competed with it for the cores (batch-1 inference 12-17 -> 21 img/s).
    // Set before any candle operation creates that pool; a user's own
    // setting is kept.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let cli = cli::Cli::parse();
    // The program itself runs on a worker of the compute pool, so that each
    // parallel kernel starts and ends without handing work to another thread
    // and waking the caller back up (batch-1 inference spent ~8% of its time
    // in the scheduler otherwise). RAYON_NUM_THREADS still sets its size.
    let result = match rayon::ThreadPoolBuilder::new().build() {
        Ok(pool) => pool.install(|| run(cli)),
        Err(_) => run(cli),
    };
    match result {
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
