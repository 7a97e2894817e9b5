//! `mole run --method mix-lora` (or `mix-lora-dynamic`): MixLoRA's FFN-expert block on synthetic
//! inputs. On the CPU the f64 reference (`ffn_forward`: base gate and up once per token, the base
//! down projection once on `a_mix`) is checked against the block as MixLoRA's code runs it (per
//! expert: the tokens routed to it, its whole LoRA FFN, a weighted add; f64, no trick).

use crate::run::{not_taken, report, Outcome, RunArgs};
use mole::dtype::to_f64_vec;
use mole::model::{FfnMethod, FfnShape, FfnSpec};
use mole::reference::linalg::matmul;
use mole::reference::{ffn_forward, max_scaled_error, tolerance_with, FfnInputs, Routing};
use mole::synth::Rng;
use mole::{limits, DType, Result, Scalar};
use std::time::Instant;

/// The multiply-adds a default CPU run spends on the block, about 20 s on 2 cores: the
/// reference and the per-expert check stream the three `d x f` base weights once per token and
/// once per token and slot (measured: 39 tokens at d = 4096, f = 11008, k = 2, 12 to 23 s).
const CPU_RUN_MADDS: f64 = 1.6e10;

/// The block's shape from the knobs: defaults where a knob is not given, and an error naming a
/// knob the preset does not read.
fn block_shape(method: FfnMethod, args: &RunArgs) -> Result<FfnShape> {
    if let (false, Some(k)) = (method.uses_k(), args.k) {
        return Err(not_taken("--k", k, method.name(), "its rule decides how many experts each token gets"));
    }
    limits::check_max("--d", args.d, limits::MAX_DIM)?;
    let f = args.f.unwrap_or(11008);
    limits::check_max("--f", f, limits::MAX_DIM)?;
    if let Some(t) = args.tokens {
        limits::check_max("--tokens", t, limits::MAX_TOKENS)?;
    }
    let (experts, rank, k) = (args.experts.unwrap_or(8), args.rank.unwrap_or(16), args.k.unwrap_or(2));
    let activation = args.activation.unwrap_or_default();
    Ok(FfnShape { d: args.d, f, experts, rank, k, alpha: 2.0 * rank as f64, activation })
}

/// The token count of a CPU run without `--tokens`: what [`CPU_RUN_MADDS`] affords, 1 to 2048.
/// Top-p's slots per token vary; half the experts is the estimate.
fn cpu_tokens(method: FfnMethod, shape: &FfnShape) -> usize {
    let slots = if method.uses_k() { shape.k } else { shape.experts.div_ceil(2) };
    let per_token = 3.0 * shape.d as f64 * shape.f as f64 * (1 + slots) as f64;
    ((CPU_RUN_MADDS / per_token) as usize).clamp(1, 2048)
}

pub fn run(method: FfnMethod, args: &RunArgs) -> Result<()> {
    let shape = block_shape(method, args)?;
    let spec = method.spec(shape)?;
    let tokens = match args.tokens {
        Some(t) => t,
        None => {
            let t = cpu_tokens(method, &shape);
            println!(
                "tokens: {t} (no --tokens: on the CPU the f64 reference and its per-expert check run \
                 the whole d x f FFN per token and slot, so the count keeps them near {CPU_RUN_MADDS:.1e} \
                 multiply-adds, about 20 s on 2 cores; at most 2048)"
            );
            t
        }
    };
    println!(
        "block: {method} d={} f={} E={} r={} slots/token={} activation={} T={tokens} dtype={}",
        spec.d,
        spec.f,
        spec.experts,
        shape.rank,
        spec.slots(),
        spec.activation,
        args.dtype
    );
    if tokens == 0 {
        println!("tokens = 0: nothing to run (a no-op), so no time or throughput to report");
        return Ok(());
    }
    // GPU: the block runtime (added with the kernels)
    println!("backend: CPU (the f64 block; the block's GPU path is not in this build)");
    match args.dtype {
        DType::F32 => run_typed::<f32>(&spec, tokens, args),
        DType::F16 => run_typed::<half::f16>(&spec, tokens, args),
        DType::BF16 => run_typed::<half::bf16>(&spec, tokens, args),
    }
}

fn run_typed<T: Scalar>(spec: &FfnSpec, tokens: usize, args: &RunArgs) -> Result<()> {
    // The synthetic inputs, then the f64 copies of the reference and of the check, before any.
    let f64_copies = BlockData::<f64>::bytes(spec, tokens)?.saturating_mul(2);
    let outputs = limits::Footprint::new().add("y and a_mix, twice", &[4, tokens, spec.d + spec.f], 8)?.bytes();
    let need = BlockData::<T>::bytes(spec, tokens)?.saturating_add(f64_copies).saturating_add(outputs);
    let what =
        format!("mole run --tokens {tokens} --d {} --f {} (inputs, the f64 reference and its check)", spec.d, spec.f);
    limits::check_host(&what, need)?;
    let data = BlockData::<T>::new(spec, tokens, args.seed);

    let start = Instant::now();
    let reference = ffn_forward(spec, &data.inputs())?;
    let ref_time = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let y = per_expert(spec, &data, &reference.routing);
    let time = start.elapsed().as_secs_f64();
    let max_err = Some(max_scaled_error(&y, &reference.y));
    // Both sides are f64: the bound is f64 roundoff over the longest reduction.
    let tol = tolerance_with(f64::EPSILON / 2.0, f64::EPSILON / 2.0, spec.d + spec.f) * 16.0;
    let outcome =
        Outcome { path: "CPU per expert, as MixLoRA runs it (f64)".into(), max_err, time, tol, element_bytes: 8 };

    // Useful work: the base gate, up and down once per token, every selected expert's LoRA.
    let (t, d, f) = (tokens as f64, spec.d as f64, spec.f as f64);
    let lora_cols: f64 = spec.projections().iter().filter_map(|(_, l)| *l).map(|l| l.ranks.total_rank() as f64).sum();
    let selected = reference.routing.ids.iter().filter(|&&id| id >= 0).count() as f64;
    let flops = 2.0 * (3.0 * t * d * f + selected * lora_cols / spec.experts as f64 * (d + f));
    let weights = 3.0 * d * f + lora_cols * (d + f) + d * spec.experts as f64;
    let bytes = outcome.element_bytes as f64 * (2.0 * t * d + weights);
    report(&outcome, tokens, flops, bytes, ("f64, base down once on a_mix", ref_time))
}

/// Random block inputs with a trained layer's magnitudes: unit-scale activations, weights scaled
/// by `1/sqrt(fan_in)`, router logits spread over a few units. The presets' router has no bias.
struct BlockData<T> {
    tokens: usize,
    x: Vec<T>,
    router_weight: Vec<T>,
    /// `base.gate [d, f]`, `base.up [d, f]`, `base.down [f, d]`.
    base: [Vec<T>; 3],
    /// `(A, B)` of the gate, up and down projections that have LoRA.
    banks: [Option<(Vec<T>, Vec<T>)>; 3],
}

impl<T: Scalar> BlockData<T> {
    /// The bytes [`BlockData::new`] allocates (checked arithmetic).
    fn bytes(spec: &FfnSpec, tokens: usize) -> Result<u64> {
        let el = std::mem::size_of::<T>();
        let rank = spec.projections().iter().filter_map(|(_, l)| *l).map(|l| l.ranks.total_rank()).sum::<usize>();
        Ok(limits::Footprint::new()
            .add("x [T, d]", &[tokens, spec.d], el)?
            .add("router [d, E]", &[spec.d, spec.experts], el)?
            .add("base weights", &[3, spec.d, spec.f], el)?
            .add("LoRA banks", &[rank, spec.d + spec.f], el)?
            .bytes())
    }

    fn new(spec: &FfnSpec, tokens: usize, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let (d, f) = (spec.d, spec.f);
        let amp = |fan_in: usize| 3f64.sqrt() / (fan_in.max(1) as f64).sqrt();
        let x = rng.fill(tokens * d, 1.0);
        let router_weight = rng.fill(d * spec.experts, 4.0 / (d as f64).sqrt());
        let base = [rng.fill(d * f, amp(d)), rng.fill(d * f, amp(d)), rng.fill(f * d, amp(f))];
        let banks = spec.projections().map(|(name, lora)| {
            let (n_in, n_out) = if name == "down" { (f, d) } else { (d, f) };
            lora.map(|l| {
                let r = l.ranks.total_rank();
                (rng.fill(n_in * r, amp(n_in)), rng.fill(r * n_out, amp(r)))
            })
        });
        Self { tokens, x, router_weight, base, banks }
    }

    fn inputs(&self) -> FfnInputs<'_, T> {
        let [gate, up, down] = self.banks.each_ref().map(|b| b.as_ref().map(|(a, b)| (&a[..], &b[..])));
        let [base_gate, base_up, base_down] = &self.base;
        FfnInputs {
            router_weight: Some(&self.router_weight),
            gate_a: gate.map(|b| b.0),
            gate_b: gate.map(|b| b.1),
            up_a: up.map(|b| b.0),
            up_b: up.map(|b| b.1),
            down_a: down.map(|b| b.0),
            down_b: down.map(|b| b.1),
            ..FfnInputs::new(self.tokens, &self.x, base_gate, base_up, base_down)
        }
    }
}

/// The block as MixLoRA's code runs it (`MixtralSparseMoe.forward`): per expert, the tokens routed
/// to it, its whole LoRA FFN on them (`act(x·W_g + s·x·A_g·B_g) ⊙ (x·W_u + ...)`, then the down
/// projection with its LoRA), and `y[token] += w · out`; f64, the base down once per slot.
fn per_expert<T: Scalar>(spec: &FfnSpec, data: &BlockData<T>, routing: &Routing) -> Vec<f64> {
    let (d, f) = (spec.d, spec.f);
    let x = to_f64_vec(&data.x);
    let base = data.base.each_ref().map(|w| to_f64_vec(w));
    let banks = data.banks.each_ref().map(|b| b.as_ref().map(|(a, b)| (to_f64_vec(a), to_f64_vec(b))));
    let loras = spec.projections().map(|(_, l)| l);
    let mut y = vec![0.0; routing.tokens * d];
    for e in 0..spec.experts {
        let rows: Vec<(usize, f64)> = (0..routing.ids.len())
            .filter(|&i| routing.ids[i] == e as i32)
            .map(|i| (i / routing.slots, routing.weights[i]))
            .collect();
        let n = rows.len();
        if n == 0 {
            continue;
        }
        // `v [n, n_in] · W_p + s_p · (v · A_p[:, cols_e]) · B_p[cols_e, :]` for projection p.
        let project = |p: usize, v: &[f64], n_in: usize, n_out: usize| -> Vec<f64> {
            let mut out = matmul(v, &base[p], n, n_in, n_out);
            if let (Some(lora), Some((a, b))) = (loras[p], &banks[p]) {
                let (cols, r) = (lora.ranks.cols(e), lora.ranks.total_rank());
                let a_e: Vec<f64> = a.chunks(r).flat_map(|row| row[cols.clone()].iter().copied()).collect();
                let h = matmul(v, &a_e, n, n_in, cols.len());
                let delta = matmul(&h, &b[cols.start * n_out..cols.end * n_out], n, cols.len(), n_out);
                out.iter_mut().zip(delta).for_each(|(o, dl)| *o += lora.scale * dl);
            }
            out
        };
        let xe: Vec<f64> = rows.iter().flat_map(|&(t, _)| x[t * d..(t + 1) * d].iter().copied()).collect();
        let (g, u) = (project(0, &xe, d, f), project(1, &xe, d, f));
        let a: Vec<f64> = g.iter().zip(&u).map(|(&g, u)| spec.activation.apply(g) * u).collect();
        let out = project(2, &a, f, d);
        for (&(t, w), o) in rows.iter().zip(out.chunks(d)) {
            y[t * d..(t + 1) * d].iter_mut().zip(o).for_each(|(y, o)| *y += w * o);
        }
    }
    y
}
