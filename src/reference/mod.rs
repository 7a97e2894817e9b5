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

// The building blocks are public API with the `internals` feature; the composed forwards,
// routing and statistics below are what a framework cross-checks against.
crate::internal_mod!(grouped);
crate::internal_mod!(layer);
crate::internal_mod!(linalg);
crate::internal_mod!(mix);
crate::internal_mod!(routing);
crate::internal_mod!(stats);

pub use grouped::{grouped_forward, Bank};
pub use layer::{forward, forward_shard, LayerOutput};
pub use routing::{route, GateInput, Routing};
pub use stats::{flylora_bias_update, router_stats, RouterStats};

use crate::DType;

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
}
