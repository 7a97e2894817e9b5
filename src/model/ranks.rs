//! The LoRA bank's rank layout: which rank columns of `A [d_in, R]` and rows of `B [R, d_out]`
//! each expert owns.

use crate::{limits, MoleError, Result};
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// `rank_offsets [E+1]`: expert `e` owns rank columns `offsets[e]..offsets[e+1]`.
///
/// Always valid once constructed: `E >= 1`, `offsets[0] == 0`, non-decreasing, `R >= 1`.
/// Experts of rank 0 are allowed (an adapter slot with no weights contributes nothing); rank-wise
/// experts (SMoRA, FlyLoRA) are experts of rank 1.
///
/// In JSON it is either the offsets themselves, `[0, 16, 32]`, or `{"experts": 8, "rank": 16}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RankLayoutRepr", into = "RankLayoutRepr")]
pub struct RankLayout {
    offsets: Vec<usize>,
}

#[derive(Serialize, Deserialize)]
#[serde(
    untagged,
    deny_unknown_fields,
    expecting = "rank offsets [0, r0, r0 + r1, ...] or {\"experts\": E, \"rank\": r}"
)]
enum RankLayoutRepr {
    Offsets(Vec<usize>),
    Uniform { experts: usize, rank: usize },
}

impl TryFrom<RankLayoutRepr> for RankLayout {
    type Error = MoleError;
    fn try_from(r: RankLayoutRepr) -> Result<Self> {
        match r {
            RankLayoutRepr::Offsets(o) => RankLayout::from_offsets(o),
            RankLayoutRepr::Uniform { experts, rank } => RankLayout::uniform(experts, rank),
        }
    }
}

impl From<RankLayout> for RankLayoutRepr {
    fn from(l: RankLayout) -> Self {
        match l.uniform_rank() {
            Some(rank) => RankLayoutRepr::Uniform { experts: l.num_experts(), rank },
            None => RankLayoutRepr::Offsets(l.offsets),
        }
    }
}

impl RankLayout {
    /// `experts` experts of `rank` columns each (at most `limits::MAX_EXPERTS` experts and
    /// `limits::MAX_TOTAL_RANK` columns, checked before anything is allocated).
    pub fn uniform(experts: usize, rank: usize) -> Result<Self> {
        if experts == 0 {
            return Err(MoleError::ZeroDimension { name: "experts" });
        }
        if rank == 0 {
            return Err(MoleError::ZeroDimension { name: "rank" });
        }
        limits::check_max("experts", experts, limits::MAX_EXPERTS)?;
        let total = experts.saturating_mul(rank);
        if total > limits::MAX_TOTAL_RANK {
            return Err(MoleError::TooLarge {
                what: "total rank (experts x rank)".into(),
                value: format!("{experts} x {rank}"),
                limit: format!("at most {}", limits::MAX_TOTAL_RANK),
            });
        }
        Ok(Self { offsets: (0..=experts).map(|e| e * rank).collect() })
    }

    /// From explicit offsets; validates `0 = o[0] <= ... <= o[E] = R`, `E >= 1`, `R >= 1`.
    pub fn from_offsets(offsets: Vec<usize>) -> Result<Self> {
        let bad = |reason: String| Err(MoleError::InvalidRankOffsets { reason });
        if offsets.len() < 2 {
            return bad(format!("need at least 2 entries (E + 1 with E >= 1), got {}", offsets.len()));
        }
        if offsets[0] != 0 {
            return bad(format!("offsets[0] must be 0, got {}", offsets[0]));
        }
        if let Some(i) = (1..offsets.len()).find(|&i| offsets[i] < offsets[i - 1]) {
            return bad(format!(
                "not monotone: offsets[{i}] = {} < offsets[{}] = {}",
                offsets[i],
                i - 1,
                offsets[i - 1]
            ));
        }
        if *offsets.last().unwrap_or(&0) == 0 {
            return bad("total rank R = offsets[E] must be positive".into());
        }
        limits::check_max("experts (entries of rank offsets - 1)", offsets.len() - 1, limits::MAX_EXPERTS)?;
        limits::check_max("total rank (the last rank offset)", *offsets.last().unwrap_or(&0), limits::MAX_TOTAL_RANK)?;
        Ok(Self { offsets })
    }

    /// Checks that the layout ends at the total rank `r` of the supplied `A`/`B`.
    pub fn check_total_rank(&self, r: usize) -> Result<()> {
        if self.total_rank() != r {
            return Err(MoleError::InvalidRankOffsets {
                reason: format!("offsets end at {} but A/B have R = {r}", self.total_rank()),
            });
        }
        Ok(())
    }

    /// Number of experts `E`.
    pub fn num_experts(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Total rank `R = offsets[E]`.
    pub fn total_rank(&self) -> usize {
        self.offsets[self.offsets.len() - 1]
    }

    /// The offsets themselves, `[E + 1]`.
    pub fn offsets(&self) -> &[usize] {
        &self.offsets
    }

    /// Rank columns of expert `e` (panics if `e >= E`; callers index with validated ids).
    pub fn cols(&self, e: usize) -> Range<usize> {
        self.offsets[e]..self.offsets[e + 1]
    }

    /// Rank of expert `e`.
    pub fn rank(&self, e: usize) -> usize {
        self.offsets[e + 1] - self.offsets[e]
    }

    /// Largest rank of any expert.
    pub fn max_rank(&self) -> usize {
        (0..self.num_experts()).map(|e| self.rank(e)).max().unwrap_or(0)
    }

    /// `Some(r)` when every expert has rank `r`.
    pub fn uniform_rank(&self) -> Option<usize> {
        let r = self.rank(0);
        (0..self.num_experts()).all(|e| self.rank(e) == r).then_some(r)
    }

    /// The expert owning rank column `c` (the last one, if experts of rank 0 share the offset).
    pub fn expert_of_col(&self, c: usize) -> usize {
        self.offsets.partition_point(|&o| o <= c) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_offsets_with_the_reason() {
        let msg = |o: Vec<usize>| RankLayout::from_offsets(o).unwrap_err().to_string();
        assert!(msg(vec![0]).contains("at least 2"));
        assert!(msg(vec![1, 4]).contains("offsets[0] must be 0"));
        assert!(msg(vec![0, 8, 4]).contains("offsets[2] = 4 < offsets[1] = 8"));
        assert!(msg(vec![0, 0]).contains("must be positive"));
        assert!(RankLayout::uniform(0, 4).is_err());
        assert!(RankLayout::uniform(4, 0).is_err());
    }

    #[test]
    fn ragged_layout_columns() {
        let l = RankLayout::from_offsets(vec![0, 4, 4, 12]).unwrap();
        assert_eq!(l.num_experts(), 3);
        assert_eq!(l.total_rank(), 12);
        assert_eq!(l.cols(2), 4..12);
        assert_eq!(l.rank(1), 0);
        assert_eq!(l.max_rank(), 8);
        assert_eq!(l.uniform_rank(), None);
        assert_eq!(l.expert_of_col(3), 0);
        assert_eq!(l.expert_of_col(4), 2);
        assert!(l.check_total_rank(12).is_ok());
        assert!(l.check_total_rank(16).is_err());
    }

    #[test]
    fn json_forms() {
        let u: RankLayout = serde_json::from_str(r#"{"experts": 4, "rank": 8}"#).unwrap();
        assert_eq!(u.offsets(), &[0, 8, 16, 24, 32]);
        let o: RankLayout = serde_json::from_str("[0, 2, 7]").unwrap();
        assert_eq!(o.total_rank(), 7);
        assert!(serde_json::from_str::<RankLayout>("[0, 5, 3]").is_err());
        assert_eq!(serde_json::to_string(&u).unwrap(), r#"{"experts":4,"rank":8}"#);
    }
}
