//! `mole bench ffn`: MixLoRA's FFN-expert block (E = 8, r = 16, k = 2, SiLU) through the block
//! runtime (`CompiledFfn::forward_raw`) per token count and intermediate size, with the dense
//! base FFN alone (its three cuBLAS products on the same buffers) timed in the same run: the
//! block's overhead over it is the figure to watch.

use clap::Args;
use cudarc::driver::DeviceRepr;
use mole::autotune::{DeviceFfn, FfnCheck, CHECK_TOKENS};
use mole::cuda::{time_on_device, Device};
use mole::model::{Activation, FfnMethod, FfnShape, FfnSpec};
use mole::synth::SyntheticFfn;
use mole::{limits, DType, KernelElement, Result};

#[derive(Args)]
pub struct FfnArgs {
    /// Storage dtype.
    #[arg(long, default_value = "bf16")]
    dtype: DType,
    /// Token counts (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,16,256,4096")]
    tokens: Vec<usize>,
    /// Model dimension.
    #[arg(long, default_value_t = 4096)]
    d: usize,
    /// Intermediate sizes (comma-separated): Llama-2-7B's and Llama-3-8B's MLP.
    #[arg(long, value_delimiter = ',', default_value = "11008,14336")]
    f: Vec<usize>,
    /// Timed runs per shape (the median is reported).
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Also write every row, machine-readable, to this JSON file (the GPU kit's results).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

/// What a row measured, before formatting.
struct Measured {
    ms: f64,
    gbs: f64,
    tflops: f64,
    base_ms: f64,
    check: Option<FfnCheck>,
}

impl Measured {
    /// The block's time over the dense base FFN's, less one (0.25: a quarter slower).
    fn overhead(&self) -> f64 {
        self.ms / self.base_ms - 1.0
    }
}

/// The block preset the bench runs: MixLoRA at `d`, `f`, E = 8, r = 16, k = 2, SiLU.
fn spec(d: usize, f: usize) -> Result<FfnSpec> {
    limits::check_max("--d", d, limits::MAX_DIM)?;
    limits::check_max("--f", f, limits::MAX_DIM)?;
    let shape = FfnShape { d, f, experts: 8, rank: 16, k: 2, alpha: 32.0, activation: Activation::Silu };
    FfnMethod::MixLora.spec(shape)
}

pub fn ffn(device: &Device, args: &FfnArgs, copy_gbs: f64) -> Result<()> {
    for &t in &args.tokens {
        limits::check_max("--tokens", t, limits::MAX_TOKENS)?;
    }
    println!(
        "{:>6} {:>6} {:>6} | {:>9} {:>8} {:>7} {:>8} | {:>9} {:>8} | check",
        "d", "f", "T", "time ms", "GB/s", "% copy", "TFLOP/s", "base ms", "overhead"
    );
    let mut rows = Rows { device, args, copy_gbs, rows: Vec::new() };
    for &f in &args.f {
        let spec = spec(args.d, f)?;
        match args.dtype {
            DType::F32 => shape::<f32>(&spec, &mut rows)?,
            DType::F16 => shape::<half::f16>(&spec, &mut rows)?,
            DType::BF16 => shape::<half::bf16>(&spec, &mut rows)?,
        }
    }
    Ok(())
}

/// The rows measured so far, and what each new one is printed and written with.
struct Rows<'a> {
    device: &'a Device,
    args: &'a FfnArgs,
    copy_gbs: f64,
    rows: Vec<serde_json::Value>,
}

impl Rows<'_> {
    /// Prints the row of `tokens` tokens and adds it to the JSON file (rewritten after every
    /// row: a run stopped part way still leaves what it measured).
    fn push(&mut self, spec: &FfnSpec, tokens: usize, measured: Result<Measured>) -> Result<()> {
        let (args, copy_gbs, (d, f, t)) = (self.args, self.copy_gbs, (spec.d, spec.f, tokens));
        let mut json = serde_json::json!({
            "method": FfnMethod::MixLora.name(), "block": "ffn", "tokens": t, "d": d, "f": f,
            "activation": spec.activation.to_string(), "dtype": args.dtype.to_string(),
        });
        match measured {
            Ok(m) => {
                println!("{d:>6} {f:>6} {t:>6} | {}", format_row(&m, copy_gbs));
                let us = m.ms * 1e3;
                json["time_us"] = us.into();
                json["us"] = us.into();
                json["gbs"] = m.gbs.into();
                // `copy_fraction`, and `fraction_of_copy` as the other benches and the kit's
                // report name it.
                json["copy_fraction"] = (m.gbs / copy_gbs).into();
                json["fraction_of_copy"] = (m.gbs / copy_gbs).into();
                json["tflops"] = m.tflops.into();
                json["base_us"] = (m.base_ms * 1e3).into();
                json["overhead"] = m.overhead().into();
                json["check"] = match m.check {
                    Some(c) => serde_json::json!({
                        "error": c.error, "tolerance": c.tolerance, "ok": c.ok(), "tokens": c.tokens,
                        "left_out": c.left_out,
                    }),
                    None => serde_json::Value::Null,
                };
            }
            Err(e) => {
                println!("{d:>6} {f:>6} {t:>6} | error: {e}");
                json["error"] = e.to_string().into();
            }
        }
        self.rows.push(json);
        if let Some(path) = &args.json {
            let doc = serde_json::json!({
                "device": self.device.name(), "copy_gbs": copy_gbs, "dtype": args.dtype.to_string(),
                "rows": self.rows,
            });
            crate::write_json(path, &doc)?;
        }
        Ok(())
    }
}

/// Every token count of one block shape, on one set of synthetic weights (seed 7): each row runs
/// on the first `T` tokens of `x`.
fn shape<T: KernelElement + DeviceRepr>(spec: &FfnSpec, rows: &mut Rows<'_>) -> Result<()> {
    let (device, args) = (rows.device, rows.args);
    let max_tokens = args.tokens.iter().copied().max().unwrap_or(0);
    let what = format!("mole bench ffn --d {} --f {} on {max_tokens} tokens (the block's inputs)", spec.d, spec.f);
    let data = limits::check_host(&what, SyntheticFfn::<T>::bytes(spec, max_tokens)?)
        .map(|()| SyntheticFfn::<T>::new(spec, max_tokens, 7));
    for &t in &args.tokens {
        let measured = match &data {
            Ok(data) => measure(device, spec, data, t, args.runs),
            Err(e) => Err(e.clone()),
        };
        rows.push(spec, t, measured)?;
    }
    Ok(())
}

/// One row: the block on the first `tokens` tokens of `data`, checked against the f64 reference
/// up to [`CHECK_TOKENS`] tokens (every token), and the dense base FFN on the same buffers.
fn measure<T: KernelElement + DeviceRepr>(
    device: &Device,
    spec: &FfnSpec,
    data: &SyntheticFfn<T>,
    tokens: usize,
    runs: usize,
) -> Result<Measured> {
    let mut block = DeviceFfn::new(device, spec, data.prefix(tokens), None)?;
    let check = if tokens <= CHECK_TOKENS { Some(block.check()?) } else { None };
    let work = block.work()?;
    let ms = time_on_device(device, 3, runs, || block.forward())?.median_ms();
    let base_ms = time_on_device(device, 3, runs, || block.base_forward())?.median_ms();
    let seconds = ms * 1e-3;
    Ok(Measured { ms, gbs: work.bytes / seconds / 1e9, tflops: work.flops / seconds / 1e12, base_ms, check })
}

fn format_row(m: &Measured, copy_gbs: f64) -> String {
    let check = match &m.check {
        Some(c) if c.ok() => format!("ok ({:.1e})", c.error),
        Some(c) => format!("FAIL ({:.1e} > {:.1e})", c.error, c.tolerance),
        None => "-".into(),
    };
    format!(
        "{:>9.4} {:>8.1} {:>6.1}% {:>8.2} | {:>9.4} {:>+7.0}% | {check}",
        m.ms,
        m.gbs,
        100.0 * m.gbs / copy_gbs,
        m.tflops,
        m.base_ms,
        100.0 * m.overhead()
    )
}
