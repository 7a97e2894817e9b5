//! The composed layer forward: shrink → route → mix → expand, each step a call into the
//! modules beside this one.

use super::linalg::{expand, matmul, shrink};
use super::mix::{core_merge, expert_scale, scale_experts};
use super::routing::{route, GateInput, Routing};
use super::stats::{router_stats, RouterStats};
use crate::dtype::{to_f64_vec, Scalar};
use crate::model::{Balance, ExpertShard, Gating, LayerInputs, LayerSpec, Mix, Router};
use crate::{MoleError, Result};

/// Everything one layer call produces, in f64.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerOutput {
    /// `y + scale · h_mixed · B`, `[T, d_out]`.
    pub y: Vec<f64>,
    /// The shrink output `h = x · A`, `[T, R]`.
    pub h: Vec<f64>,
    /// The mixed low-rank activations `h'` times the per-expert scales
    /// ([`LayerSpec::expert_scales`]), `[T, R]`: what the expand multiplies by `B`.
    pub h_mixed: Vec<f64>,
    /// Router scores `z [T, E]` where the gating has them (computed or given logits).
    pub scores: Option<Vec<f64>>,
    /// Per-token expert ids and weights.
    pub routing: Routing,
    /// Auxiliary-loss statistics.
    pub stats: RouterStats,
    /// The weighted sum of the auxiliary losses the spec declares
    /// ([`crate::model::AuxLosses`]); 0 without any.
    pub aux_loss: f64,
}

/// The bytes the f64 reference ([`forward`]) allocates for `spec` on `tokens`
/// tokens: the inputs widened to f64, `h`, `h'`, the scores and probabilities, the routing and
/// the output `y`, each counted once (an upper bound, not a measurement).
pub fn host_bytes(spec: &LayerSpec, tokens: usize) -> Result<u64> {
    let (t, r, e) = (tokens, spec.total_rank(), spec.routed_experts());
    let (d_in, d_out, slots) = (spec.d_in, spec.d_out, spec.slots());
    let w_rows = if matches!(spec.router(), Some(Router::H { .. })) { r } else { d_in };
    let merge_threads = if spec.core_count() > 0 { rayon::current_num_threads() } else { 0 };
    Ok(crate::limits::Footprint::new()
        .add("x [T, d_in]", &[2, t, d_in], 8)?
        .add("A [d_in, R]", &[d_in, r], 8)?
        .add("B [R, d_out]", &[r, d_out], 8)?
        .add("y [T, d_out]", &[3, t, d_out], 8)?
        .add("h and h' [T, R]", &[3, t, r], 8)?
        .add("scores and probabilities [T, E]", &[4, t, e], 8)?
        .add("router_weight", &[w_rows, e], 8)?
        .add("routing [T, slots]", &[t, slots], 12)?
        .add("cores [C, R, R]", &[spec.core_count(), r, r], 8)?
        // The core merge builds one merged [R, R] core per token, one at a time per thread.
        .add("merged cores [threads, R, R]", &[merge_threads, r, r], 8)?
        .bytes())
}

fn opt<T: Scalar>(v: Option<&[T]>) -> Option<Vec<f64>> {
    v.map(to_f64_vec)
}

/// Router scores `z [T, E]`: `x · W_g (+ b)`, `h · W_r (+ b)`, `h` itself, or given logits.
pub fn router_scores<T: Scalar>(
    spec: &LayerSpec,
    inputs: &LayerInputs<'_, T>,
    x: &[f64],
    h: &[f64],
) -> Option<Vec<f64>> {
    let (t, e) = (inputs.tokens, spec.routed_experts());
    let add_bias = |mut z: Vec<f64>| {
        if let Some(b) = inputs.router_bias {
            for row in z.chunks_mut(e) {
                row.iter_mut().zip(b).for_each(|(v, b)| *v += b.to_f64());
            }
        }
        z
    };
    match spec.router()? {
        Router::X { .. } => Some(add_bias(matmul(x, &to_f64_vec(inputs.router_weight?), t, spec.d_in, e))),
        Router::H { .. } => Some(add_bias(matmul(h, &to_f64_vec(inputs.router_weight?), t, spec.total_rank(), e))),
        Router::LowRank => Some(h.to_vec()),
        Router::Logits => opt(inputs.logits),
    }
}

/// The f64 reference forward of one layer. Validates the spec and every input first, and checks
/// the memory it needs against what the host has (`crate::limits::check_host`); zero tokens
/// return empty outputs.
pub fn forward<T: Scalar>(spec: &LayerSpec, inputs: &LayerInputs<'_, T>) -> Result<LayerOutput> {
    inputs.validate(spec)?;
    let (t, r, e) = (inputs.tokens, spec.total_rank(), spec.routed_experts());
    let need = host_bytes(spec, t)?;
    crate::limits::check_host(&format!("the f64 reference of this layer on {t} tokens"), need)?;
    let x = to_f64_vec(inputs.x);

    // Shrink.
    let h = shrink(&x, &to_f64_vec(inputs.a), t, spec.d_in, r);

    // Route.
    let scores = router_scores(spec, inputs, &x, &h);
    let given = opt(inputs.weights);
    let sel_bias = opt(inputs.selection_bias);
    let gate_input = match (&spec.gating, &scores, &given, inputs.adapter_ids) {
        (Gating::Routed { .. }, Some(z), _, _) => GateInput::Scores(z, sel_bias.as_deref()),
        (Gating::Given { .. }, _, Some(w), _) => GateInput::Weights(w),
        (_, _, _, Some(ids)) => GateInput::AdapterIds(ids),
        _ => return Err(MoleError::Unsupported("gating inputs do not match the gating".into())),
    };
    let routing = route(&spec.gating, gate_input, t, e)?;
    let entropy = spec.rule().and_then(|r| r.entropy());
    let z_scores = scores.as_deref().filter(|_| spec.rule().is_some_and(|r| r.has_z_loss()));
    let stats = router_stats(&routing, z_scores, entropy);

    // Mix, then the per-expert scales (for CoMoL, one scale over the shared expert's columns).
    let mut h_mixed = match spec.mix {
        Mix::ExpertScale => expert_scale(&h, &routing, &spec.ranks),
        Mix::CoreMerge { .. } => core_merge(&h, &routing, &to_f64_vec(inputs.cores.unwrap_or_default()), r),
    };
    if let Some(scales) = &spec.expert_scales {
        scale_experts(&mut h_mixed, &spec.ranks, scales);
    }

    // Expand.
    let y = expand(&h_mixed, &to_f64_vec(inputs.b), &to_f64_vec(inputs.y), spec.scale, t, r, spec.d_out);
    let aux_loss = aux_loss(spec, &stats);
    Ok(LayerOutput { y, h, h_mixed, scores, routing, stats, aux_loss })
}

/// The weighted sum of the auxiliary losses `spec` declares, from one call's statistics (each
/// loss the statistics lack counts 0: the spec's validation refuses such declarations).
pub fn aux_loss(spec: &LayerSpec, stats: &RouterStats) -> f64 {
    let l = spec.training.aux_losses;
    let balance = match l.balance {
        Balance::Switch => stats.switch_load_balancing_loss(),
        Balance::DynMole => stats.dynmole_load_balancing_loss(),
        Balance::LlavaMole => stats.llava_mole_load_balancing_loss(),
    };
    let term = |coef: f64, v: Option<f64>| if coef == 0.0 { 0.0 } else { coef * v.unwrap_or(0.0) };
    term(l.load_balancing, balance) + term(l.z_loss, stats.z_loss) + term(l.entropy, stats.entropy)
}

/// The f64 reference forward of the expert shard `shard` of `spec` (see [`ExpertShard`]):
/// `inputs.a [d_in, R_shard]` and `inputs.b [R_shard, d_out]` hold only the shard's rank columns,
/// everything else is the whole layer's. It is the whole layer's forward on a bank whose other
/// experts' columns are zero, so `h` and `h_mixed` are `[T, R]` over the whole bank (zero outside
/// [`ExpertShard::rank_cols`]) and the routing and statistics are the whole layer's.
///
/// Errors: the shard's ([`ExpertShard::validate`]), `A` or `B` not of the shard's size, and every
/// error of [`forward`].
pub fn forward_shard<T: Scalar>(
    spec: &LayerSpec,
    shard: ExpertShard,
    inputs: &LayerInputs<'_, T>,
) -> Result<LayerOutput> {
    shard.validate(spec)?;
    let (d_in, d_out, r) = (spec.d_in, spec.d_out, spec.total_rank());
    let cols = shard.rank_cols(&spec.ranks);
    let r_shard = cols.len();
    for (what, got, want) in [
        ("A (the shard's columns)", inputs.a.len(), d_in * r_shard),
        ("B (the shard's rows)", inputs.b.len(), r_shard * d_out),
    ] {
        if got != want {
            return Err(MoleError::ShapeMismatch { what, expected: vec![want], got });
        }
    }
    let zero = T::from_f64(0.0);
    let mut a = vec![zero; d_in * r];
    if r_shard > 0 {
        for (row, shard_row) in a.chunks_mut(r).zip(inputs.a.chunks(r_shard)) {
            row[cols.clone()].copy_from_slice(shard_row);
        }
    }
    let mut b = vec![zero; r * d_out];
    b[cols.start * d_out..cols.end * d_out].copy_from_slice(inputs.b);
    forward(spec, &LayerInputs { a: &a, b: &b, ..*inputs })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::STANDARD_METHODS;
    use crate::model::{MethodShape, RankLayout};
    use crate::synth::SyntheticLayer;

    /// The deltas of the shards of `partition` of `spec` on the same tokens, summed, and the whole
    /// layer's delta; asserts every shard adds something.
    fn deltas(spec: &LayerSpec, partition: &[ExpertShard], seed: u64) -> (Vec<f64>, Vec<f64>) {
        let data = SyntheticLayer::<f64>::new(spec, 29, seed);
        let y0 = &data.y;
        let full = forward(spec, &data.inputs()).unwrap().y;
        let mut sum = vec![0.0; y0.len()];
        for shard in partition {
            let (a, b) = shard.take_bank(&spec.ranks, spec.d_in, &data.a, &data.b).unwrap();
            let y = forward_shard(spec, *shard, &LayerInputs { a: &a, b: &b, ..data.inputs() }).unwrap().y;
            assert!(y.iter().zip(y0).any(|(y, y0)| y != y0), "{shard:?} adds nothing");
            sum.iter_mut().zip(y.iter().zip(y0)).for_each(|(s, (y, y0))| *s += y - y0);
        }
        (sum, full.iter().zip(y0).map(|(y, y0)| y - y0).collect())
    }

    #[test]
    fn the_shards_of_a_partition_sum_to_the_whole_layer() {
        let shape = |experts, rank, k| MethodShape { d_in: 24, d_out: 20, experts, rank, k, alpha: 2.0 };
        let mut specs: Vec<LayerSpec> = STANDARD_METHODS
            .iter()
            .map(|&(method, experts, rank, k)| method.spec(shape(experts, rank.min(8), k)).unwrap())
            .filter(|spec| ExpertShard { first: 0, count: 1 }.validate(spec).is_ok())
            .collect();
        assert!(specs.len() >= 8, "{} methods shard", specs.len());
        // Uneven ranks, one expert of rank 0.
        let mut uneven = specs[0].clone();
        uneven.ranks = RankLayout::from_offsets(vec![0, 3, 3, 10, 12, 20, 21, 29, 32]).unwrap();
        specs.push(uneven);
        for (i, spec) in specs.iter().enumerate() {
            let experts = spec.ranks.num_experts();
            for shards in [2, 3] {
                let partition = ExpertShard::partition(experts, shards).unwrap();
                let (sum, full) = deltas(spec, &partition, 7 + i as u64);
                let err = crate::reference::max_scaled_error(&sum, &full);
                assert!(err <= 1e-12, "{:?} in {shards} shards: {err:.3e}", spec.gating);
            }
        }
        // A shard of every expert is the layer.
        let data = SyntheticLayer::<f64>::new(&specs[0], 5, 3);
        let whole = ExpertShard { first: 0, count: specs[0].ranks.num_experts() };
        assert_eq!(
            forward_shard(&specs[0], whole, &data.inputs()).unwrap(),
            forward(&specs[0], &data.inputs()).unwrap()
        );
    }

    #[test]
    fn a_shard_takes_its_own_columns_only() {
        let (method, experts, rank, k) = STANDARD_METHODS[0];
        let spec = method.spec(MethodShape { d_in: 8, d_out: 8, experts, rank, k, alpha: 2.0 }).unwrap();
        let data = SyntheticLayer::<f64>::new(&spec, 3, 1);
        // The whole bank's A is not a shard's.
        let err = forward_shard(&spec, ExpertShard { first: 2, count: 3 }, &data.inputs()).unwrap_err();
        assert!(matches!(err, MoleError::ShapeMismatch { .. }), "{err}");
        let err = forward_shard(&spec, ExpertShard { first: 7, count: 3 }, &data.inputs()).unwrap_err();
        assert!(matches!(err, MoleError::InvalidParameter { name: "shard", .. }), "{err}");
    }
}
