//! The FFN-expert block (MixLoRA) in f64: route on `x`, then per selected expert the LoRA-adapted
//! gate and up projections, the activation and the down projection (see [`crate::model::FfnSpec`]).
//!
//! The base down projection is shared, so `Σ_e w_e·a_e·W_down = (Σ_e w_e·a_e)·W_down`: the
//! forward runs it once on `a_mix = Σ_e w_e·a_e` and adds each selected expert's down-LoRA delta,
//! `y = a_mix·W_down + Σ_e w_e·s_d·(a_e·A^d_e)·B^d_e`.

use super::linalg::matmul;
use super::routing::{route, GateInput, Routing};
use super::stats::{router_stats, RouterStats};
use crate::dtype::{to_f64_vec, Scalar};
use crate::limits::check_len;
use crate::model::{FfnSpec, Gating, ProjectionLora, Router};
use crate::{MoleError, Result};
use rayon::prelude::*;

/// The tensors of one FFN-block call (row-major host slices, input-major weights). Which optional
/// tensors are required follows from the spec; [`ffn_forward`] checks presence and every shape.
#[derive(Clone, Copy, Debug)]
pub struct FfnInputs<'a, T> {
    /// Number of tokens `T` (0 is a no-op).
    pub tokens: usize,
    /// `x [T, d]`.
    pub x: &'a [T],
    /// `router_weight [d, E]` for the `x` router.
    pub router_weight: Option<&'a [T]>,
    /// `router_bias [E]` for a router with `bias: true`.
    pub router_bias: Option<&'a [T]>,
    /// `logits [T, E]` for the logits router.
    pub logits: Option<&'a [T]>,
    /// `weights [T, E]` for given gating.
    pub weights: Option<&'a [T]>,
    /// `adapter_ids [T]` for adapter-id gating.
    pub adapter_ids: Option<&'a [i32]>,
    /// `selection_bias [E]` for rules with `bias: true`.
    pub selection_bias: Option<&'a [T]>,
    /// `base_gate [d, f]`.
    pub base_gate: &'a [T],
    /// `base_up [d, f]`.
    pub base_up: &'a [T],
    /// `base_down [f, d]`.
    pub base_down: &'a [T],
    /// `gate_a [d, R_g]` and `gate_b [R_g, f]` when the gate projection is adapted.
    pub gate_a: Option<&'a [T]>,
    /// See `gate_a`.
    pub gate_b: Option<&'a [T]>,
    /// `up_a [d, R_u]` and `up_b [R_u, f]` when the up projection is adapted.
    pub up_a: Option<&'a [T]>,
    /// See `up_a`.
    pub up_b: Option<&'a [T]>,
    /// `down_a [f, R_d]` and `down_b [R_d, d]` when the down projection is adapted.
    pub down_a: Option<&'a [T]>,
    /// See `down_a`.
    pub down_b: Option<&'a [T]>,
}

impl<'a, T> FfnInputs<'a, T> {
    /// The tensors every block takes; optional ones start as `None`.
    pub fn new(tokens: usize, x: &'a [T], base_gate: &'a [T], base_up: &'a [T], base_down: &'a [T]) -> Self {
        Self {
            tokens,
            x,
            router_weight: None,
            router_bias: None,
            logits: None,
            weights: None,
            adapter_ids: None,
            selection_bias: None,
            base_gate,
            base_up,
            base_down,
            gate_a: None,
            gate_b: None,
            up_a: None,
            up_b: None,
            down_a: None,
            down_b: None,
        }
    }
}

/// Everything one FFN-block call produces, in f64.
#[derive(Clone, Debug, PartialEq)]
pub struct FfnOutput {
    /// `Σ_selected w_e · out_e`, `[T, d]`.
    pub y: Vec<f64>,
    /// Per-token expert ids and weights.
    pub routing: Routing,
    /// `a_mix = Σ_selected w_e · a_e`, `[T, f]`: what the shared base down projection multiplies.
    pub a_mix: Vec<f64>,
    /// Auxiliary-loss statistics.
    pub stats: RouterStats,
}

/// Presence of an optional input: an error when missing though needed, or present though unused.
fn need<U>(v: Option<&[U]>, name: &'static str, needed: bool, by: &'static str) -> Result<()> {
    match (v.is_some(), needed) {
        (false, true) => Err(MoleError::MissingInput { name, needed_by: by }),
        (true, false) => Err(MoleError::UnexpectedInput { name, reason: by }),
        _ => Ok(()),
    }
}

/// Checks that exactly the tensors the spec needs are present, each of the right length
/// (adapter ids are checked by the routing).
pub(crate) fn check_inputs<T>(spec: &FfnSpec, inputs: &FfnInputs<'_, T>) -> Result<()> {
    crate::limits::check_max("tokens", inputs.tokens, crate::limits::MAX_TOKENS)?;
    let (t, d, f, e) = (inputs.tokens, spec.d, spec.f, spec.experts);
    check_len("x", inputs.x, &[t, d])?;
    check_len("base_gate", inputs.base_gate, &[d, f])?;
    check_len("base_up", inputs.base_up, &[d, f])?;
    check_len("base_down", inputs.base_down, &[f, d])?;
    let router = spec.router();
    let optional = [
        (inputs.router_weight, "router_weight", matches!(router, Some(Router::X { .. })), "the x router", [d, e]),
        (inputs.router_bias, "router_bias", router == Some(Router::X { bias: true }), "a router with bias", [1, e]),
        (inputs.logits, "logits", router == Some(Router::Logits), "the logits router", [t, e]),
        (inputs.weights, "weights", matches!(spec.gating, Gating::Given { .. }), "given gating", [t, e]),
        (
            inputs.selection_bias,
            "selection_bias",
            matches!(spec.gating, Gating::Routed { rule, .. } if rule.uses_selection_bias()),
            "a rule with bias: true",
            [1, e],
        ),
    ];
    for (v, name, needed, by, shape) in optional {
        need(v, name, needed, by)?;
        if let Some(v) = v {
            check_len(name, v, &shape)?;
        }
    }
    need(inputs.adapter_ids, "adapter_ids", spec.gating == Gating::AdapterIds, "adapter_ids gating")?;
    let banks = [
        (spec.gate.as_ref(), inputs.gate_a, inputs.gate_b, ["gate_a", "gate_b"], [d, f]),
        (spec.up.as_ref(), inputs.up_a, inputs.up_b, ["up_a", "up_b"], [d, f]),
        (spec.down.as_ref(), inputs.down_a, inputs.down_b, ["down_a", "down_b"], [f, d]),
    ];
    for (lora, a, b, [a_name, b_name], [n_in, n_out]) in banks {
        need(a, a_name, lora.is_some(), "a projection with LoRA")?;
        need(b, b_name, lora.is_some(), "a projection with LoRA")?;
        if let (Some(lora), Some(a), Some(b)) = (lora, a, b) {
            let r = lora.ranks.total_rank();
            check_len(a_name, a, &[n_in, r])?;
            check_len(b_name, b, &[r, n_out])?;
        }
    }
    Ok(())
}

/// One projection's LoRA bank in f64.
struct Lora<'s> {
    spec: &'s ProjectionLora,
    a: Vec<f64>,
    b: Vec<f64>,
}

impl<'s> Lora<'s> {
    fn new<T: Scalar>(spec: Option<&'s ProjectionLora>, a: Option<&[T]>, b: Option<&[T]>) -> Option<Self> {
        Some(Self { spec: spec?, a: to_f64_vec(a?), b: to_f64_vec(b?) })
    }

    /// `out += weight · s · (v · A_e) · B_e`, expert `e`'s columns only.
    fn add_delta(&self, v: &[f64], e: usize, weight: f64, out: &mut [f64]) {
        let (r, n_out) = (self.spec.ranks.total_rank(), out.len());
        for c in self.spec.ranks.cols(e) {
            let h: f64 = v.iter().enumerate().map(|(i, vi)| vi * self.a[i * r + c]).sum();
            let coef = weight * self.spec.scale * h;
            out.iter_mut().zip(&self.b[c * n_out..(c + 1) * n_out]).for_each(|(o, b)| *o += coef * b);
        }
    }
}

/// The block's weights in f64.
struct Block<'s> {
    spec: &'s FfnSpec,
    base_gate: Vec<f64>,
    base_up: Vec<f64>,
    base_down: Vec<f64>,
    gate: Option<Lora<'s>>,
    up: Option<Lora<'s>>,
    down: Option<Lora<'s>>,
}

impl<'s> Block<'s> {
    fn new<T: Scalar>(spec: &'s FfnSpec, inputs: &FfnInputs<'_, T>) -> Self {
        Self {
            spec,
            base_gate: to_f64_vec(inputs.base_gate),
            base_up: to_f64_vec(inputs.base_up),
            base_down: to_f64_vec(inputs.base_down),
            gate: Lora::new(spec.gate.as_ref(), inputs.gate_a, inputs.gate_b),
            up: Lora::new(spec.up.as_ref(), inputs.up_a, inputs.up_b),
            down: Lora::new(spec.down.as_ref(), inputs.down_a, inputs.down_b),
        }
    }

    /// The base gate and up outputs of one token `x_row [d]`, `(x·W_gate, x·W_up)`, each `[f]`:
    /// they do not depend on the expert, so a token computes them once.
    fn base_gate_up(&self, x_row: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let (d, f) = (self.spec.d, self.spec.f);
        (matmul(x_row, &self.base_gate, 1, d, f), matmul(x_row, &self.base_up, 1, d, f))
    }

    /// `a_e = act(g_e) ⊙ u_e` of one token `x_row [d]` from its base outputs, `[f]`.
    fn activation(&self, x_row: &[f64], (g_base, u_base): &(Vec<f64>, Vec<f64>), e: usize) -> Vec<f64> {
        let (mut g, mut u) = (g_base.clone(), u_base.clone());
        if let Some(lora) = &self.gate {
            lora.add_delta(x_row, e, 1.0, &mut g);
        }
        if let Some(lora) = &self.up {
            lora.add_delta(x_row, e, 1.0, &mut u);
        }
        g.iter().zip(&u).map(|(&g, u)| self.spec.activation.apply(g) * u).collect()
    }

    /// Expert `e`'s whole FFN on one token, computed plainly: `out_e [d]` and `a_e [f]` (what the
    /// tests sum to check the linearity trick).
    #[cfg(test)]
    fn expert_out(&self, x_row: &[f64], e: usize) -> (Vec<f64>, Vec<f64>) {
        let a = self.activation(x_row, &self.base_gate_up(x_row), e);
        let mut out = matmul(&a, &self.base_down, 1, self.spec.f, self.spec.d);
        if let Some(lora) = &self.down {
            lora.add_delta(&a, e, 1.0, &mut out);
        }
        (out, a)
    }

    /// One token through the block with the linearity trick: `(y [d], a_mix [f])`. The base gate
    /// and up projections run once per token, the base down projection once on `a_mix`.
    fn token(&self, x_row: &[f64], slots: impl Iterator<Item = (usize, f64)>) -> (Vec<f64>, Vec<f64>) {
        let mut a_mix = vec![0.0; self.spec.f];
        let mut delta = vec![0.0; self.spec.d];
        let mut slots = slots.peekable();
        if slots.peek().is_none() {
            // No expert selected (an empty adapter slot): the block adds nothing.
            return (delta, a_mix);
        }
        let base = self.base_gate_up(x_row);
        for (e, w) in slots {
            let a = self.activation(x_row, &base, e);
            a_mix.iter_mut().zip(&a).for_each(|(m, a)| *m += w * a);
            if let Some(lora) = &self.down {
                lora.add_delta(&a, e, w, &mut delta);
            }
        }
        let y = matmul(&a_mix, &self.base_down, 1, self.spec.f, self.spec.d);
        (y.iter().zip(&delta).map(|(y, d)| y + d).collect(), a_mix)
    }
}

/// The routing of every token: `x · W_r (+ b)` or given logits through the rule, given weights,
/// or adapter ids; and the statistics of that routing.
fn route_block<T: Scalar>(spec: &FfnSpec, inputs: &FfnInputs<'_, T>, x: &[f64]) -> Result<(Routing, RouterStats)> {
    let (t, e) = (inputs.tokens, spec.experts);
    let scores = match (spec.router(), inputs.router_weight, inputs.logits) {
        (Some(Router::X { .. }), Some(w), _) => {
            let mut z = matmul(x, &to_f64_vec(w), t, spec.d, e);
            if let Some(b) = inputs.router_bias {
                z.chunks_mut(e).for_each(|row| row.iter_mut().zip(b).for_each(|(v, b)| *v += b.to_f64()));
            }
            Some(z)
        }
        (Some(Router::Logits), _, Some(z)) => Some(to_f64_vec(z)),
        _ => None,
    };
    let given = inputs.weights.map(to_f64_vec);
    let sel_bias = inputs.selection_bias.map(to_f64_vec);
    let input = match (&spec.gating, &scores, &given, inputs.adapter_ids) {
        (Gating::Routed { .. }, Some(z), _, _) => GateInput::Scores(z, sel_bias.as_deref()),
        (Gating::Given { .. }, _, Some(w), _) => GateInput::Weights(w),
        (Gating::AdapterIds, _, _, Some(ids)) => GateInput::AdapterIds(ids),
        _ => return Err(MoleError::Unsupported("gating inputs do not match the gating".into())),
    };
    let routing = route(&spec.gating, input, t, e)?;
    let rule = match spec.gating {
        Gating::Routed { rule, .. } => Some(rule),
        _ => None,
    };
    let z_scores = scores.as_deref().filter(|_| rule.is_some_and(|r| r.has_z_loss()));
    let stats = router_stats(&routing, z_scores, rule.and_then(|r| r.entropy()));
    Ok((routing, stats))
}

/// The selected `(expert, weight)` slots of token `t`.
fn selected(routing: &Routing, t: usize) -> impl Iterator<Item = (usize, f64)> + '_ {
    let row = t * routing.slots..(t + 1) * routing.slots;
    routing.ids[row.clone()].iter().zip(&routing.weights[row]).filter(|(&id, _)| id >= 0).map(|(&id, &w)| (id as usize, w))
}

/// The f64 reference forward of the FFN-expert block. Validates the spec and every input first,
/// and checks the memory it needs against what the host has; zero tokens return empty outputs.
pub fn ffn_forward<T: Scalar>(spec: &FfnSpec, inputs: &FfnInputs<'_, T>) -> Result<FfnOutput> {
    spec.validate()?;
    check_inputs(spec, inputs)?;
    let (t, d, f, e) = (inputs.tokens, spec.d, spec.f, spec.experts);
    let rank = |l: Option<&ProjectionLora>| l.map_or(0, |l| l.ranks.total_rank());
    let threads = rayon::current_num_threads();
    let need = crate::limits::Footprint::new()
        .add("x and y [T, d]", &[3, t, d], 8)?
        .add("base weights [d, f]", &[3, d, f], 8)?
        .add("LoRA banks", &[rank(spec.gate.as_ref()) + rank(spec.up.as_ref()), d + f], 8)?
        .add("down LoRA bank", &[rank(spec.down.as_ref()), f + d], 8)?
        .add("a_mix [T, f]", &[2, t, f], 8)?
        .add("per-thread rows [threads, f]", &[threads, 4, f], 8)?
        .add("scores and probabilities [T, E]", &[4, t, e], 8)?
        .add("routing [T, slots]", &[t, spec.slots()], 12)?
        .bytes();
    crate::limits::check_host(&format!("the f64 reference of this FFN block on {t} tokens"), need)?;

    let x = to_f64_vec(inputs.x);
    let (routing, stats) = route_block(spec, inputs, &x)?;
    let block = Block::new(spec, inputs);
    let rows: Vec<(Vec<f64>, Vec<f64>)> =
        (0..t).into_par_iter().map(|tok| block.token(&x[tok * d..(tok + 1) * d], selected(&routing, tok))).collect();
    let (mut y, mut a_mix) = (Vec::with_capacity(t * d), Vec::with_capacity(t * f));
    for (y_row, a_row) in rows {
        y.extend(y_row);
        a_mix.extend(a_row);
    }
    Ok(FfnOutput { y, routing, a_mix, stats })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Activation, RankLayout, RoutingRule, TopKWeights};
    use crate::synth::Rng;

    fn lora(experts: usize, offsets: Option<Vec<usize>>, rank: usize, scale: f64) -> Option<ProjectionLora> {
        let ranks = match offsets {
            Some(o) => RankLayout::from_offsets(o).unwrap(),
            None => RankLayout::uniform(experts, rank).unwrap(),
        };
        Some(ProjectionLora { ranks, scale })
    }

    fn topk(k: usize, bias: bool) -> Gating {
        Gating::Routed {
            router: Router::X { bias },
            rule: RoutingRule::SoftmaxTopK { k, temperature: 1.0, weights: TopKWeights::Renormalized },
        }
    }

    /// A block of 5 experts with ragged gate ranks (one expert of rank 0).
    fn spec(gating: Gating, activation: Activation) -> FfnSpec {
        FfnSpec {
            d: 12,
            f: 20,
            activation,
            gating,
            experts: 5,
            gate: lora(5, Some(vec![0, 3, 3, 7, 8, 12]), 0, 1.5),
            up: lora(5, None, 2, 0.75),
            down: lora(5, None, 3, 2.0),
        }
    }

    /// Random non-zero tensors for `spec` on `tokens` tokens.
    struct Data {
        tokens: usize,
        x: Vec<f64>,
        router_weight: Vec<f64>,
        router_bias: Vec<f64>,
        base: [Vec<f64>; 3],
        banks: [Option<(Vec<f64>, Vec<f64>)>; 3],
    }

    impl Data {
        fn new(spec: &FfnSpec, tokens: usize, seed: u64) -> Self {
            let mut rng = Rng::new(seed);
            let (d, f, e) = (spec.d, spec.f, spec.experts);
            let mut bank = |l: Option<&ProjectionLora>, n_in: usize, n_out: usize| {
                l.map(|l| (rng.fill(n_in * l.ranks.total_rank(), 0.5), rng.fill(l.ranks.total_rank() * n_out, 0.5)))
            };
            let banks = [bank(spec.gate.as_ref(), d, f), bank(spec.up.as_ref(), d, f), bank(spec.down.as_ref(), f, d)];
            Self {
                tokens,
                x: rng.fill(tokens * d, 1.0),
                router_weight: rng.fill(d * e, 1.0),
                router_bias: rng.fill(e, 1.0),
                base: [rng.fill(d * f, 0.4), rng.fill(d * f, 0.4), rng.fill(f * d, 0.4)],
                banks,
            }
        }

        fn inputs(&self, spec: &FfnSpec) -> FfnInputs<'_, f64> {
            let [g, u, dn] = &self.banks;
            fn a(bank: &Option<(Vec<f64>, Vec<f64>)>) -> Option<&[f64]> {
                bank.as_ref().map(|(a, _)| a.as_slice())
            }
            fn b(bank: &Option<(Vec<f64>, Vec<f64>)>) -> Option<&[f64]> {
                bank.as_ref().map(|(_, b)| b.as_slice())
            }
            FfnInputs {
                router_weight: matches!(spec.router(), Some(Router::X { .. })).then_some(&self.router_weight[..]),
                router_bias: (spec.router() == Some(Router::X { bias: true })).then_some(&self.router_bias[..]),
                gate_a: a(g),
                gate_b: b(g),
                up_a: a(u),
                up_b: b(u),
                down_a: a(dn),
                down_b: b(dn),
                ..FfnInputs::new(self.tokens, &self.x, &self.base[0], &self.base[1], &self.base[2])
            }
        }

        /// Expert `e`'s LoRA FFN on token `t` by plain loops, independent of the forward.
        fn naive(&self, spec: &FfnSpec, t: usize, e: usize) -> Vec<f64> {
            let (d, f) = (spec.d, spec.f);
            let x = &self.x[t * d..(t + 1) * d];
            // v [n_in] · W [n_in, n_out] + s · (v · A_e) · B_e for projection p.
            let project = |p: usize, v: &[f64], n_out: usize| -> Vec<f64> {
                let lora = spec.projections()[p].1;
                (0..n_out)
                    .map(|j| {
                        let mut acc: f64 = (0..v.len()).map(|i| v[i] * self.base[p][i * n_out + j]).sum();
                        if let (Some(l), Some((a, b))) = (lora, &self.banks[p]) {
                            let r = l.ranks.total_rank();
                            for c in l.ranks.cols(e) {
                                let h: f64 = (0..v.len()).map(|i| v[i] * a[i * r + c]).sum();
                                acc += l.scale * h * b[c * n_out + j];
                            }
                        }
                        acc
                    })
                    .collect()
            };
            let (g, u) = (project(0, x, f), project(1, x, f));
            let a: Vec<f64> = (0..f).map(|j| spec.activation.apply(g[j]) * u[j]).collect();
            project(2, &a, d)
        }
    }

    fn scaled_error(got: &[f64], want: &[f64]) -> f64 {
        assert_eq!(got.len(), want.len());
        crate::reference::max_scaled_error(got, want)
    }

    #[test]
    fn k1_routes_each_token_to_the_argmax_experts_plain_lora_ffn() {
        for (activation, bias) in [(Activation::Silu, false), (Activation::Gelu, true)] {
            let spec = spec(topk(1, bias), activation);
            let data = Data::new(&spec, 9, 1);
            let out = ffn_forward(&spec, &data.inputs(&spec)).unwrap();
            let mut chosen = std::collections::BTreeSet::new();
            for t in 0..data.tokens {
                // The argmax of x · W_r + b, by plain loops.
                let score = |e: usize| {
                    (0..spec.d).map(|i| data.x[t * spec.d + i] * data.router_weight[i * spec.experts + e]).sum::<f64>()
                        + if bias { data.router_bias[e] } else { 0.0 }
                };
                let e = (0..spec.experts).max_by(|&a, &b| score(a).total_cmp(&score(b))).unwrap();
                assert_eq!((out.routing.ids[t], out.routing.weights[t]), (e as i32, 1.0), "token {t}");
                chosen.insert(e);
                let err = scaled_error(&out.y[t * spec.d..(t + 1) * spec.d], &data.naive(&spec, t, e));
                assert!(err < 1e-13, "{activation:?} token {t}: {err:.3e}");
            }
            assert!(chosen.len() >= 2, "the tokens all chose {chosen:?}");
        }
    }

    #[test]
    fn the_linearity_trick_equals_the_per_expert_sum() {
        let rules = [
            topk(2, true),
            topk(3, false),
            Gating::Routed { router: Router::X { bias: false }, rule: RoutingRule::TopP { p: 0.7, temperature: 1.0 } },
            Gating::Routed {
                router: Router::X { bias: false },
                rule: RoutingRule::DynMole {
                    q: 1.1,
                    top_p: 0.6,
                    keep_top_k: 1,
                    entropy_threshold: 0.95,
                    entropy_eps: 1e-5,
                },
            },
            Gating::Routed { router: Router::X { bias: false }, rule: RoutingRule::DenseSoftmax { temperature: 1.0 } },
        ];
        for (i, gating) in rules.into_iter().enumerate() {
            let spec = spec(gating, if i % 2 == 0 { Activation::Silu } else { Activation::Gelu });
            let data = Data::new(&spec, 11, 10 + i as u64);
            let out = ffn_forward(&spec, &data.inputs(&spec)).unwrap();
            let block = Block::new(&spec, &data.inputs(&spec));
            let (mut want_y, mut want_a) = (vec![], vec![]);
            for t in 0..data.tokens {
                let (mut y, mut a_mix) = (vec![0.0; spec.d], vec![0.0; spec.f]);
                for (e, w) in selected(&out.routing, t) {
                    let (out_e, a_e) = block.expert_out(&data.x[t * spec.d..(t + 1) * spec.d], e);
                    y.iter_mut().zip(out_e).for_each(|(y, o)| *y += w * o);
                    a_mix.iter_mut().zip(a_e).for_each(|(m, a)| *m += w * a);
                }
                want_y.extend(y);
                want_a.extend(a_mix);
            }
            assert!(want_y.iter().any(|&v| v.abs() > 1e-3), "{gating:?}: y is all but zero");
            let (ey, ea) = (scaled_error(&out.y, &want_y), scaled_error(&out.a_mix, &want_a));
            assert!(ey <= 1e-12 && ea <= 1e-12, "{gating:?}: y {ey:.3e}, a_mix {ea:.3e}");
            assert!(out.stats.mean_prob.is_some() && out.stats.entropy.is_some(), "{gating:?}");
        }
    }

    #[test]
    fn experts_sharing_one_lora_are_the_unrouted_lora_ffn() {
        for gating in [topk(2, true), topk(4, false)] {
            let mut spec = spec(gating, Activation::Gelu);
            spec.gate = lora(5, None, 3, 1.5);
            let mut data = Data::new(&spec, 7, 3);
            // Every expert's columns (rows of B) are expert 0's.
            for (p, lora) in [spec.gate.clone(), spec.up.clone(), spec.down.clone()].into_iter().enumerate() {
                let (r, rank) = (lora.as_ref().unwrap().ranks.total_rank(), lora.unwrap().ranks.rank(0));
                let (a, b) = data.banks[p].as_mut().unwrap();
                for row in a.chunks_mut(r) {
                    let first = row[..rank].to_vec();
                    row.chunks_mut(rank).for_each(|c| c.copy_from_slice(&first));
                }
                let n_out = b.len() / r;
                let first = b[..rank * n_out].to_vec();
                b.chunks_mut(rank * n_out).for_each(|c| c.copy_from_slice(&first));
            }
            let out = ffn_forward(&spec, &data.inputs(&spec)).unwrap();
            for t in 0..data.tokens {
                let sum: f64 = selected(&out.routing, t).map(|(_, w)| w).sum();
                assert!((sum - 1.0).abs() < 1e-15, "token {t}: weights sum to {sum}");
                let err = scaled_error(&out.y[t * spec.d..(t + 1) * spec.d], &data.naive(&spec, t, 0));
                assert!(err < 1e-13, "token {t}: {err:.3e}");
            }
        }
    }

    #[test]
    fn without_lora_the_block_is_the_base_ffn() {
        let mut spec = spec(topk(2, false), Activation::Silu);
        let data = Data::new(&spec, 6, 4);
        (spec.gate, spec.up, spec.down) = (None, None, None);
        let data = Data { banks: [None, None, None], ..data };
        let out = ffn_forward(&spec, &data.inputs(&spec)).unwrap();
        let want: Vec<f64> = (0..data.tokens).flat_map(|t| data.naive(&spec, t, 0)).collect();
        assert!(want.iter().any(|&v| v.abs() > 1e-3));
        assert!(scaled_error(&out.y, &want) < 1e-13);
        // Only the down projection adapted: the gate and up are the base's.
        let mut down_only = spec.clone();
        down_only.down = lora(5, None, 2, 1.0);
        let data = Data::new(&down_only, 6, 5);
        assert!(data.banks[0].is_none() && data.banks[2].is_some());
        let out = ffn_forward(&down_only, &data.inputs(&down_only)).unwrap();
        for t in 0..data.tokens {
            let want: Vec<f64> = selected(&out.routing, t).fold(vec![0.0; spec.d], |mut acc, (e, w)| {
                acc.iter_mut().zip(data.naive(&down_only, t, e)).for_each(|(a, o)| *a += w * o);
                acc
            });
            assert!(scaled_error(&out.y[t * spec.d..(t + 1) * spec.d], &want) < 1e-13, "token {t}");
        }
    }

    #[test]
    fn every_gating_input_routes_the_block() {
        let spec = spec(topk(1, false), Activation::Gelu);
        let data = Data::new(&spec, 6, 8);
        let routed = ffn_forward(&spec, &data.inputs(&spec)).unwrap();
        // Given logits x · W_r through the same rule: the same block.
        let logits = matmul(&data.x, &data.router_weight, data.tokens, spec.d, spec.experts);
        let rule = match spec.gating {
            Gating::Routed { rule, .. } => rule,
            _ => unreachable!(),
        };
        let by_logits = FfnSpec { gating: Gating::Routed { router: Router::Logits, rule }, ..spec.clone() };
        let inputs = FfnInputs { router_weight: None, logits: Some(&logits), ..data.inputs(&spec) };
        assert_eq!(ffn_forward(&by_logits, &inputs).unwrap().y, routed.y);
        // Adapter ids (one-hot, weight 1) and one-hot given weights pick the same experts; -1 adds
        // nothing.
        let mut ids: Vec<i32> = routed.routing.ids.clone();
        ids[3] = -1;
        let by_ids = FfnSpec { gating: Gating::AdapterIds, ..spec.clone() };
        let inputs = FfnInputs { router_weight: None, adapter_ids: Some(&ids), ..data.inputs(&spec) };
        let out = ffn_forward(&by_ids, &inputs).unwrap();
        let mut one_hot = vec![0.0; data.tokens * spec.experts];
        for (t, &id) in ids.iter().enumerate() {
            let row = t * spec.d..(t + 1) * spec.d;
            if id < 0 {
                assert!(out.y[row].iter().all(|&v| v == 0.0), "token {t}");
                continue;
            }
            one_hot[t * spec.experts + id as usize] = 1.0;
            assert_eq!(out.y[row.clone()], routed.y[row], "token {t}");
        }
        let given = FfnSpec { gating: Gating::Given { top_k: Some(1), softmax_topk: false }, ..spec.clone() };
        let inputs = FfnInputs { router_weight: None, weights: Some(&one_hot), ..data.inputs(&spec) };
        assert_eq!(ffn_forward(&given, &inputs).unwrap().y, out.y);
        // f32 inputs widen exactly: the block of the f32-rounded tensors.
        let r32 = |v: &[f64]| -> Vec<f32> { v.iter().map(|&x| x as f32).collect() };
        let (x, w) = (r32(&data.x), r32(&data.router_weight));
        let base = [r32(&data.base[0]), r32(&data.base[1]), r32(&data.base[2])];
        let banks: Vec<(Vec<f32>, Vec<f32>)> =
            data.banks.iter().map(|b| b.as_ref().map(|(a, b)| (r32(a), r32(b))).unwrap()).collect();
        let narrow = FfnInputs {
            router_weight: Some(&w[..]),
            gate_a: Some(&banks[0].0[..]),
            gate_b: Some(&banks[0].1[..]),
            up_a: Some(&banks[1].0[..]),
            up_b: Some(&banks[1].1[..]),
            down_a: Some(&banks[2].0[..]),
            down_b: Some(&banks[2].1[..]),
            ..FfnInputs::new(data.tokens, &x[..], &base[0][..], &base[1][..], &base[2][..])
        };
        let got = ffn_forward(&spec, &narrow).unwrap();
        let wide = |v: &[f32]| -> Vec<f64> { v.iter().map(|&x| x as f64).collect() };
        let widened = Data {
            x: wide(&x),
            router_weight: wide(&w),
            base: [wide(&base[0]), wide(&base[1]), wide(&base[2])],
            banks: [0, 1, 2].map(|p| Some((wide(&banks[p].0), wide(&banks[p].1)))),
            ..data
        };
        assert_eq!(got, ffn_forward(&spec, &widened.inputs(&spec)).unwrap());
    }

    #[test]
    fn inputs_are_checked_by_name() {
        let spec = spec(topk(2, false), Activation::Silu);
        let data = Data::new(&spec, 4, 6);
        let inputs = data.inputs(&spec);
        let err = ffn_forward(&spec, &FfnInputs { base_down: &data.base[0][1..], ..inputs }).unwrap_err();
        assert!(matches!(err, MoleError::ShapeMismatch { what: "base_down", .. }), "{err}");
        let err = ffn_forward(&spec, &FfnInputs { down_a: None, ..inputs }).unwrap_err();
        assert_eq!(err, MoleError::MissingInput { name: "down_a", needed_by: "a projection with LoRA" });
        let err = ffn_forward(&spec, &FfnInputs { router_bias: Some(&data.router_bias), ..inputs }).unwrap_err();
        assert!(matches!(err, MoleError::UnexpectedInput { name: "router_bias", .. }), "{err}");
        let err = ffn_forward(&spec, &FfnInputs { up_b: Some(&data.base[0]), ..inputs }).unwrap_err();
        assert!(matches!(err, MoleError::ShapeMismatch { what: "up_b", .. }), "{err}");
        let mut bad = spec.clone();
        bad.experts = 0;
        assert_eq!(ffn_forward(&bad, &inputs).unwrap_err(), MoleError::ZeroDimension { name: "experts" });
        let ids = FfnSpec { gating: Gating::AdapterIds, ..spec.clone() };
        let err = ffn_forward(&ids, &FfnInputs { router_weight: None, adapter_ids: Some(&[0, 1, 5, -1]), ..inputs })
            .unwrap_err();
        assert!(matches!(err, MoleError::ExpertIdOutOfRange { token: 2, id: 5, .. }), "{err}");
        // Zero tokens: empty outputs.
        let none = ffn_forward(&spec, &FfnInputs { tokens: 0, x: &[], ..inputs }).unwrap();
        assert!(none.y.is_empty() && none.a_mix.is_empty());
    }
}
