//! The grouped (segmented) formulation of the expert-scale layer: tokens sorted by expert with the
//! routing plan, one small GEMM per expert segment, then a per-token sum over slots in slot order.
//! It computes what the dense masked formulation computes, in the order the SGMV kernels do.

use super::routing::Routing;
use crate::model::RankLayout;
use crate::plan::RoutingPlan;
use rayon::prelude::*;

/// The LoRA bank of a layer, in f64: `A [d_in, R]`, `B [R, d_out]`, its layout, scale and
/// optional per-expert scales.
#[derive(Clone, Copy, Debug)]
pub struct Bank<'a> {
    /// `A [d_in, R]`.
    pub a: &'a [f64],
    /// `B [R, d_out]`.
    pub b: &'a [f64],
    /// Rank layout.
    pub ranks: &'a RankLayout,
    /// Delta scale.
    pub scale: f64,
    /// Per-expert scales `s_e`, one per expert of `ranks` (as [`crate::model::LayerSpec::expert_scales`];
    /// `None` means 1).
    pub expert_scales: Option<&'a [f64]>,
    /// Input features.
    pub d_in: usize,
    /// Output features.
    pub d_out: usize,
}

/// `y + scale · Σ_slots s_e · w · (x[t] · A[:, cols(e)]) · B[cols(e), :]`, visiting the plan's
/// segments. The plan must have been built from `routing.ids`, and `expert_scales` (where given)
/// must hold one value per expert.
pub fn grouped_forward(x: &[f64], y: &[f64], bank: Bank<'_>, routing: &Routing, plan: &RoutingPlan) -> Vec<f64> {
    let Bank { a, b, ranks, scale, expert_scales, d_in, d_out } = bank;
    let (r_total, slots) = (ranks.total_rank(), routing.slots);
    // One expert segment after another; each entry's contribution lands in its (token, slot) row.
    let work: Vec<(usize, usize)> = (0..plan.experts())
        .flat_map(|e| plan.segment(e).iter().map(move |ts| (e, (ts.token as usize) * slots + ts.slot as usize)))
        .collect();
    let rows: Vec<(usize, Vec<f64>)> = work
        .par_iter()
        .map(|&(e, ts)| {
            let t = ts / slots;
            let xt = &x[t * d_in..(t + 1) * d_in];
            let cols = ranks.cols(e);
            let mut h = vec![0.0; cols.len()];
            for (i, &xi) in xt.iter().enumerate() {
                let a_row = &a[i * r_total + cols.start..i * r_total + cols.end];
                h.iter_mut().zip(a_row).for_each(|(hc, av)| *hc += xi * av);
            }
            let w = routing.weights[ts] * expert_scales.map_or(1.0, |s| s[e]);
            let mut out = vec![0.0; d_out];
            for (hc, c) in h.iter().zip(cols) {
                for (o, bv) in out.iter_mut().zip(&b[c * d_out..(c + 1) * d_out]) {
                    *o += w * hc * bv;
                }
            }
            (ts, out)
        })
        .collect();
    let mut per_slot = vec![None; routing.tokens * slots];
    for (ts, row) in rows {
        per_slot[ts] = Some(row);
    }
    let mut y_out = y.to_vec();
    y_out.par_chunks_mut(d_out).enumerate().for_each(|(t, yt)| {
        let mut acc = vec![0.0; d_out];
        for row in per_slot[t * slots..(t + 1) * slots].iter().flatten() {
            for (a, v) in acc.iter_mut().zip(row) {
                *a += v;
            }
        }
        for (yv, a) in yt.iter_mut().zip(acc) {
            *yv += scale * a;
        }
    });
    y_out
}
