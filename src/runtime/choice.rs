//! The strategy of a layer call: the fused kernels ([`crate::kernels::fused`]) or the grouped
//! path (route-only fused launch, device slot plans, SGMV kernels), chosen per GPU and shape.
//!
//! **How the strategy is chosen** ([`choose`]): a fresh entry of the tuning cache for the shape
//! key ([`crate::tune::ShapeKey`]) wins, else one of the same shape tuned for up to 4 times fewer
//! or more tokens ([`TuningCache::nearest`]); without one, the documented heuristic
//! ([`heuristic`]):
//! - **fused** while the layer fits the fused build (`R`, plus `E` for an x router, at most the
//!   build's 256 shrink columns, and its tile within 48 KiB of shared memory): it reads `x` once
//!   and reads and writes `y` once;
//! - of the fused variants, **split** when one block per tile of tokens would leave more than
//!   half the SMs idle (`2 · ceil(T / 16) < SMs`: decode and small batches), the single launch
//!   (on tensor cores where the build and widths allow) otherwise;
//! - **grouped** beyond (many experts or large ranks), which needs the expert-scale mix.
//!
//! Both paths apply per-expert scales ([`LayerSpec::expert_scales`]) in their expands; the
//! strategy does not depend on them.

use crate::kernels::ffn::{self, FfnConfig};
use crate::kernels::fused::{self, FusedConfig, FusedOutputs, FusedVariant};
use crate::kernels::{sgmv, Family, KernelBuild};
use crate::model::{LayerSpec, Mix};
use crate::tune::{ShapeKey, Strategy, TuningCache};
use crate::{DType, MoleError, Result};

/// Where a choice came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChoiceSource {
    /// A fresh tuning-cache entry for the shape and token bucket (or a build forced by the
    /// caller).
    Tuned,
    /// A fresh tuning-cache entry for the shape at a nearby token bucket
    /// ([`TuningCache::nearest`]: up to 4 times fewer or more tokens).
    TunedNearby,
    /// The heuristic (no entry for this GPU and shape).
    Heuristic,
}

impl ChoiceSource {
    /// `tuned`, `tuned nearby` or `heuristic`.
    pub fn name(self) -> &'static str {
        match self {
            ChoiceSource::Tuned => "tuned",
            ChoiceSource::TunedNearby => "tuned nearby",
            ChoiceSource::Heuristic => "heuristic",
        }
    }
}

/// The strategy and build a layer call runs with.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    /// Grouped, fused or fused split.
    pub strategy: Strategy,
    /// The kernel build of the strategy's family (fused or sgmv).
    pub build: KernelBuild,
    /// Tuned or heuristic.
    pub source: ChoiceSource,
}

/// Whether the fused kernels of `build` take `spec` (every check of `fused::plan`).
pub fn fused_fits(build: &KernelBuild, spec: &LayerSpec, tokens: usize) -> bool {
    fused::plan(build, spec, tokens.max(1), FusedVariant::Single, FusedOutputs::default()).is_ok()
}

/// The heuristic strategy for `spec` at `tokens` tokens on a GPU with `sm_count` SMs (see the
/// module documentation).
pub fn heuristic(spec: &LayerSpec, dtype: DType, tokens: usize, sm_count: u32) -> Result<Strategy> {
    spec.validate()?;
    let build = fused::build(dtype, FusedConfig::DEFAULT);
    if fused_fits(&build, spec, tokens) {
        let tiles = tokens.div_ceil(FusedConfig::DEFAULT.bt as usize);
        return Ok(if 2 * tiles < sm_count as usize { Strategy::FusedSplit } else { Strategy::Fused });
    }
    if spec.mix != Mix::ExpertScale {
        return Err(MoleError::Unsupported(
            "this layer does not fit the fused kernels, and the grouped path needs the expert-scale mix".into(),
        ));
    }
    Ok(Strategy::Grouped)
}

/// The default build of `strategy` for `dtype` (for [`Strategy::FfnBlock`], the block's ffn
/// build).
pub fn default_build(strategy: Strategy, dtype: DType) -> KernelBuild {
    match strategy {
        Strategy::Grouped => sgmv::build(dtype, sgmv::SgmvConfig::DEFAULT),
        Strategy::Fused | Strategy::FusedSplit => fused::build(dtype, FusedConfig::DEFAULT),
        Strategy::FfnBlock => ffn::build(dtype, FfnConfig::DEFAULT),
    }
}

/// The strategy and build for `spec`: the cache's fresh entry for the shape at the token bucket
/// of `tokens`, else at the nearest bucket up to two powers of two away
/// ([`TuningCache::nearest`]), else the heuristic with the default build.
pub fn choose(
    spec: &LayerSpec,
    dtype: DType,
    tokens: usize,
    sm_count: u32,
    cache: Option<&TuningCache>,
) -> Result<Choice> {
    let key = ShapeKey::new(spec, dtype, tokens);
    // An entry that cannot be a layer's choice of this dtype (a block strategy, a build of
    // another family or dtype: a hand-edited file) is passed over for the heuristic.
    let usable = |e: &&crate::tune::TunedEntry| {
        let family = match e.strategy {
            Strategy::Grouped => Family::Sgmv,
            Strategy::Fused | Strategy::FusedSplit => Family::Fused,
            Strategy::FfnBlock => return false,
        };
        e.build.dtype == dtype && e.build.family() == family
    };
    if let Some(entry) = cache.and_then(|c| c.nearest(&key, |e| usable(&e))) {
        let source = match entry.key.token_bucket == key.token_bucket {
            true => ChoiceSource::Tuned,
            false => ChoiceSource::TunedNearby,
        };
        return Ok(Choice { strategy: entry.strategy, build: entry.build.clone(), source });
    }
    let strategy = heuristic(spec, dtype, tokens, sm_count)?;
    Ok(Choice { strategy, build: default_build(strategy, dtype), source: ChoiceSource::Heuristic })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Method, MethodShape, STANDARD_METHODS};

    #[test]
    fn every_standard_method_has_a_path_at_d_4096() {
        for (method, experts, rank, k) in STANDARD_METHODS {
            let spec = method.spec(MethodShape { d_in: 4096, d_out: 4096, experts, rank, k, alpha: 2.0 }).unwrap();
            for t in [1, 16, 256, 4096, 16384] {
                let s = heuristic(&spec, DType::BF16, t, 132).unwrap_or_else(|e| panic!("{method} T={t}: {e}"));
                assert_ne!(s, Strategy::Grouped, "{method} T={t}: every standard method fits the fused build");
            }
        }
    }

    fn shape(experts: usize, rank: usize) -> MethodShape {
        MethodShape { d_in: 4096, d_out: 4096, experts, rank, k: 2, alpha: 2.0 * rank as f64 }
    }

    #[test]
    fn heuristic_prefers_fused_while_it_fits() {
        let mixlora = Method::MixLoraPerLinear.spec(shape(8, 16)).unwrap();
        assert_eq!(heuristic(&mixlora, DType::BF16, 4096, 132).unwrap(), Strategy::Fused);
        assert_eq!(heuristic(&mixlora, DType::BF16, 16, 132).unwrap(), Strategy::FusedSplit);
        // 64 experts of rank 16: R = 1024 columns, beyond the fused build.
        let wide = Method::MixLoraPerLinear.spec(shape(64, 16)).unwrap();
        assert_eq!(heuristic(&wide, DType::BF16, 4096, 132).unwrap(), Strategy::Grouped);
        // CoMoL with a rank the fused build cannot hold has no path.
        let comol = Method::Comol.spec(shape(4, 512)).unwrap();
        assert!(heuristic(&comol, DType::BF16, 4096, 132).is_err());
        // An invalid spec is its own error, not a quiet fall-through to the grouped path.
        let bad = LayerSpec { d_in: 0, ..Method::MixLoraPerLinear.spec(shape(64, 16)).unwrap() };
        assert_eq!(heuristic(&bad, DType::BF16, 4096, 132), Err(MoleError::ZeroDimension { name: "d_in" }));
    }

    #[test]
    fn per_expert_scales_take_the_same_paths_and_reach_the_expands() {
        use crate::kernels::exec::Buf;
        // Fits the fused build (MixLoRA 8 x 16) and, wide, only the grouped path (64 x 16).
        for (experts, want) in [(8, Strategy::Fused), (64, Strategy::Grouped)] {
            let mut spec = Method::MixLoraPerLinear.spec(shape(experts, 16)).unwrap();
            spec.expert_scales = Some((0..experts).map(|e| e as f64 - 2.5).collect());
            assert_eq!(heuristic(&spec, DType::BF16, 4096, 132).unwrap(), want);
            assert_eq!(choose(&spec, DType::BF16, 4096, 132, None).unwrap().strategy, want);
            let build = fused::build(DType::BF16, FusedConfig::DEFAULT);
            // The grouped path's route-only launch has no expand: it takes no scales.
            let route = fused::plan_route_only(&build, &spec, 64, FusedOutputs::default()).unwrap();
            assert_eq!(route.lens.get(Buf::ExpertScales), 0);
            if want == Strategy::Fused {
                for v in [FusedVariant::Single, FusedVariant::Split { splits: 2, n_per_block: 64 }] {
                    let p = fused::plan(&build, &spec, 64, v, FusedOutputs::default()).unwrap();
                    assert_eq!(p.lens.get(Buf::ExpertScales), experts, "{v:?}");
                }
            }
        }
        // CoMoL: its one bank expert's scale.
        let mut comol = Method::Comol.spec(shape(4, 16)).unwrap();
        comol.expert_scales = Some(vec![-2.0]);
        assert_eq!(heuristic(&comol, DType::F16, 4096, 132).unwrap(), Strategy::Fused);
        let build = fused::build(DType::F16, FusedConfig::DEFAULT);
        let p = fused::plan(&build, &comol, 64, FusedVariant::Single, FusedOutputs::default()).unwrap();
        assert_eq!(p.lens.get(Buf::ExpertScales), 1);
        comol.expert_scales = None;
        let p = fused::plan(&build, &comol, 64, FusedVariant::Single, FusedOutputs::default()).unwrap();
        assert_eq!(p.lens.get(Buf::ExpertScales), 0);
    }

    #[test]
    fn a_layer_takes_only_a_layer_entry_of_its_dtype() {
        use crate::tune::cache::Provenance;
        use crate::tune::{Candidate, GpuId, TunedEntry};
        let spec = Method::MixLoraPerLinear.spec(shape(8, 16)).unwrap();
        let gpu = GpuId { name: "test".into(), compute_capability: (9, 0), sm_count: 132 };
        let with = |strategy, build| {
            let key = ShapeKey::new(&spec, DType::BF16, 4096);
            let e = TunedEntry::new(key, Candidate { strategy, build }, 1.0, None, 1.0, &Provenance::current());
            choose(&spec, DType::BF16, 4096, 132, Some(&TuningCache::from_entries(gpu.clone(), vec![e]))).unwrap()
        };
        let grouped = sgmv::build(DType::BF16, sgmv::SgmvConfig::DEFAULT);
        assert_eq!((with(Strategy::Grouped, grouped.clone()).source), ChoiceSource::Tuned);
        let ffn_default = ffn::build(DType::BF16, FfnConfig::DEFAULT);
        for (strategy, build) in [
            (Strategy::FfnBlock, ffn_default.clone()),
            (Strategy::Fused, ffn_default),
            (Strategy::Fused, grouped),
            (Strategy::Grouped, sgmv::build(DType::F16, sgmv::SgmvConfig::DEFAULT)),
        ] {
            let c = with(strategy, build.clone());
            assert_eq!((c.strategy, c.source), (Strategy::Fused, ChoiceSource::Heuristic), "{strategy} {build}");
        }
    }

    #[test]
    fn choose_falls_back_to_the_heuristic_with_the_default_build() {
        let spec = Method::DynMole.spec(shape(6, 24)).unwrap();
        let c = choose(&spec, DType::F16, 4096, 132, None).unwrap();
        assert_eq!((c.strategy, c.source), (Strategy::Fused, ChoiceSource::Heuristic));
        assert_eq!(c.build, fused::build(DType::F16, FusedConfig::DEFAULT));
    }

    /// An entry tuned at 4096 tokens serves 1024 to 16384 (two powers of two either way) as
    /// "tuned nearby", its own bucket as "tuned", and nothing farther: T = 512 and 32768 go to
    /// the heuristic. An unusable entry at the exact bucket does not hide a usable nearby one.
    #[test]
    fn a_nearby_token_bucket_serves_within_two_powers_of_two() {
        use crate::tune::cache::Provenance;
        use crate::tune::{Candidate, GpuId, TunedEntry};
        let spec = Method::MixLoraPerLinear.spec(shape(8, 16)).unwrap();
        let gpu = GpuId { name: "test".into(), compute_capability: (9, 0), sm_count: 132 };
        let grouped = sgmv::build(DType::BF16, sgmv::SgmvConfig::DEFAULT);
        let entry = |tokens, strategy, build| {
            let key = ShapeKey::new(&spec, DType::BF16, tokens);
            TunedEntry::new(key, Candidate { strategy, build }, 1.0, None, 1.0, &Provenance::current())
        };
        let cache = TuningCache::from_entries(gpu.clone(), vec![entry(4096, Strategy::Grouped, grouped.clone())]);
        for (tokens, want) in [
            (4096, (Strategy::Grouped, ChoiceSource::Tuned)),
            (3000, (Strategy::Grouped, ChoiceSource::Tuned)),
            (1024, (Strategy::Grouped, ChoiceSource::TunedNearby)),
            (1025, (Strategy::Grouped, ChoiceSource::TunedNearby)),
            (16384, (Strategy::Grouped, ChoiceSource::TunedNearby)),
            (512, (Strategy::FusedSplit, ChoiceSource::Heuristic)),
            (16385, (Strategy::Fused, ChoiceSource::Heuristic)),
        ] {
            let c = choose(&spec, DType::BF16, tokens, 132, Some(&cache)).unwrap();
            assert_eq!((c.strategy, c.source), want, "T={tokens}");
        }
        // An f16 build at 4096 (unusable for bf16) and a usable one at 2048: T = 4096 takes 2048's.
        let f16 = sgmv::build(DType::F16, sgmv::SgmvConfig::DEFAULT);
        let cache = TuningCache::from_entries(
            gpu,
            vec![entry(4096, Strategy::Grouped, f16), entry(2048, Strategy::Grouped, grouped.clone())],
        );
        let c = choose(&spec, DType::BF16, 4096, 132, Some(&cache)).unwrap();
        assert_eq!((c.strategy, c.build, c.source), (Strategy::Grouped, grouped, ChoiceSource::TunedNearby));
    }
}
