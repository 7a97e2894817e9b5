//! Problem descriptors: what a MoLE layer computes, independent of how or where.
//!
//! Every layer is `h = x · A` (shrink), `h' = mix(h)` with weights from [`Gating`] (mix), and
//! `y += scale · h' · B` (expand), over one LoRA bank whose [`RankLayout`] says which rank
//! columns belong to which expert. [`FfnSpec`] describes MixLoRA's FFN-expert block instead,
//! whose experts are whole LoRA-adapted FFNs sharing the frozen base.

mod ffn;
mod gating;
mod inputs;
mod layer;
mod method;
mod ranks;
mod shard;
mod spec_json;
mod training;

pub use ffn::{Activation, FfnMethod, FfnShape, FfnSpec, ProjectionLora};
pub use gating::{Entropy, Gating, RankSelection, Router, RoutingRule, TopKWeights};
pub use inputs::LayerInputs;
pub use layer::{peft_expert_scales, LayerSpec, Mix};
pub use method::{Knob, Method, MethodOptions, MethodShape};
// The benchmarks' and tests' method list: public with `internals`.
#[cfg(feature = "internals")]
pub use method::STANDARD_METHODS;
#[cfg(all(test, not(feature = "internals")))]
pub(crate) use method::STANDARD_METHODS;
pub use ranks::RankLayout;
pub use shard::ExpertShard;
pub use training::{AuxLosses, Balance, LayerParam, Training};
