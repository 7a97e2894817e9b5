//! The routing plan: per-token expert ids turned into grouped work, one segment per expert.
//!
//! Pure host code, shared by the CPU reference, the GPU launch planning and the tests.

use crate::{MoleError, Result};
use serde::{Deserialize, Serialize};

/// Expert id of an empty slot (dynamic-k rules, tokens without an adapter).
pub const EMPTY_SLOT: i32 = -1;

/// One unit of grouped work: token `token`'s slot `slot`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct TokenSlot {
    /// Token index.
    pub token: u32,
    /// Slot index within the token (`0..slots`).
    pub slot: u32,
}

impl TokenSlot {
    /// The entry that fills padding at a segment's end.
    pub const PADDING: TokenSlot = TokenSlot { token: u32::MAX, slot: u32::MAX };

    /// Whether this entry is padding.
    pub fn is_padding(self) -> bool {
        self == Self::PADDING
    }
}

/// Per-expert segments of `(token, slot)` entries.
///
/// Expert `e`'s entries are `entries[offsets[e] .. offsets[e] + counts[e]]`, tokens ascending;
/// `entries[offsets[e] + counts[e] .. offsets[e + 1]]` is padding up to a multiple of `block`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutingPlan {
    /// Number of tokens.
    pub tokens: usize,
    /// Slots per token.
    pub slots: usize,
    /// Tokens routed to each expert, `[E]`.
    pub counts: Vec<u32>,
    /// Segment starts, `[E + 1]`; the last entry is `entries.len()`.
    pub offsets: Vec<u32>,
    /// The sorted entries, padding included.
    pub entries: Vec<TokenSlot>,
    /// Segment length granularity (1 = no padding).
    pub block: usize,
}

impl RoutingPlan {
    /// Builds the plan from `ids [tokens, slots]` (`-1` = empty slot) for `experts` experts.
    ///
    /// Errors on a wrong length, an id outside `-1..experts`, an expert repeated within a
    /// token, `block == 0`, or more entries than 32-bit offsets can address.
    pub fn build(ids: &[i32], tokens: usize, slots: usize, experts: usize, block: usize) -> Result<Self> {
        crate::limits::check_len("ids", ids, &[tokens, slots])?;
        if experts == 0 {
            return Err(MoleError::ZeroDimension { name: "experts" });
        }
        if block == 0 {
            return Err(MoleError::ZeroDimension { name: "block" });
        }
        if tokens > u32::MAX as usize || slots > u32::MAX as usize {
            return Err(MoleError::param("tokens", tokens, "must fit in 32 bits"));
        }
        let mut counts = vec![0u32; experts];
        for (t, row) in ids.chunks(slots.max(1)).enumerate().take(tokens) {
            for (s, &id) in row.iter().enumerate() {
                if id == EMPTY_SLOT {
                    continue;
                }
                if id < 0 || id as usize >= experts {
                    return Err(MoleError::ExpertIdOutOfRange { token: t, slot: s, id: id as i64, experts });
                }
                if row[..s].contains(&id) {
                    return Err(MoleError::DuplicateExpert { token: t, id: id as i64 });
                }
                counts[id as usize] += 1;
            }
        }
        let mut offsets = Vec::with_capacity(experts + 1);
        let mut total: u64 = 0;
        offsets.push(0u32);
        for &c in &counts {
            total += (c as u64).div_ceil(block as u64) * block as u64;
            if total > u32::MAX as u64 {
                return Err(MoleError::param("tokens", tokens, "routing plan exceeds 2^32 entries"));
            }
            offsets.push(total as u32);
        }
        let mut entries = vec![TokenSlot::PADDING; total as usize];
        let mut cursor: Vec<u32> = offsets[..experts].to_vec();
        // Visiting tokens in ascending order keeps each segment sorted by token.
        for (t, row) in ids.chunks(slots.max(1)).enumerate().take(tokens) {
            for (s, &id) in row.iter().enumerate() {
                if id != EMPTY_SLOT {
                    let c = &mut cursor[id as usize];
                    entries[*c as usize] = TokenSlot { token: t as u32, slot: s as u32 };
                    *c += 1;
                }
            }
        }
        Ok(Self { tokens, slots, counts, offsets, entries, block })
    }

    /// Number of experts.
    pub fn experts(&self) -> usize {
        self.counts.len()
    }

    /// The real (unpadded) entries of expert `e`.
    pub fn segment(&self, e: usize) -> &[TokenSlot] {
        let start = self.offsets[e] as usize;
        &self.entries[start..start + self.counts[e] as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_plan() {
        // 3 tokens, 2 slots, 3 experts.
        let ids = [2, 0, 0, -1, 2, 1];
        let p = RoutingPlan::build(&ids, 3, 2, 3, 1).unwrap();
        assert_eq!(p.counts, vec![2, 1, 2]);
        assert_eq!(p.offsets, vec![0, 2, 3, 5]);
        let ts = |token, slot| TokenSlot { token, slot };
        assert_eq!(p.entries, vec![ts(0, 1), ts(1, 0), ts(2, 1), ts(0, 0), ts(2, 0)]);

        let padded = RoutingPlan::build(&ids, 3, 2, 3, 4).unwrap();
        assert_eq!(padded.offsets, vec![0, 4, 8, 12]);
        assert_eq!(padded.segment(2), &[ts(0, 0), ts(2, 0)]);
        assert!(padded.entries[2].is_padding() && padded.entries[3].is_padding());
    }

    #[test]
    fn rejects_bad_ids() {
        assert!(matches!(
            RoutingPlan::build(&[0, 3], 1, 2, 3, 1),
            Err(MoleError::ExpertIdOutOfRange { token: 0, slot: 1, id: 3, experts: 3 })
        ));
        assert!(matches!(RoutingPlan::build(&[-2], 1, 1, 3, 1), Err(MoleError::ExpertIdOutOfRange { .. })));
        assert!(matches!(RoutingPlan::build(&[1, 1], 1, 2, 3, 1), Err(MoleError::DuplicateExpert { .. })));
        assert!(matches!(RoutingPlan::build(&[1], 2, 1, 3, 1), Err(MoleError::ShapeMismatch { .. })));
        assert!(RoutingPlan::build(&[0], 1, 1, 3, 0).is_err());
    }

    #[test]
    fn zero_tokens_is_an_empty_plan() {
        let p = RoutingPlan::build(&[], 0, 2, 4, 8).unwrap();
        assert_eq!(p.offsets, vec![0; 5]);
        assert!(p.entries.is_empty());
    }
}
