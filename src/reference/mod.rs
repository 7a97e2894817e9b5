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
//! - `backward`: the gradients of the expert-scale layer (selection held constant).
//! - `ffn`: the FFN-expert block (MixLoRA), experts that are whole LoRA-adapted FFNs.

// The building blocks are public API with the `internals` feature; the composed forwards,
// routing and statistics below are what a framework cross-checks against.
crate::internal_mod!(backward);
crate::internal_mod!(ffn);
crate::internal_mod!(grouped);
crate::internal_mod!(layer);
crate::internal_mod!(linalg);
crate::internal_mod!(mix);
crate::internal_mod!(routing);
crate::internal_mod!(stats);

pub use backward::{backward, LayerGrads};
#[cfg_attr(not(feature = "cli"), allow(unused_imports))]
pub(crate) use ffn::check_inputs as check_ffn_inputs;
pub use ffn::{ffn_forward, FfnInputs, FfnOutput};
// The grouped formulation checks the grouped kernels: public with `internals`.
#[cfg(feature = "internals")]
pub use grouped::{grouped_forward, Bank};
// The reference's memory estimate: public with `internals` (the command line checks it).
#[cfg(feature = "internals")]
pub use layer::host_bytes;
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

/// Max of `|got - want| / (1 + |want|)`: 0 where the two are equal (infinities included) or both
/// NaN, infinite where only one is NaN or they are different infinities (a NaN never hides).
pub fn max_scaled_error(got: &[f64], want: &[f64]) -> f64 {
    let err = |g: f64, w: f64| {
        if g == w || (g.is_nan() && w.is_nan()) {
            0.0 // equal, infinities included
        } else {
            let e = (g - w).abs() / (1.0 + w.abs());
            // A NaN where a number (or another infinity) was expected is as wrong as it gets.
            if e.is_nan() {
                f64::INFINITY
            } else {
                e
            }
        }
    };
    got.iter().zip(want).map(|(&g, &w)| err(g, w)).fold(0.0, f64::max)
}

/// [`tolerance`] for explicit storage (`u_store`) and accumulation (`u_acc`) unit roundoffs.
pub fn tolerance_with(u_store: f64, u_acc: f64, reduction_len: usize) -> f64 {
    let nu = reduction_len.max(1) as f64 * u_acc;
    2.0 * (nu / (1.0 - nu).max(f64::MIN_POSITIVE) + u_store)
}

#[cfg(test)]
mod tests {
    use super::layer::host_bytes;
    use super::*;

    #[test]
    fn a_nan_or_a_wrong_infinity_is_an_infinite_error() {
        assert_eq!(max_scaled_error(&[1.0, 3.0], &[1.0, 1.0]), 1.0);
        assert_eq!(max_scaled_error(&[f64::NAN, 1.0], &[1.0, 1.0]), f64::INFINITY);
        assert_eq!(max_scaled_error(&[1.0], &[f64::NAN]), f64::INFINITY);
        assert_eq!(max_scaled_error(&[f64::INFINITY], &[f64::NEG_INFINITY]), f64::INFINITY);
        assert_eq!(max_scaled_error(&[f64::INFINITY, f64::NAN], &[f64::INFINITY, f64::NAN]), 0.0);
    }

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
