//! `mole autotune`: tunes the standard shapes of common models (or a list from a file) on the
//! GPU and writes the winners into the user's tuning cache: per-linear layers, and MixLoRA's
//! FFN-expert block (`--method mix-lora`, `mix-lora-dynamic`). Without a GPU it says so and exits
//! cleanly.

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use mole::autotune::{tune_block, tune_shape, MeasureOptions, Outcome, Pruner, ShapeResult, TuneOptions};
use mole::cuda::{copy_bandwidth_gbs, Arch, Device};
use mole::model::{Activation, FfnMethod, FfnShape, FfnSpec, LayerSpec, Method, MethodShape};
use mole::tune::cache::user_tuning_dir;
use mole::tune::{store, GpuId, Provenance, ShapeKey};
use mole::{DType, MoleError, Result};
use serde::Deserialize;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct AutotuneArgs {
    /// Model presets whose projections are tuned: llama2-7b, llama3-8b or all.
    #[arg(long, default_value = "all")]
    model: String,
    /// Method presets (mix-lora-per-linear, dynmole, smora, comol, or any per-linear preset name,
    /// dashes optional; mix-lora and mix-lora-dynamic tune MixLoRA's FFN-expert block at the
    /// model's d and f); repeat or separate with commas.
    #[arg(long, value_delimiter = ',', default_values_t = ["mix-lora-per-linear".to_string(), "dynmole".into(), "smora".into(), "comol".into()])]
    method: Vec<String>,
    /// Tune the shapes of this JSON file instead of the presets: a list of
    /// {"d_in", "d_out", "experts", "rank", "k", "tokens", "method"}.
    #[arg(long)]
    shapes: Option<PathBuf>,
    /// Storage dtype.
    #[arg(long, default_value = "bf16")]
    dtype: DType,
    /// Wall-clock budget of the whole run, in seconds, shared evenly among the shapes left
    /// (every shape's default is always measured).
    #[arg(long)]
    budget: Option<f64>,
    /// Timed runs per candidate (the median is kept).
    #[arg(long, default_value_t = 50)]
    runs: usize,
    /// Folder to write the tuning file into (default: the user cache's tuning/ folder).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// One shape to tune, as in a `--shapes` file. For a block preset `d_in` is the model width `d`
/// and `d_out` the FFN's `f`; `activation` (silu by default) is read for blocks only.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShapeSpec {
    d_in: usize,
    d_out: usize,
    experts: usize,
    rank: usize,
    k: usize,
    tokens: usize,
    method: String,
    #[serde(default)]
    activation: Option<Activation>,
}

/// A preset of `--method`: a per-linear layer or the FFN-expert block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Preset {
    Layer(Method),
    Block(FfnMethod),
}

/// What one tuned shape is.
#[derive(Clone, Debug)]
enum Shape {
    Layer(LayerSpec),
    Block(FfnSpec),
}

impl Shape {
    fn key(&self, dtype: DType, tokens: usize) -> ShapeKey {
        match self {
            Shape::Layer(s) => ShapeKey::new(s, dtype, tokens),
            Shape::Block(s) => ShapeKey::for_ffn(s, dtype, tokens),
        }
    }
}

/// Token counts of the presets.
const TOKENS: [usize; 4] = [1, 16, 256, 4096];
/// `(d_in, d_out)` of Llama-2-7B's projections: q/k/v/o, gate/up, down.
const LLAMA2_7B: [(usize, usize); 3] = [(4096, 4096), (4096, 11008), (11008, 4096)];
/// `(d_in, d_out)` of Llama-3-8B's projections: q/o, k/v (grouped-query), gate/up, down.
const LLAMA3_8B: [(usize, usize); 4] = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)];
/// `(d, f)` of Llama-2-7B's FFN (hidden 4096, intermediate 11008, as published).
const LLAMA2_7B_FFN: (usize, usize) = (4096, 11008);
/// `(d, f)` of Llama-3-8B's FFN (hidden 4096, intermediate 14336, as published).
const LLAMA3_8B_FFN: (usize, usize) = (4096, 14336);

/// A preset from its command-line name, with or without dashes: a block preset (`mix-lora`,
/// `mixlora-dynamic`: MixLoRA's FFN-expert block, a different model from the per-linear presets
/// for k > 1) or a per-linear one (`mix-lora-per-linear`, `mixloraperlinear`, `dyn_mole`).
fn parse_method(name: &str) -> Result<Preset> {
    let norm = |s: &str| s.chars().filter(|c| c.is_ascii_alphanumeric()).collect::<String>().to_ascii_lowercase();
    let want = norm(name);
    if let Some(b) = FfnMethod::ALL.into_iter().find(|m| norm(m.name()) == want) {
        return Ok(Preset::Block(b));
    }
    Method::ALL.into_iter().find(|m| norm(m.name()) == want).map(Preset::Layer).ok_or_else(|| {
        MoleError::InvalidParameter {
            name: "method",
            value: name.to_string(),
            reason: "expected a preset such as mix-lora-per-linear, dynmole, smora, comol, mix-lora",
        }
    })
}

/// The block of a preset: MixLoRA's published setting (8 experts of rank 16 on gate, up and
/// down, alpha 32, top-2; SiLU as on LLaMA) at `(d, f)`.
fn block_of(method: FfnMethod, d: usize, f: usize, activation: Activation) -> Result<FfnSpec> {
    method.spec(FfnShape { d, f, experts: 8, rank: 16, k: 2, alpha: 32.0, activation })
}

/// The published settings of a method: (experts, rank per expert, k). Rank-wise methods keep
/// k at the gating kernels' limit of 8.
fn method_settings(method: Method) -> (usize, usize, usize) {
    match method {
        Method::DynMole => (6, 24, 2),
        Method::Smora | Method::FlyLora | Method::FlyLoraPeft => (64, 1, 8),
        Method::Comol => (8, 16, 2),
        _ => (8, 16, 2),
    }
}

fn spec_of(method: Method, d_in: usize, d_out: usize, experts: usize, rank: usize, k: usize) -> Result<LayerSpec> {
    method.spec(MethodShape { d_in, d_out, experts, rank, k, alpha: 2.0 * rank as f64 })
}

/// `(label, shape, tokens)` of every shape to tune, without repeats of a key.
fn shapes(args: &AutotuneArgs) -> Result<Vec<(String, Shape, usize)>> {
    let mut out = Vec::new();
    if let Some(path) = &args.shapes {
        for s in read_shapes(path)? {
            if s.tokens == 0 {
                return Err(MoleError::ZeroDimension { name: "tokens" });
            }
            let shape = match parse_method(&s.method)? {
                Preset::Layer(m) => {
                    if s.activation.is_some() {
                        return Err(param("activation", &s.method, "is read for the block presets only"));
                    }
                    (m.name(), Shape::Layer(spec_of(m, s.d_in, s.d_out, s.experts, s.rank, s.k)?))
                }
                Preset::Block(m) => {
                    let (d, f, act) = (s.d_in, s.d_out, s.activation.unwrap_or_default());
                    let shape = FfnShape {
                        d,
                        f,
                        experts: s.experts,
                        rank: s.rank,
                        k: s.k,
                        alpha: 2.0 * s.rank as f64,
                        activation: act,
                    };
                    (m.name(), Shape::Block(m.spec(shape)?))
                }
            };
            out.push((shape.0.to_string(), shape.1, s.tokens));
        }
    } else {
        type Dims = Vec<(usize, usize)>;
        let (dims, ffn): (Dims, Dims) = match args.model.to_ascii_lowercase().as_str() {
            "llama2-7b" => (LLAMA2_7B.to_vec(), vec![LLAMA2_7B_FFN]),
            "llama3-8b" => (LLAMA3_8B.to_vec(), vec![LLAMA3_8B_FFN]),
            "all" => (LLAMA2_7B.iter().chain(&LLAMA3_8B).copied().collect(), vec![LLAMA2_7B_FFN, LLAMA3_8B_FFN]),
            _ => return Err(param("model", &args.model, "expected llama2-7b, llama3-8b or all")),
        };
        for preset in args.method.iter().map(|m| parse_method(m)).collect::<Result<Vec<_>>>()? {
            for tokens in TOKENS {
                match preset {
                    Preset::Layer(method) => {
                        let (experts, rank, k) = method_settings(method);
                        for &(d_in, d_out) in &dims {
                            let spec = spec_of(method, d_in, d_out, experts, rank, k)?;
                            out.push((method.name().to_string(), Shape::Layer(spec), tokens));
                        }
                    }
                    Preset::Block(method) => {
                        for &(d, f) in &ffn {
                            let spec = block_of(method, d, f, Activation::Silu)?;
                            out.push((method.name().to_string(), Shape::Block(spec), tokens));
                        }
                    }
                }
            }
        }
    }
    let mut seen = HashSet::new();
    out.retain(|(_, shape, tokens)| seen.insert(shape.key(args.dtype, *tokens)));
    Ok(out)
}

fn param(name: &'static str, value: impl std::fmt::Display, reason: &'static str) -> MoleError {
    MoleError::InvalidParameter { name, value: value.to_string(), reason }
}

fn io(context: String, e: impl std::fmt::Display) -> MoleError {
    MoleError::Io { context, message: e.to_string() }
}

fn read_shapes(path: &Path) -> Result<Vec<ShapeSpec>> {
    let text = std::fs::read_to_string(path).map_err(|e| io(format!("reading {}", path.display()), e))?;
    serde_json::from_str(&text).map_err(|e| io(format!("parsing shapes file {}", path.display()), e))
}

pub fn run(args: &AutotuneArgs) -> Result<()> {
    if args.runs == 0 {
        return Err(param("runs", args.runs, "must be positive"));
    }
    if let Some(b) = args.budget.filter(|b| !(b.is_finite() && *b > 0.0)) {
        return Err(param("budget", b, "must be a positive number of seconds"));
    }
    let todo = shapes(args)?;
    let device = match Device::new(0) {
        Ok(d) => d,
        Err(e) => {
            println!(
                "mole autotune: no usable GPU ({e}): autotuning measures kernels on a CUDA GPU; nothing was tuned"
            );
            return Ok(());
        }
    };
    let gpu = GpuId::of_device(&device);
    println!(
        "device: {} (sm_{}{}, {} SMs)",
        gpu.name, gpu.compute_capability.0, gpu.compute_capability.1, gpu.sm_count
    );
    let copy = copy_bandwidth_gbs(&device, 1 << 30)?;
    println!("measured device-to-device copy bandwidth: {copy:.0} GB/s (read + write)");
    let provenance = Provenance::current();
    let mut pruner = Pruner::new(device.arch());
    let started = Instant::now();
    let bar = ProgressBar::new(todo.len() as u64);
    if let Ok(style) = ProgressStyle::with_template("{bar:30} {pos}/{len} shapes, {elapsed} elapsed, ETA {eta}  {msg}")
    {
        bar.set_style(style);
    }
    let mut results: Vec<(String, ShapeResult)> = Vec::new();
    for (i, (label, shape, tokens)) in todo.iter().enumerate() {
        let key = shape.key(args.dtype, *tokens);
        bar.set_message(format!("{label} {key}"));
        let budget = args.budget.map(|total| {
            let left = (total - started.elapsed().as_secs_f64()).max(0.0);
            Duration::from_secs_f64(left / (todo.len() - i) as f64)
        });
        let opts = TuneOptions { measure: MeasureOptions { runs: args.runs, ..MeasureOptions::default() }, budget };
        let result = match shape {
            Shape::Layer(spec) => tune_shape(&device, &mut pruner, spec, args.dtype, *tokens, &opts, &provenance),
            Shape::Block(spec) => tune_block(&device, &mut pruner, spec, args.dtype, *tokens, &opts, &provenance),
        };
        match result {
            Ok(r) => results.push((label.clone(), r)),
            Err(e) => bar.println(format!("{label} {key}: not tuned: {e}")),
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    print_table(&results, copy, device.arch());
    let entries: Vec<_> = results.iter().filter_map(|(_, r)| r.entry.clone()).collect();
    let Some(dir) = args.out.clone().or_else(user_tuning_dir) else {
        println!("no cache folder (set MOLE_CACHE_DIR or pass --out): {} results not written", entries.len());
        return Ok(());
    };
    if entries.is_empty() {
        println!("no candidate was correct for any shape: nothing written");
        return Ok(());
    }
    let stored = store(&dir, &gpu, &entries)?;
    for w in &stored.warnings {
        eprintln!("warning: {w}");
    }
    println!("wrote {} tuned shapes to {} ({} in the file)", entries.len(), stored.path.display(), stored.entries);
    Ok(())
}

/// `BLOCK_THREADS=128 BM=32 ...`: the build's defines without their `MOLE_` / family prefixes.
fn config_cell(strategy: mole::tune::Strategy, build: &mole::kernels::KernelBuild) -> String {
    let family = format!("{}_", build.family().name().to_ascii_uppercase());
    let defines: Vec<String> = build
        .config
        .defines()
        .into_iter()
        .map(|(n, v)| {
            let n = n.strip_prefix("MOLE_").unwrap_or(n);
            format!("{}={v}", n.strip_prefix(family.as_str()).unwrap_or(n))
        })
        .collect();
    format!("{strategy} {}", defines.join(" "))
}

fn print_table(results: &[(String, ShapeResult)], copy_gbs: f64, arch: Arch) {
    println!(
        "{:<12} {:>6} {:>6} {:>4} {:>3} {:>3} {:>5} | {:<58} | {:>9} {:>8} {:>6} {:>8}",
        "method", "d_in", "d_out", "R", "E", "k", "T", "chosen config", "time ms", "GB/s", "% copy", "vs dflt"
    );
    for (label, r) in results {
        let k = &r.key;
        print!(
            "{label:<12} {:>6} {:>6} {:>4} {:>3} {:>3} {:>5} | ",
            k.d_in, k.d_out, k.total_rank, k.experts, k.slots, r.tokens
        );
        match (r.chosen(), &r.entry) {
            (Some(c), Some(e)) => println!(
                "{:<58} | {:>9.4} {:>8.1} {:>5.1}% {:>8}",
                config_cell(c.candidate.strategy, &c.candidate.build),
                e.time_ms,
                e.gbs,
                100.0 * e.gbs / copy_gbs,
                e.speedup().map_or("-".to_string(), |s| format!("{s:.2}x"))
            ),
            _ => println!("no correct candidate on {arch}"),
        }
        for c in &r.reports {
            let note = match &c.outcome {
                Outcome::Chosen | Outcome::Timed => continue,
                Outcome::Pruned(why) => format!("pruned: {why}"),
                Outcome::Failed(e) => format!("failed: {e}"),
                Outcome::Wrong { err, tol } => format!("wrong: error {err:.2e} > tolerance {tol:.2e}"),
                Outcome::Skipped(why) => format!("skipped: {why}"),
            };
            println!("    candidate {} ({}): {note}", c.index, config_cell(c.candidate.strategy, &c.candidate.build));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_names_parse_loosely() {
        let layer = |m| Preset::Layer(m);
        assert_eq!(parse_method("mix-lora-per-linear").unwrap(), layer(Method::MixLoraPerLinear));
        assert_eq!(parse_method("MixLoRA_per_linear").unwrap(), layer(Method::MixLoraPerLinear));
        assert_eq!(parse_method("mixloradynamicperlinear").unwrap(), layer(Method::MixLoraDynamicPerLinear));
        // The block's names are the block, never read as the per-linear presets.
        for (name, block) in [
            ("mixlora", FfnMethod::MixLora),
            ("MixLoRA", FfnMethod::MixLora),
            ("mix-lora", FfnMethod::MixLora),
            ("mix-lora-dynamic", FfnMethod::MixLoraDynamic),
        ] {
            assert_eq!(parse_method(name).unwrap(), Preset::Block(block), "{name}");
        }
        assert_eq!(parse_method("dyn-mole").unwrap(), layer(Method::DynMole));
        assert_eq!(parse_method("dynmole").unwrap(), layer(Method::DynMole));
        assert!(parse_method("nope").is_err());
        for m in Method::ALL {
            let (experts, rank, k) = method_settings(m);
            if !m.single_rank_experts() || rank == 1 {
                assert!(spec_of(m, 4096, 1024, experts, rank, k).is_ok(), "{m}");
            }
        }
    }
}

#[cfg(test)]
mod block_tests {
    use super::*;

    fn args(model: &str, methods: &[&str]) -> AutotuneArgs {
        AutotuneArgs {
            model: model.into(),
            method: methods.iter().map(|m| m.to_string()).collect(),
            shapes: None,
            dtype: DType::BF16,
            budget: None,
            runs: 1,
            out: None,
        }
    }

    #[test]
    fn block_presets_tune_the_models_ffn_shapes() {
        let todo = shapes(&args("llama3-8b", &["mix-lora"])).unwrap();
        assert_eq!(todo.len(), TOKENS.len());
        for ((label, shape, tokens), t) in todo.iter().zip(TOKENS) {
            let Shape::Block(spec) = shape else { panic!("{label}: a layer") };
            assert_eq!(
                (label.as_str(), spec.d, spec.f, spec.experts, spec.slots(), *tokens),
                ("mix-lora", 4096, 14336, 8, 2, t)
            );
            let key = shape.key(DType::BF16, t);
            assert_eq!((key.d_in, key.d_out, key.method.as_str()), (4096, 14336, "ffn.silu.routed.x.softmax_topk"));
        }
        let both = shapes(&args("all", &["mix-lora-dynamic", "mix-lora-per-linear"])).unwrap();
        let blocks: Vec<(usize, usize)> = both
            .iter()
            .filter_map(|(_, s, _)| match s {
                Shape::Block(b) => Some((b.d, b.f)),
                Shape::Layer(_) => None,
            })
            .collect();
        assert_eq!(blocks.len(), 2 * TOKENS.len());
        assert!(blocks.contains(&LLAMA2_7B_FFN) && blocks.contains(&LLAMA3_8B_FFN));
        // The layers are those of before: every distinct projection of both models (4096x4096 is
        // in both), per token count.
        let dims: HashSet<&(usize, usize)> = LLAMA2_7B.iter().chain(&LLAMA3_8B).collect();
        assert_eq!(both.len() - blocks.len(), dims.len() * TOKENS.len());
        // Keys are distinct across layers and blocks.
        let keys: HashSet<ShapeKey> = both.iter().map(|(_, s, t)| s.key(DType::BF16, *t)).collect();
        assert_eq!(keys.len(), both.len());
    }

    #[test]
    fn a_shapes_file_takes_blocks_with_their_activation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shapes.json");
        let text = r#"[{"d_in": 64, "d_out": 176, "experts": 4, "rank": 8, "k": 2, "tokens": 9,
                        "method": "mix-lora", "activation": "gelu"},
                       {"d_in": 64, "d_out": 176, "experts": 4, "rank": 8, "k": 2, "tokens": 9,
                        "method": "mix-lora-per-linear"}]"#;
        std::fs::write(&path, text).unwrap();
        let todo = shapes(&AutotuneArgs { shapes: Some(path.clone()), ..args("all", &[]) }).unwrap();
        let Shape::Block(b) = &todo[0].1 else { panic!("a layer") };
        assert_eq!((b.d, b.f, b.activation), (64, 176, Activation::Gelu));
        assert!(matches!(todo[1].1, Shape::Layer(_)));
        // An activation on a layer preset is refused.
        std::fs::write(
            &path,
            text.replace("\"mix-lora-per-linear\"}", "\"mix-lora-per-linear\", \"activation\": \"silu\"}"),
        )
        .unwrap();
        assert!(shapes(&AutotuneArgs { shapes: Some(path), ..args("all", &[]) }).is_err());
    }
}
