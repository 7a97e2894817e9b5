//! Expert parallelism: a layer instance that owns a contiguous range of the bank's experts.

use super::{LayerSpec, Mix, RankLayout, Router};
use crate::{MoleError, Result};
use std::ops::Range;

/// The bank experts `first..first + count` of a layer, owned by one layer instance (one GPU)
/// under expert parallelism.
///
/// The [`LayerSpec`] stays the whole layer (its router scores all `E` experts); the shard's
/// tensors `A [d_in, R_shard]` and `B [R_shard, d_out]` hold only the rank columns of its experts,
/// in order ([`ExpertShard::rank_cols`]), and its delta is the part of the layer's delta that its
/// experts make: `y += scale · Σ_{slots s with first <= id_s < first + count} w_s · h_{id_s} · B_{id_s}`.
/// Tokens routed to other experts contribute nothing, so the deltas of a partition of the experts
/// into shards ([`ExpertShard::partition`]) sum to the layer's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExpertShard {
    /// First bank expert of the shard.
    pub first: usize,
    /// Experts in the shard.
    pub count: usize,
}

impl ExpertShard {
    /// The shard's experts, as global bank expert ids.
    pub fn experts(&self) -> Range<usize> {
        self.first..self.first.saturating_add(self.count)
    }

    /// Checks the shard against `spec`: at least one expert, all within the bank, and a layer
    /// whose routing does not need the other experts' columns (the expert-scale mix, a router
    /// not on `h`: what the grouped path runs).
    ///
    /// Errors: [`MoleError::ZeroDimension`] for an empty shard, [`MoleError::InvalidParameter`]
    /// for one past the bank, [`MoleError::Unsupported`] for a layer a shard cannot run.
    pub fn validate(&self, spec: &LayerSpec) -> Result<()> {
        if self.count == 0 {
            return Err(MoleError::ZeroDimension { name: "shard experts" });
        }
        let experts = spec.ranks.num_experts();
        if self.first.checked_add(self.count).is_none_or(|end| end > experts) {
            return Err(MoleError::param(
                "shard",
                format!("experts {}..{} of {experts}", self.first, self.first.saturating_add(self.count)),
                "a shard must lie within the bank's experts",
            ));
        }
        if spec.mix != Mix::ExpertScale {
            return Err(MoleError::Unsupported(
                "an expert shard needs the expert-scale mix: CoMoL's core merge mixes every expert's rank columns"
                    .into(),
            ));
        }
        if matches!(spec.router(), Some(Router::H { .. } | Router::LowRank)) {
            return Err(MoleError::Unsupported(
                "an expert shard cannot score on h: the router needs every expert's rank columns".into(),
            ));
        }
        Ok(())
    }

    /// The shard's rank columns in the whole bank's `A [d_in, R]` (rows of `B [R, d_out]`); the
    /// shard's own tensors hold these columns (rows), in order. The shard must lie within
    /// `ranks` ([`ExpertShard::validate`]).
    pub fn rank_cols(&self, ranks: &RankLayout) -> Range<usize> {
        let o = ranks.offsets();
        o[self.first]..o[self.first + self.count]
    }

    /// The shard's own rank layout: its experts' offsets rebased to 0 (`R_shard` columns).
    /// Errors: as [`ExpertShard::validate`] for a shard past the bank, and
    /// [`MoleError::InvalidRankOffsets`] when the shard's experts have no rank column at all.
    pub fn ranks(&self, ranks: &RankLayout) -> Result<RankLayout> {
        if self.count == 0 {
            return Err(MoleError::ZeroDimension { name: "shard experts" });
        }
        let o = ranks.offsets();
        let Some(window) = o.get(self.first..=self.first.saturating_add(self.count)) else {
            return Err(MoleError::param("shard", format!("{self:?}"), "a shard must lie within the bank's experts"));
        };
        RankLayout::from_offsets(window.iter().map(|&c| c - window[0]).collect())
    }

    /// The shard's tensors out of the whole bank's: its columns of `A [d_in, R]` as
    /// `[d_in, R_shard]` and its rows of `B [R, d_out]` as `[R_shard, d_out]`, with
    /// `R = ranks.total_rank()` and `d_out = b.len() / R`. Errors: a shard past `ranks`, `A` not
    /// of `d_in · R` elements or `B` not a whole number of rows.
    pub fn take_bank<T: Copy>(&self, ranks: &RankLayout, d_in: usize, a: &[T], b: &[T]) -> Result<(Vec<T>, Vec<T>)> {
        self.ranks(ranks)?;
        let (r, cols) = (ranks.total_rank(), self.rank_cols(ranks));
        if a.len() != d_in * r {
            return Err(MoleError::ShapeMismatch {
                what: "A (the whole bank's)",
                expected: vec![d_in, r],
                got: a.len(),
            });
        }
        if !b.len().is_multiple_of(r) {
            return Err(MoleError::ShapeMismatch {
                what: "B (the whole bank's)",
                expected: vec![r, b.len() / r],
                got: b.len(),
            });
        }
        let d_out = b.len() / r;
        let a_shard = a.chunks(r).flat_map(|row| row[cols.clone()].iter().copied()).collect();
        Ok((a_shard, b[cols.start * d_out..cols.end * d_out].to_vec()))
    }

    /// `experts` experts split into `shards` contiguous shards, in order, of sizes differing by
    /// at most one. Errors: zero shards, or more shards than experts.
    pub fn partition(experts: usize, shards: usize) -> Result<Vec<ExpertShard>> {
        if shards == 0 {
            return Err(MoleError::ZeroDimension { name: "shards" });
        }
        if shards > experts {
            return Err(MoleError::param("shards", shards, "at most one shard per expert"));
        }
        let bound = |i: usize| i * (experts / shards) + i.min(experts % shards);
        Ok((0..shards).map(|i| ExpertShard { first: bound(i), count: bound(i + 1) - bound(i) }).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Gating, RoutingRule, TopKWeights};

    fn spec(ranks: RankLayout, router: Router, mix: Mix) -> LayerSpec {
        let rule = RoutingRule::SoftmaxTopK { k: 2, temperature: 1.0, weights: TopKWeights::Renormalized };
        LayerSpec {
            d_in: 8,
            d_out: 8,
            ranks,
            scale: 1.0,
            gating: Gating::Routed { router, rule },
            mix,
            expert_scales: None,
            training: Default::default(),
        }
    }

    #[test]
    fn shards_map_onto_the_bank() {
        let ranks = RankLayout::from_offsets(vec![0, 2, 2, 7, 8, 12]).unwrap();
        let s = ExpertShard { first: 1, count: 3 };
        assert_eq!(s.experts(), 1..4);
        assert_eq!(s.rank_cols(&ranks), 2..8);
        assert_eq!(s.ranks(&ranks).unwrap().offsets(), [0, 0, 5, 6]);
        // Only rank-0 experts: no columns, refused as a layout.
        assert!(matches!(ExpertShard { first: 1, count: 1 }.ranks(&ranks), Err(MoleError::InvalidRankOffsets { .. })));
        assert!(ExpertShard { first: 4, count: 2 }.ranks(&ranks).is_err());
        // A [2, 12], B [12, 3]: the shard takes columns (rows) 2..8.
        let a: Vec<usize> = (0..24).collect();
        let b: Vec<usize> = (0..36).collect();
        let (sa, sb) = s.take_bank(&ranks, 2, &a, &b).unwrap();
        assert_eq!(sa, [2, 3, 4, 5, 6, 7, 14, 15, 16, 17, 18, 19]);
        assert_eq!(sb, (6..24).collect::<Vec<_>>());
        assert!(matches!(s.take_bank(&ranks, 2, &a[1..], &b), Err(MoleError::ShapeMismatch { .. })));
        assert!(matches!(s.take_bank(&ranks, 2, &a, &b[1..]), Err(MoleError::ShapeMismatch { .. })));
        assert!(ExpertShard { first: 0, count: 0 }.ranks(&ranks).is_err());
    }

    #[test]
    fn shards_are_validated_against_the_spec() {
        let ranks = RankLayout::uniform(6, 4).unwrap();
        let x = spec(ranks.clone(), Router::X { bias: false }, Mix::ExpertScale);
        assert!(ExpertShard { first: 0, count: 6 }.validate(&x).is_ok());
        assert!(ExpertShard { first: 5, count: 1 }.validate(&x).is_ok());
        assert!(matches!(ExpertShard { first: 2, count: 0 }.validate(&x), Err(MoleError::ZeroDimension { .. })));
        for bad in [ExpertShard { first: 5, count: 2 }, ExpertShard { first: usize::MAX, count: 2 }] {
            assert!(matches!(bad.validate(&x), Err(MoleError::InvalidParameter { name: "shard", .. })), "{bad:?}");
        }
        let on_h = spec(ranks.clone(), Router::H { bias: false }, Mix::ExpertScale);
        assert!(matches!(ExpertShard { first: 0, count: 3 }.validate(&on_h), Err(MoleError::Unsupported(_))));
        let comol = spec(ranks, Router::X { bias: false }, Mix::CoreMerge { cores: 6 });
        assert!(matches!(ExpertShard { first: 0, count: 3 }.validate(&comol), Err(MoleError::Unsupported(_))));
    }

    #[test]
    fn partitions_cover_the_experts_in_order() {
        for (experts, shards) in [(8, 3), (5, 5), (7, 1), (64, 6)] {
            let p = ExpertShard::partition(experts, shards).unwrap();
            assert_eq!(p.len(), shards);
            assert_eq!(p[0].first, 0);
            assert_eq!(p.last().unwrap().experts().end, experts);
            assert!(p.windows(2).all(|w| w[0].experts().end == w[1].first));
            let (lo, hi) = (p.iter().map(|s| s.count).min().unwrap(), p.iter().map(|s| s.count).max().unwrap());
            assert!(lo >= 1 && hi - lo <= 1, "{experts}/{shards}: {p:?}");
        }
        assert!(ExpertShard::partition(4, 0).is_err());
        assert!(ExpertShard::partition(4, 5).is_err());
    }
}
