//! The `mole` command line: `info`, `run` (the main job), `eval`, `bench`, and the kernel gates
//! `check-kernels` and `gen-ptx`.

mod autotune;
mod bench;
mod bench_ffn;
mod bench_layer;
mod check_kernels;
mod gen_ptx;
mod info;
mod run;
mod run_ffn;

use clap::{Parser, Subcommand};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "mole", version, about = "Kernels for sparse Mixture-of-LoRA-Experts layers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// What this machine has: GPUs through the driver, NVRTC, CPU threads.
    Info,
    /// Run a realistic MoLE layer through the best available backend, check it against the
    /// f64 reference, and print time and throughput.
    Run(run::RunArgs),
    /// Run one layer spec (or an FFN-expert block: a spec with "f") through the f64 reference on
    /// tensors from a safetensors file and write `y`, the routing ids and weights, the router
    /// statistics and `h` (`a_mix` for a block).
    ///
    /// For a layer, an input `dy [T, d_out]` also runs the f64 reference backward: it writes the
    /// gradients of `Σ dy · y + aux_loss`, with the routing selection held constant, as `grad.x`,
    /// `grad.A`, `grad.B`, `grad.router_weight`, `grad.router_bias`, `grad.logits`,
    /// `grad.weights` and `grad.cores`, each where the spec takes that input and does not freeze
    /// it (`training.frozen`). `aux_loss` (a scalar) is written with `dy` or when the spec
    /// declares `training.aux_losses`.
    Eval {
        /// Layer or FFN-block spec (JSON; see the README).
        #[arg(long)]
        spec: PathBuf,
        /// Input tensors (safetensors).
        #[arg(long)]
        inputs: PathBuf,
        /// Output tensors (safetensors, f64 and i32).
        #[arg(long)]
        out: PathBuf,
    },
    /// Compile every kernel configuration with NVRTC for each architecture and fail on compile
    /// errors, register spills, or resource use over the architecture's limits.
    CheckKernels(check_kernels::CheckKernelsArgs),
    /// Write the PTX shipped for machines without NVRTC into ptx/ (or check it is up to date).
    GenPtx(gen_ptx::GenPtxArgs),
    /// Time kernels on the GPU at the standard shapes (time, GB/s, fraction of the measured copy
    /// bandwidth, TFLOP/s); says so and exits cleanly without a GPU.
    #[command(subcommand)]
    Bench(bench::BenchKind),
    /// Tune kernel configurations and strategies per shape on the GPU and cache the winners;
    /// says so and exits cleanly without a GPU.
    Autotune(autotune::AutotuneArgs),
}

fn eval(spec: &Path, inputs: &Path, out: &Path) -> mole::Result<()> {
    let io = |e: std::io::Error| mole::MoleError::Io {
        context: format!("reading {}", spec.display()),
        message: e.to_string(),
    };
    let mut text = String::new();
    let limit = mole::limits::MAX_SPEC_BYTES;
    std::fs::File::open(spec).map_err(io)?.take(limit + 1).read_to_string(&mut text).map_err(io)?;
    if text.len() as u64 > limit {
        return Err(mole::MoleError::TooLarge {
            what: format!("layer spec {}", spec.display()),
            value: format!("over {limit} bytes"),
            limit: format!("at most {limit} bytes"),
        });
    }
    // A layer spec, or an FFN-expert block when the object has "f" (see `EvalSpec`).
    let spec = mole::tensors::EvalSpec::from_json(&text)?;
    let tensors = mole::tensors::load(inputs)?;
    let outputs = spec.eval(&tensors)?;
    mole::tensors::save(out, &outputs)?;
    for (name, t) in &outputs {
        println!("{name:>18} {:?}", t.shape);
    }
    Ok(())
}

/// Writes `doc` as pretty JSON to `path` (the machine-readable results of `bench --json`),
/// atomically and never over a link, device or read-only file ([`mole::outfile`]).
pub(crate) fn write_json(path: &Path, doc: &serde_json::Value) -> mole::Result<()> {
    let text = serde_json::to_string_pretty(doc).unwrap_or_default() + "\n";
    mole::outfile::write_atomic(path, text.as_bytes())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Info => {
            info::print();
            Ok(())
        }
        Command::Run(args) => run::run(args),
        Command::Eval { spec, inputs, out } => eval(spec, inputs, out),
        Command::CheckKernels(args) => check_kernels::run(args),
        Command::GenPtx(args) => gen_ptx::run(args),
        Command::Bench(kind) => bench::run(kind),
        Command::Autotune(args) => autotune::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
