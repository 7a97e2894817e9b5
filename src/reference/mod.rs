//! The f64 CPU reference: the oracle every kernel is tested against.
//!
//! Each operation of the model is one short function that reads like its equation, parallel
//! over tokens with rayon; simple beats fast. Inputs may be any [`crate::Scalar`]; all
//! arithmetic is f64.
//!
//! - `linalg`: shrink `h = x · A` and expand `y + scale · h' · B`.
//! - `routing`: scores to `(expert, weight)` slots, one function per rule.
//! - `stats`: router statistics for auxiliary losses.
//! - `mix`: the low-rank mix (expert scaling, CoMoL core merge).
//! - `grouped`: the same layer computed per expert segment of the routing plan.
//! - `layer`: the composed forward (of a whole layer or of an expert shard).
//! - `ffn`: the FFN-expert block (MixLoRA), experts that are whole LoRA-adapted FFNs.

// The building blocks are public API with the `internals` feature; the composed forwards,
// routing and statistics below are what a framework cross-checks against.
crate::internal_mod!(ffn);
crate::internal_mod!(grouped);
crate::internal_mod!(layer);
crate::internal_mod!(linalg);
crate::internal_mod!(mix);
crate::internal_mod!(routing);
crate::internal_mod!(stats);

pub use ffn::{ffn_forward, FfnInputs, FfnOutput};
pub use grouped::{grouped_forward, Bank};
pub use layer::{forward, forward_shard, LayerOutput};
pub use routing::{route, GateInput, Routing};
pub use stats::{flylora_bias_update, router_stats, RouterStats};

use crate::model::{LayerSpec, Router};
use crate::{DType, Result};

/// The bytes the f64 reference ([`crate::reference::forward`]) allocates for `spec` on `tokens`
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

/// Relative error bound for a result of a length-`reduction_len` dot product computed from
/// `dtype` inputs with f32 accumulation and stored as `dtype`, as a multiple of the sum of
/// absolute products `Σ|a_i b_i|` (plus `|result|` for the final rounding):
/// `|got - exact| <= tolerance(dtype, n) · (Σ|a_i b_i| + |exact|)`.
///
/// It is the worst-case `γ_n = n·u_f32 / (1 - n·u_f32)` of recursive summation plus the unit
/// roundoff of the storage format, with a factor 2 of headroom for the two roundings a fused
/// kernel may add (f32 intermediate, final store).
pub fn tolerance(dtype: DType, reduction_len: usize) -> f64 {
    tolerance_with(dtype.unit_roundoff(), f64::powi(2.0, -24), reduction_len)
}

/// Max of `|got - want| / (1 + |want|)`.
pub fn max_scaled_error(got: &[f64], want: &[f64]) -> f64 {
    got.iter().zip(want).map(|(g, w)| (g - w).abs() / (1.0 + w.abs())).fold(0.0, f64::max)
}

/// [`tolerance`] for explicit storage (`u_store`) and accumulation (`u_acc`) unit roundoffs.
pub fn tolerance_with(u_store: f64, u_acc: f64, reduction_len: usize) -> f64 {
    let nu = reduction_len.max(1) as f64 * u_acc;
    2.0 * (nu / (1.0 - nu).max(f64::MIN_POSITIVE) + u_store)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tolerance_grows_with_length_and_coarser_dtype() {
        assert!(tolerance(DType::F32, 4096) > tolerance(DType::F32, 16));
        assert!(tolerance(DType::BF16, 16) > tolerance(DType::F16, 16));
        assert!(tolerance(DType::F16, 16) > tolerance(DType::F32, 16));
        // bf16 storage dominates short reductions: about 2 · 2^-8.
        assert!((tolerance(DType::BF16, 1) - 2.0 * (f64::powi(2.0, -8) + f64::powi(2.0, -24))).abs() < 1e-12);
    }

    #[test]
    fn only_core_merge_layers_count_cores() {
        use crate::model::{Method, MethodShape};
        // A serving bank of 1024 adapters at r = 16 on d = 64: a few MiB, not E·R² cores.
        let shape = MethodShape { d_in: 64, d_out: 64, experts: 1024, rank: 16, k: 2, alpha: 32.0 };
        let serving = Method::AdapterServing.spec(shape).unwrap();
        let bytes = host_bytes(&serving, 4).unwrap();
        assert!(bytes < 32 << 20, "{}", crate::limits::format_bytes(bytes));
        assert!(crate::limits::check_host("adapter serving", bytes).is_ok());
        // CoMoL's C cores of [R, R] are counted, with one merged core per thread.
        let comol = Method::Comol.spec(MethodShape { experts: 8, rank: 64, ..shape }).unwrap();
        let with_cores = host_bytes(&comol, 4).unwrap();
        let cores = (8 + rayon::current_num_threads() as u64) * 64 * 64 * 8;
        assert!(
            with_cores >= cores,
            "{} < {}",
            crate::limits::format_bytes(with_cores),
            crate::limits::format_bytes(cores)
        );
    }
}
