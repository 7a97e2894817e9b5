//! Shape keys: what a tuning result is valid for. Exact dimensions, expert count, slots per
//! token (k), dtype and method; the token count bucketed to a power of two. A layer's key is
//! [`ShapeKey::new`], an FFN-expert block's [`ShapeKey::for_ffn`] (with `f` and the activation);
//! their method tags never coincide, so a layer and a block never share a key.

use crate::model::{FfnSpec, Gating, LayerSpec, Mix, Router, RoutingRule};
use crate::DType;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The largest token bucket (`2^31`): token counts above it share this bucket.
pub const MAX_TOKEN_BUCKET: u32 = 1 << 31;

/// The shape a tuned configuration is valid for.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ShapeKey {
    /// Input features.
    pub d_in: usize,
    /// Output features.
    pub d_out: usize,
    /// Total rank `R` of the bank.
    pub total_rank: usize,
    /// Routed experts (bank experts, or CoMoL cores).
    pub experts: usize,
    /// Slots per token: `k` for top-k rules, `E` for dense and dynamic ones, 1 for adapter ids.
    pub slots: usize,
    /// Storage dtype.
    pub dtype: DType,
    /// Stable tag of the gating and mix, e.g. `routed.x.softmax_topk.expert_scale`
    /// (see `method_tag`); a block's is `ffn.<activation>.<gating>` (see
    /// [`ShapeKey::for_ffn`]).
    pub method: String,
    /// Tokens rounded up to a power of two (see [`token_bucket`]).
    pub token_bucket: u32,
}

impl ShapeKey {
    /// The key of `spec` run in `dtype` over `tokens` tokens.
    pub fn new(spec: &LayerSpec, dtype: DType, tokens: usize) -> ShapeKey {
        ShapeKey {
            d_in: spec.d_in,
            d_out: spec.d_out,
            total_rank: spec.total_rank(),
            experts: spec.routed_experts(),
            slots: spec.slots(),
            dtype,
            method: method_tag(spec),
            token_bucket: token_bucket(tokens),
        }
    }

    /// The key of the FFN-expert block `spec` run in `dtype` over `tokens` tokens: `d_in = d`,
    /// `d_out = f`, `total_rank` the largest of the gate, up and down banks' total ranks (0 when
    /// no projection is adapted; the three share one layout in the presets), the routed experts,
    /// the slots, and the method tag `ffn.<activation>.<gating>` (e.g.
    /// `ffn.silu.routed.x.softmax_topk`, the gating part of `method_tag`). Layer tags start with
    /// the gating, never with `ffn.`, so no layer key equals a block key.
    pub fn for_ffn(spec: &FfnSpec, dtype: DType, tokens: usize) -> ShapeKey {
        let total_rank = spec.projections().iter().filter_map(|(_, l)| *l).map(|l| l.ranks.total_rank()).max();
        ShapeKey {
            d_in: spec.d,
            d_out: spec.f,
            total_rank: total_rank.unwrap_or(0),
            experts: spec.experts,
            slots: spec.slots(),
            dtype,
            method: format!("ffn.{}.{}", spec.activation, gating_tag(spec.gating)),
            token_bucket: token_bucket(tokens),
        }
    }

    /// A total order for listing keys: dimensions, rank, experts, slots, dtype name, method, tokens.
    pub fn sort_key(&self) -> (usize, usize, usize, usize, usize, &'static str, &str, u32) {
        let s = self;
        (s.d_in, s.d_out, s.total_rank, s.experts, s.slots, s.dtype.name(), s.method.as_str(), s.token_bucket)
    }
}

impl fmt::Display for ShapeKey {
    /// `4096x11008 R=128 E=8 k=2 bf16 T<=256 routed.x.softmax_topk.expert_scale`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}x{} R={} E={} k={} {} T<={} {}",
            self.d_in,
            self.d_out,
            self.total_rank,
            self.experts,
            self.slots,
            self.dtype,
            self.token_bucket,
            self.method
        )
    }
}

/// `tokens` rounded up to the next power of two (0 and 1 give 1), capped at
/// `MAX_TOKEN_BUCKET`.
pub fn token_bucket(tokens: usize) -> u32 {
    let t = tokens.clamp(1, MAX_TOKEN_BUCKET as usize);
    t.checked_next_power_of_two().map_or(MAX_TOKEN_BUCKET, |p| p.min(MAX_TOKEN_BUCKET as usize) as u32)
}

fn router_tag(router: Router) -> &'static str {
    match router {
        Router::X { bias: false } => "x",
        Router::X { bias: true } => "x_bias",
        Router::H { bias: false } => "h",
        Router::H { bias: true } => "h_bias",
        Router::LowRank => "low_rank",
        Router::Logits => "logits",
    }
}

fn rule_tag(rule: RoutingRule) -> &'static str {
    match rule {
        RoutingRule::SoftmaxTopK { .. } => "softmax_topk",
        RoutingRule::TopP { .. } => "top_p",
        RoutingRule::DynMole { .. } => "dynmole",
        RoutingRule::DenseSoftmax { .. } => "dense_softmax",
        RoutingRule::SigmoidTopK { .. } => "sigmoid_topk",
        RoutingRule::MagnitudeTopK { .. } => "magnitude_topk",
    }
}

/// The gating part of a method tag: `routed.<router>.<rule>`, `given.<selection>` or
/// `adapter_ids`.
fn gating_tag(gating: Gating) -> String {
    match gating {
        Gating::Routed { router, rule } => format!("routed.{}.{}", router_tag(router), rule_tag(rule)),
        Gating::Given { top_k, softmax_topk } => {
            let sel = if top_k.is_some() { "topk" } else { "dense" };
            format!("given.{sel}{}", if softmax_topk { "_softmax" } else { "" })
        }
        Gating::AdapterIds => "adapter_ids".to_string(),
    }
}

/// The stable method tag of `spec`: `<gating>[.<router>.<rule>].<mix>`, e.g.
/// `routed.x.softmax_topk.expert_scale`, `routed.h.softmax_topk.core_merge`,
/// `given.topk_softmax.expert_scale`, `adapter_ids.expert_scale`. Only what changes the work
/// of a kernel takes part: numeric parameters of the rules (temperature, p, k) do not (`k` is in
/// [`ShapeKey::slots`]).
pub fn method_tag(spec: &LayerSpec) -> String {
    let gating = gating_tag(spec.gating);
    let mix = match spec.mix {
        Mix::ExpertScale => "expert_scale",
        Mix::CoreMerge { .. } => "core_merge",
    };
    format!("{gating}.{mix}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Activation, FfnMethod, Method, MethodShape};

    #[test]
    fn tokens_bucket_to_the_next_power_of_two() {
        let cases = [(0, 1), (1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (4095, 4096), (4096, 4096), (4097, 8192)];
        for (t, b) in cases {
            assert_eq!(token_bucket(t), b, "{t}");
        }
        assert_eq!(token_bucket(usize::MAX), MAX_TOKEN_BUCKET);
        assert_eq!(token_bucket((1 << 31) + 1), MAX_TOKEN_BUCKET);
    }

    fn shape(experts: usize, rank: usize, k: usize) -> MethodShape {
        MethodShape { d_in: 64, d_out: 48, experts, rank, k, alpha: 16.0 }
    }

    #[test]
    fn keys_of_the_presets() {
        let spec = Method::MixLoraPerLinear.spec(shape(8, 16, 2)).unwrap();
        let key = ShapeKey::new(&spec, DType::BF16, 3);
        assert_eq!(
            key,
            ShapeKey {
                d_in: 64,
                d_out: 48,
                total_rank: 128,
                experts: 8,
                slots: 2,
                dtype: DType::BF16,
                method: "routed.x.softmax_topk.expert_scale".into(),
                token_bucket: 4,
            }
        );
        // Same bucket, same key; the next bucket differs.
        assert_eq!(ShapeKey::new(&spec, DType::BF16, 4), key);
        assert_ne!(ShapeKey::new(&spec, DType::BF16, 5), key);
        assert_ne!(ShapeKey::new(&spec, DType::F16, 4), key);
        // k is part of the key through the slots.
        assert_ne!(ShapeKey::new(&Method::MixLoraPerLinear.spec(shape(8, 16, 1)).unwrap(), DType::BF16, 4), key);

        let dyn_mole = ShapeKey::new(&Method::DynMole.spec(shape(6, 24, 2)).unwrap(), DType::BF16, 16);
        assert_eq!((dyn_mole.slots, dyn_mole.method.as_str()), (6, "routed.x.dynmole.expert_scale"));
        let smora = ShapeKey::new(&Method::Smora.spec(shape(64, 1, 16)).unwrap(), DType::BF16, 16);
        assert_eq!(
            (smora.slots, smora.total_rank, smora.method.as_str()),
            (16, 64, "routed.x.sigmoid_topk.expert_scale")
        );
        let comol = ShapeKey::new(&Method::Comol.spec(shape(8, 16, 2)).unwrap(), DType::BF16, 16);
        assert_eq!((comol.experts, comol.total_rank, comol.slots), (8, 16, 2));
        assert_eq!(comol.method, "routed.h.softmax_topk.core_merge");
        let serving = ShapeKey::new(&Method::AdapterServing.spec(shape(8, 16, 1)).unwrap(), DType::F16, 1);
        assert_eq!((serving.slots, serving.method.as_str()), (1, "adapter_ids.expert_scale"));
        let xlora = ShapeKey::new(&Method::XLora.spec(shape(8, 16, 2)).unwrap(), DType::F16, 1);
        assert_eq!(xlora.method, "given.topk.expert_scale");
    }

    #[test]
    fn every_preset_has_a_distinct_stable_tag_per_gating() {
        let mut tags = std::collections::BTreeSet::new();
        for m in Method::ALL {
            let rank = if m.single_rank_experts() { 1 } else { 8 };
            let spec = m.spec(shape(8, rank, 2)).unwrap();
            let tag = method_tag(&spec);
            assert!(tag.chars().all(|c| c.is_ascii_lowercase() || c == '_' || c == '.'), "{tag}");
            tags.insert(tag);
        }
        // Methods that differ only in numeric parameters share a tag; the rest are distinct.
        assert!(tags.len() >= 9, "{tags:?}");
    }

    fn block(method: FfnMethod, f: usize, activation: Activation) -> FfnSpec {
        let s = crate::model::FfnShape { d: 64, f, experts: 8, rank: 16, k: 2, alpha: 32.0, activation };
        method.spec(s).unwrap()
    }

    #[test]
    fn block_keys_hold_f_and_the_activation() {
        let spec = block(FfnMethod::MixLora, 176, Activation::Silu);
        let key = ShapeKey::for_ffn(&spec, DType::BF16, 100);
        assert_eq!(
            key,
            ShapeKey {
                d_in: 64,
                d_out: 176,
                total_rank: 128,
                experts: 8,
                slots: 2,
                dtype: DType::BF16,
                method: "ffn.silu.routed.x.softmax_topk".into(),
                token_bucket: 128,
            }
        );
        assert_eq!(key.to_string(), "64x176 R=128 E=8 k=2 bf16 T<=128 ffn.silu.routed.x.softmax_topk");
        // f and the activation each change the key; so do the rule, the dtype and the bucket.
        assert_ne!(ShapeKey::for_ffn(&block(FfnMethod::MixLora, 192, Activation::Silu), DType::BF16, 100), key);
        let gelu = ShapeKey::for_ffn(&block(FfnMethod::MixLora, 176, Activation::Gelu), DType::BF16, 100);
        assert_eq!(gelu.method, "ffn.gelu.routed.x.softmax_topk");
        assert_ne!(gelu, key);
        let dynamic = ShapeKey::for_ffn(&block(FfnMethod::MixLoraDynamic, 176, Activation::Silu), DType::BF16, 100);
        assert_eq!((dynamic.method.as_str(), dynamic.slots), ("ffn.silu.routed.x.top_p", 8));
        assert_ne!(ShapeKey::for_ffn(&spec, DType::F16, 100), key);
        assert_eq!(ShapeKey::for_ffn(&spec, DType::BF16, 128), key);
        assert_ne!(ShapeKey::for_ffn(&spec, DType::BF16, 129), key);
        // The largest bank's total rank.
        let mut uneven = spec.clone();
        uneven.down = Some(crate::model::ProjectionLora {
            ranks: crate::model::RankLayout::uniform(8, 24).unwrap(),
            scale: 1.0,
        });
        uneven.gate = None;
        assert_eq!(ShapeKey::for_ffn(&uneven, DType::BF16, 100).total_rank, 192);
    }

    #[test]
    fn a_layer_key_never_equals_a_block_key() {
        // MixLoRA per linear on the block's up projection: the same d_in, d_out, R, E, k, dtype
        // and tokens as the block; only the method tag tells them apart.
        let block_spec = block(FfnMethod::MixLora, 176, Activation::Silu);
        let layer =
            Method::MixLoraPerLinear.spec(MethodShape { d_in: 64, d_out: 176, experts: 8, rank: 16, k: 2, alpha: 32.0 });
        let (l, b) = (ShapeKey::new(&layer.unwrap(), DType::BF16, 100), ShapeKey::for_ffn(&block_spec, DType::BF16, 100));
        assert_eq!((l.d_in, l.d_out, l.total_rank, l.experts, l.slots), (b.d_in, b.d_out, b.total_rank, b.experts, b.slots));
        assert_ne!(l, b);
        // No layer preset's tag is a block tag.
        for m in Method::ALL {
            let rank = if m.single_rank_experts() { 1 } else { 8 };
            assert!(!method_tag(&m.spec(shape(8, rank, 2)).unwrap()).starts_with("ffn."), "{m}");
        }
    }

    #[test]
    fn key_serde_round_trip() {
        let spec = Method::Comol.spec(shape(8, 16, 2)).unwrap();
        let key = ShapeKey::new(&spec, DType::BF16, 4097);
        let json = serde_json::to_string(&key).unwrap();
        assert!(json.contains("\"dtype\":\"bf16\"") && json.contains("\"token_bucket\":8192"), "{json}");
        assert_eq!(serde_json::from_str::<ShapeKey>(&json).unwrap(), key);
        assert_eq!(key.to_string(), "64x48 R=16 E=8 k=2 bf16 T<=8192 routed.h.softmax_topk.core_merge");
    }
}
