//! Deterministic synthetic layer data: random non-zero inputs of the right shapes for any spec,
//! for the main job, tests and benchmarks (never all-zero data).

use crate::dtype::Scalar;
use crate::model::{FfnSpec, Gating, LayerInputs, LayerSpec, Mix, Router};
use crate::reference::FfnInputs;

/// SplitMix64: small, fast, deterministic, good enough for test data.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * f64::powi(2.0, -53)
    }

    /// Uniform in `[lo, hi)`.
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Uniform integer in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n.max(1)
    }

    /// `n` values uniform in `[-amp, amp)`, rounded to `T`.
    pub fn fill<T: Scalar>(&mut self, n: usize, amp: f64) -> Vec<T> {
        (0..n).map(|_| T::from_f64(self.range(-amp, amp))).collect()
    }
}

/// Random inputs of a gating over `e` experts, drawn from `rng` in field order: the router's
/// weight (`[d_in, E]` for an x router, `[r, E]` for an h router) and bias, logits, given
/// weights, adapter ids (about one token in eight has none), selection bias.
struct GatingData<T> {
    router_weight: Option<Vec<T>>,
    router_bias: Option<Vec<T>>,
    logits: Option<Vec<T>>,
    weights: Option<Vec<T>>,
    adapter_ids: Option<Vec<i32>>,
    selection_bias: Option<Vec<T>>,
}

impl<T: Scalar> GatingData<T> {
    fn new(rng: &mut Rng, gating: Gating, tokens: usize, d_in: usize, r: usize, e: usize) -> Self {
        let inv_sqrt = |n: usize| 1.0 / (n.max(1) as f64).sqrt();
        let (router, rule) = match gating {
            Gating::Routed { router, rule } => (Some(router), Some(rule)),
            _ => (None, None),
        };
        let router_weight = match router {
            Some(Router::X { .. }) => Some(rng.fill(d_in * e, 4.0 * inv_sqrt(d_in))),
            Some(Router::H { .. }) => Some(rng.fill(r * e, 4.0 * inv_sqrt(r))),
            _ => None,
        };
        let router_bias =
            matches!(router, Some(Router::X { bias: true } | Router::H { bias: true })).then(|| rng.fill(e, 0.5));
        let logits = (router == Some(Router::Logits)).then(|| rng.fill(tokens * e, 3.0));
        let weights = matches!(gating, Gating::Given { .. })
            .then(|| (0..tokens * e).map(|_| T::from_f64(rng.range(0.0, 1.0))).collect());
        let adapter_ids = (gating == Gating::AdapterIds)
            .then(|| (0..tokens).map(|_| if rng.below(8) == 0 { -1 } else { rng.below(e) as i32 }).collect());
        let selection_bias = rule.filter(|r| r.uses_selection_bias()).map(|_| rng.fill(e, 0.1));
        GatingData { router_weight, router_bias, logits, weights, adapter_ids, selection_bias }
    }
}

/// Owned random inputs for one layer call.
#[derive(Clone, Debug)]
pub struct SyntheticLayer<T> {
    /// Number of tokens.
    pub tokens: usize,
    /// `x [T, d_in]`.
    pub x: Vec<T>,
    /// `A [d_in, R]`.
    pub a: Vec<T>,
    /// `B [R, d_out]`.
    pub b: Vec<T>,
    /// `y [T, d_out]`.
    pub y: Vec<T>,
    /// Router weight when the spec has an x or h router.
    pub router_weight: Option<Vec<T>>,
    /// Router bias when the spec asks for one.
    pub router_bias: Option<Vec<T>>,
    /// Logits for the logits router.
    pub logits: Option<Vec<T>>,
    /// Given weights for given gating.
    pub weights: Option<Vec<T>>,
    /// Adapter ids for adapter gating (about one token in eight has none).
    pub adapter_ids: Option<Vec<i32>>,
    /// Selection bias when the rule asks for one.
    pub selection_bias: Option<Vec<T>>,
    /// CoMoL cores.
    pub cores: Option<Vec<T>>,
}

impl<T: Scalar> SyntheticLayer<T> {
    /// Random inputs with the magnitudes of a trained layer: unit-scale activations, weights
    /// scaled by `1/sqrt(fan_in)`, router logits spread over a few units.
    pub fn new(spec: &LayerSpec, tokens: usize, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let (r, e) = (spec.total_rank(), spec.routed_experts());
        let inv_sqrt = |n: usize| 1.0 / (n.max(1) as f64).sqrt();
        let x = rng.fill(tokens * spec.d_in, 1.0);
        let a = rng.fill(spec.d_in * r, 3f64.sqrt() * inv_sqrt(spec.d_in));
        let b = rng.fill(r * spec.d_out, 3f64.sqrt() * inv_sqrt(r));
        let y = rng.fill(tokens * spec.d_out, 1.0);
        let GatingData { router_weight, router_bias, logits, weights, adapter_ids, selection_bias } =
            GatingData::new(&mut rng, spec.gating, tokens, spec.d_in, r, e);
        let cores = matches!(spec.mix, Mix::CoreMerge { .. })
            .then(|| rng.fill(spec.core_count() * r * r, 3f64.sqrt() * inv_sqrt(r)));
        Self { tokens, x, a, b, y, router_weight, router_bias, logits, weights, adapter_ids, selection_bias, cores }
    }

    /// The bytes [`SyntheticLayer::new`] allocates for `spec` on `tokens` tokens (checked
    /// arithmetic; check it with [`crate::limits::check_host`] before calling `new` on sizes
    /// that come from a user).
    pub fn bytes(spec: &LayerSpec, tokens: usize) -> crate::Result<u64> {
        let (r, e, el) = (spec.total_rank(), spec.routed_experts(), std::mem::size_of::<T>());
        Ok(crate::limits::Footprint::new()
            .add("x and y [T, d]", &[tokens, spec.d_in + spec.d_out], el)?
            .add("A and B", &[r, spec.d_in + spec.d_out], el)?
            .add("router weight, logits or weights", &[tokens.max(spec.d_in).max(r), e], el)?
            .add("adapter ids", &[tokens], 4)?
            .add("cores", &[spec.core_count(), r, r], el)?
            .bytes())
    }

    /// Borrowed view for the layer API.
    pub fn inputs(&self) -> LayerInputs<'_, T> {
        LayerInputs {
            tokens: self.tokens,
            x: &self.x,
            a: &self.a,
            b: &self.b,
            y: &self.y,
            router_weight: self.router_weight.as_deref(),
            router_bias: self.router_bias.as_deref(),
            logits: self.logits.as_deref(),
            weights: self.weights.as_deref(),
            adapter_ids: self.adapter_ids.as_deref(),
            selection_bias: self.selection_bias.as_deref(),
            cores: self.cores.as_deref(),
        }
    }
}

/// Owned random inputs for one FFN-expert block call ([`FfnSpec`]'s tensor contract), with a
/// trained block's magnitudes: unit-scale activations, weights scaled by `1/sqrt(fan_in)`,
/// router logits spread over a few units.
#[derive(Clone, Debug)]
pub struct SyntheticFfn<T> {
    /// Number of tokens.
    pub tokens: usize,
    /// `x [T, d]`.
    pub x: Vec<T>,
    /// `base_gate [d, f]`, `base_up [d, f]`, `base_down [f, d]`.
    pub base: [Vec<T>; 3],
    /// `(A, B)` of the gate, up and down projections that have LoRA.
    pub banks: [Option<(Vec<T>, Vec<T>)>; 3],
    /// Router weight when the gating has an x router.
    pub router_weight: Option<Vec<T>>,
    /// Router bias when the router asks for one.
    pub router_bias: Option<Vec<T>>,
    /// Logits for the logits router.
    pub logits: Option<Vec<T>>,
    /// Given weights for given gating.
    pub weights: Option<Vec<T>>,
    /// Adapter ids for adapter gating.
    pub adapter_ids: Option<Vec<i32>>,
    /// Selection bias when the rule asks for one.
    pub selection_bias: Option<Vec<T>>,
    /// `d` and `E`, to slice per-token tensors.
    d: usize,
    experts: usize,
}

impl<T: Scalar> SyntheticFfn<T> {
    /// Random inputs of `spec` over `tokens` tokens.
    pub fn new(spec: &FfnSpec, tokens: usize, seed: u64) -> Self {
        let (d, f, e) = (spec.d, spec.f, spec.experts);
        let amp = |fan_in: usize| 3f64.sqrt() / (fan_in.max(1) as f64).sqrt();
        let mut rng = Rng::new(seed);
        let x = rng.fill(tokens * d, 1.0);
        let base = [rng.fill(d * f, amp(d)), rng.fill(d * f, amp(d)), rng.fill(f * d, amp(f))];
        let banks = spec.projections().map(|(name, lora)| {
            let (n_in, n_out) = if name == "down" { (f, d) } else { (d, f) };
            lora.map(|l| {
                let r = l.ranks.total_rank();
                (rng.fill(n_in * r, amp(n_in)), rng.fill(r * n_out, amp(r)))
            })
        });
        let GatingData { router_weight, router_bias, logits, weights, adapter_ids, selection_bias } =
            GatingData::new(&mut rng, spec.gating, tokens, d, 0, e);
        Self {
            tokens,
            x,
            base,
            banks,
            router_weight,
            router_bias,
            logits,
            weights,
            adapter_ids,
            selection_bias,
            d,
            experts: e,
        }
    }

    /// The bytes [`SyntheticFfn::new`] allocates for `spec` on `tokens` tokens (checked
    /// arithmetic).
    pub fn bytes(spec: &FfnSpec, tokens: usize) -> crate::Result<u64> {
        let el = std::mem::size_of::<T>();
        let rank: usize = spec.projections().iter().filter_map(|(_, l)| *l).map(|l| l.ranks.total_rank()).sum();
        Ok(crate::limits::Footprint::new()
            .add("x [T, d]", &[tokens, spec.d], el)?
            .add("base weights", &[3, spec.d, spec.f], el)?
            .add("LoRA banks", &[rank, spec.d + spec.f], el)?
            .add("router weight, logits or weights", &[tokens.max(spec.d), spec.experts], el)?
            .add("adapter ids", &[tokens], 4)?
            .bytes())
    }

    /// The first `tokens` tokens (at most [`SyntheticFfn::tokens`]) with the same weights: the
    /// data of a smaller batch without drawing the weights again.
    pub fn prefix(&self, tokens: usize) -> Self {
        let (t, e) = (tokens.min(self.tokens), self.experts);
        let rows = |v: &Option<Vec<T>>, width: usize| v.as_ref().map(|v| v[..t * width].to_vec());
        SyntheticFfn {
            tokens: t,
            x: self.x[..t * self.d].to_vec(),
            logits: rows(&self.logits, e),
            weights: rows(&self.weights, e),
            adapter_ids: self.adapter_ids.as_ref().map(|v| v[..t].to_vec()),
            ..self.clone()
        }
    }

    /// Borrowed view of the first `tokens` tokens (at most [`SyntheticFfn::tokens`]) for the
    /// reference: a token's output depends on its own inputs only, so the reference of a prefix
    /// is the prefix of the whole's.
    pub fn inputs(&self, tokens: usize) -> FfnInputs<'_, T> {
        let (t, e) = (tokens.min(self.tokens), self.experts);
        let [gate, up, down] = self.banks.each_ref().map(|b| b.as_ref().map(|(a, b)| (&a[..], &b[..])));
        let [base_gate, base_up, base_down] = &self.base;
        FfnInputs {
            router_weight: self.router_weight.as_deref(),
            router_bias: self.router_bias.as_deref(),
            logits: self.logits.as_deref().map(|v| &v[..t * e]),
            weights: self.weights.as_deref().map(|v| &v[..t * e]),
            adapter_ids: self.adapter_ids.as_deref().map(|v| &v[..t]),
            selection_bias: self.selection_bias.as_deref(),
            gate_a: gate.map(|b| b.0),
            gate_b: gate.map(|b| b.1),
            up_a: up.map(|b| b.0),
            up_b: up.map(|b| b.1),
            down_a: down.map(|b| b.0),
            down_b: down.map(|b| b.1),
            ..FfnInputs::new(t, &self.x[..t * self.d], base_gate, base_up, base_down)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Activation, FfnMethod, FfnShape};

    /// The reference of the first `n` tokens is the first `n` rows of the whole batch's (what
    /// the autotuner's block check relies on), and the data is not all zero.
    #[test]
    fn a_block_prefix_has_the_prefix_of_the_reference() {
        for method in FfnMethod::ALL {
            let shape = FfnShape { d: 24, f: 40, experts: 4, rank: 4, k: 2, alpha: 8.0, activation: Activation::Gelu };
            let spec = method.spec(shape).unwrap();
            let data = SyntheticFfn::<f32>::new(&spec, 30, 7);
            let whole = crate::reference::ffn_forward(&spec, &data.inputs(30)).unwrap().y;
            let part = crate::reference::ffn_forward(&spec, &data.inputs(11)).unwrap().y;
            assert_eq!(part, whole[..11 * 24], "{method}");
            assert!(whole.iter().any(|v| v.abs() > 0.1), "{method}");
            assert_eq!(data.inputs(100).tokens, 30);
        }
    }
}
