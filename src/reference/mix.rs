//! The mix in the low-rank space: expert scaling (the dense masked formulation) and CoMoL's core
//! merge; then the per-expert scales of the bank.

use super::routing::Routing;
use crate::model::RankLayout;
use rayon::prelude::*;

/// `h'[t, cols(e)] = Σ_slots(e) w · h[t, cols(e)]`; columns of unselected experts are zero.
pub fn expert_scale(h: &[f64], routing: &Routing, ranks: &RankLayout) -> Vec<f64> {
    let r = ranks.total_rank();
    let mut out = vec![0.0; h.len()];
    out.par_chunks_mut(r).enumerate().for_each(|(t, row)| {
        for s in 0..routing.slots {
            let id = routing.ids[t * routing.slots + s];
            if id >= 0 {
                let w = routing.weights[t * routing.slots + s];
                for c in ranks.cols(id as usize) {
                    row[c] += w * h[t * r + c];
                }
            }
        }
    });
    out
}

/// CoMoL: `h'[t] = h[t] · Σ_slots w · C_id`, `cores [C, r, r]`.
pub fn core_merge(h: &[f64], routing: &Routing, cores: &[f64], r: usize) -> Vec<f64> {
    let mut out = vec![0.0; h.len()];
    out.par_chunks_mut(r).enumerate().for_each(|(t, row)| {
        let mut merged = vec![0.0; r * r];
        for s in 0..routing.slots {
            let id = routing.ids[t * routing.slots + s];
            if id >= 0 {
                let w = routing.weights[t * routing.slots + s];
                let core = &cores[id as usize * r * r..(id as usize + 1) * r * r];
                for (m, c) in merged.iter_mut().zip(core) {
                    *m += w * c;
                }
            }
        }
        for (i, &h_i) in h[t * r..(t + 1) * r].iter().enumerate() {
            for (o, m) in row.iter_mut().zip(&merged[i * r..(i + 1) * r]) {
                *o += h_i * m;
            }
        }
    });
    out
}

/// The per-expert scales after the mix: `h'[t, cols(e)] *= s_e` for every bank expert `e`
/// (`scales [E]`, one per expert of `ranks`); the same as folding `s_e` into `B[cols(e), :]`.
pub fn scale_experts(h_mixed: &mut [f64], ranks: &RankLayout, scales: &[f64]) {
    let r = ranks.total_rank();
    h_mixed.par_chunks_mut(r.max(1)).for_each(|row| {
        for (e, &s) in scales.iter().enumerate() {
            row[ranks.cols(e)].iter_mut().for_each(|v| *v *= s);
        }
    });
}
