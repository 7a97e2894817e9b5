//! `mole bench`: kernels timed on the GPU at the standard shapes, with effective bandwidth as a
//! fraction of the device's measured copy bandwidth. Without a GPU it says so and exits cleanly.

use clap::{Args, Subcommand};
use mole::bench::{bench_grouped, GroupedCase, GroupedResult};
use mole::cuda::{copy_bandwidth_gbs, Device};
use mole::{DType, Result};

#[derive(Subcommand)]
pub enum BenchKind {
    /// The segmented grouped (SGMV) shrink + expand.
    Grouped(GroupedArgs),
    /// Whole layers of every method through the chosen strategy, with the grouped path's time
    /// in the same run for the ratio.
    Layer(crate::bench_layer::LayerArgs),
    /// MixLoRA's FFN-expert block (E = 8, r = 16, k = 2, SiLU) through the block runtime, with
    /// the dense base FFN (its three cuBLAS products) timed in the same run for the overhead.
    Ffn(crate::bench_ffn::FfnArgs),
}

#[derive(Args)]
pub struct GroupedArgs {
    /// Storage dtype.
    #[arg(long, default_value = "bf16")]
    dtype: DType,
    /// Every standard shape (5 projections x 3 ranks x 3 expert counts x 2 k x 5 token counts);
    /// by default the square projection at r = 16.
    #[arg(long)]
    all: bool,
    /// Timed runs per shape (the median is reported).
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Also write every row, machine-readable, to this JSON file (the GPU kit's results).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

pub fn run(kind: &BenchKind) -> Result<()> {
    let device = match Device::new(0) {
        Ok(d) => d,
        Err(e) => {
            println!("mole bench: no usable GPU ({e}); benchmarks measure kernels on a CUDA GPU, nothing was measured");
            return Ok(());
        }
    };
    let (major, minor) = device.compute_capability();
    println!("device: {} (sm_{major}{minor}, {} SMs)", device.name(), device.sm_count());
    let copy = copy_bandwidth_gbs(&device, 1 << 30)?;
    println!("measured device-to-device copy bandwidth: {copy:.0} GB/s (read + write)");
    match kind {
        BenchKind::Grouped(args) => grouped(&device, args, copy),
        BenchKind::Layer(args) => crate::bench_layer::layer(&device, args, copy),
        BenchKind::Ffn(args) => crate::bench_ffn::ffn(&device, args, copy),
    }
}

fn grouped(device: &Device, args: &GroupedArgs, copy_gbs: f64) -> Result<()> {
    println!(
        "{:>6} {:>6} {:>4} {:>4} {:>2} {:>6} | {:>9} {:>8} {:>7} {:>8} | check",
        "d_in", "d_out", "r", "E", "k", "T", "time ms", "GB/s", "% copy", "TFLOP/s"
    );
    let mut rows = Vec::new();
    for case in GroupedCase::standard(args.all) {
        // The CPU reference stays cheap up to a few thousand tokens.
        let check = case.tokens <= 4096;
        let result = match args.dtype {
            DType::F32 => bench_grouped::<f32>(device, &case, args.runs, check),
            DType::F16 => bench_grouped::<half::f16>(device, &case, args.runs, check),
            DType::BF16 => bench_grouped::<half::bf16>(device, &case, args.runs, check),
        };
        let c = case;
        print!("{:>6} {:>6} {:>4} {:>4} {:>2} {:>6} | ", c.d_in, c.d_out, c.rank, c.experts, c.k, c.tokens);
        let mut json = serde_json::json!({
            "d_in": c.d_in, "d_out": c.d_out, "rank": c.rank, "experts": c.experts, "k": c.k,
            "tokens": c.tokens, "dtype": args.dtype.to_string(),
        });
        match result {
            Ok(r) => {
                println!("{}", row(&r, args.dtype, copy_gbs));
                let tol = tolerance(&r, args.dtype);
                json["time_us"] = (r.median_ms * 1e3).into();
                json["gbs"] = r.gbs.into();
                json["fraction_of_copy"] = (r.gbs / copy_gbs).into();
                json["tflops"] = r.tflops.into();
                json["check"] = match r.checked_error {
                    Some(e) => serde_json::json!({"error": e, "tolerance": tol, "ok": e <= tol}),
                    None => serde_json::Value::Null,
                };
            }
            Err(e) => {
                println!("error: {e}");
                json["error"] = e.to_string().into();
            }
        }
        rows.push(json);
    }
    if let Some(path) = &args.json {
        let doc = serde_json::json!({
            "device": device.name(), "copy_gbs": copy_gbs, "dtype": args.dtype.to_string(), "rows": rows,
        });
        crate::write_json(path, &doc)?;
    }
    Ok(())
}

/// The check's tolerance: f32 accumulation over `d_in + r`, `y` rounded once per slot pass.
fn tolerance(r: &GroupedResult, dtype: DType) -> f64 {
    mole::reference::tolerance(dtype, r.case.d_in + r.case.rank) * (r.case.k as f64 + 1.0)
}

fn row(r: &GroupedResult, dtype: DType, copy_gbs: f64) -> String {
    let tol = tolerance(r, dtype);
    let check = match r.checked_error {
        Some(e) if e <= tol => format!("ok ({e:.1e})"),
        Some(e) => format!("FAIL ({e:.1e} > {tol:.1e})"),
        None => "-".into(),
    };
    format!("{:>9.4} {:>8.1} {:>6.1}% {:>8.2} | {check}", r.median_ms, r.gbs, 100.0 * r.gbs / copy_gbs, r.tflops)
}
