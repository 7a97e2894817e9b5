//! The search space of a shape and its pruning before any timing.
//!
//! Candidates come from each family's [`Family::candidates`] (block sizes, warps, pipeline
//! stages, split-K are fields of the families' typed configurations), mapped to a [`Strategy`] by
//! [`strategy_of`], filtered by dtype. Candidate 0 is the documented default (the family's
//! default build, [`Family::default_builds`]).
//!
//! Pruning compiles a candidate to a cubin with the ptxas report and rejects it on spills, any
//! [`ArchLimits::check`] violation, or an occupancy below one block per SM ([`prune_reason`], a
//! pure function of the report so that it is tested from real ptxas logs).

use crate::cuda::{compile, Arch, ArchLimits, Compiled, EntryResources, Output};
use crate::kernels::{Family, KernelBuild};
use crate::tune::{Candidate, Strategy};
use crate::{DType, MoleError, Result};
use std::collections::HashMap;

/// The strategies a family's builds serve, or none for families that are not (yet) a whole
/// layer path. Adding a family to the search space is one arm here (plus its arm in
/// `prepare_run`, feature `cli`).
pub fn strategy_of(family: Family) -> &'static [Strategy] {
    match family {
        Family::Sgmv => &[Strategy::Grouped],
        Family::Gating | Family::Backward => &[],
        Family::Fused => &[Strategy::Fused, Strategy::FusedSplit],
        Family::Ffn => &[Strategy::FfnBlock],
        Family::Wgrad => &[],
    }
}

/// Every candidate of a layer in `dtype`, candidate 0 the default. Within a strategy the
/// family's default build comes first, then its other candidates in registry order; strategies
/// follow [`Strategy::LAYER`]. No two candidates are equal, and none is a block's.
pub fn candidates(dtype: DType) -> Vec<Candidate> {
    candidates_of(&Strategy::LAYER, dtype)
}

/// Every candidate of an FFN-expert block in `dtype` ([`Strategy::FfnBlock`] with each ffn
/// build; each runs with the SGMV build of its tile height, `kernels::ffn::sgmv_build_for`),
/// candidate 0 the default build (what runs untuned). None is a layer's.
pub fn block_candidates(dtype: DType) -> Vec<Candidate> {
    candidates_of(&[Strategy::FfnBlock], dtype)
}

fn candidates_of(strategies: &[Strategy], dtype: DType) -> Vec<Candidate> {
    let mut out: Vec<Candidate> = Vec::new();
    for &strategy in strategies {
        for family in Family::ALL.into_iter().filter(|f| strategy_of(*f).contains(&strategy)) {
            let defaults = family.default_builds().into_iter().filter(|b| b.dtype == dtype);
            let rest = family.candidates().into_iter().filter(|b| b.dtype == dtype);
            for build in defaults.chain(rest) {
                let c = Candidate { strategy, build };
                if !out.contains(&c) {
                    out.push(c);
                }
            }
        }
    }
    out
}

/// The candidates of one shape: [`candidates`] with the documented heuristic's choice first
/// ([`crate::runtime::heuristic`] with its default build: what runs without tuning), so that
/// candidate 0 is the default every speed-up is measured against. Without a heuristic choice
/// (a layer no strategy fits) the order of [`candidates`] stands.
pub fn candidates_for(spec: &crate::model::LayerSpec, dtype: DType, tokens: usize, sm_count: u32) -> Vec<Candidate> {
    let mut all = candidates(dtype);
    if let Ok(strategy) = crate::runtime::heuristic(spec, dtype, tokens, sm_count) {
        let default = Candidate { strategy, build: crate::runtime::default_build(strategy, dtype) };
        if let Some(i) = all.iter().position(|c| *c == default) {
            let c = all.remove(i);
            all.insert(0, c);
        }
    }
    all
}

/// Blocks of one kernel that fit on one SM at once, by registers and by shared memory
/// (`max_shared_bytes_per_block` stands for the SM's usable shared memory, a lower bound).
/// 0 means the kernel cannot launch. `threads == 0` gives 0.
pub fn blocks_per_sm(entry: &EntryResources, threads: u32, dynamic_shared_bytes: u64, limits: &ArchLimits) -> u64 {
    if threads == 0 || threads > limits.max_threads_per_block {
        return 0;
    }
    let regs = limits.registers_per_block(entry.registers, threads);
    let by_registers = (limits.registers_per_sm as u64).checked_div(regs).unwrap_or(u64::MAX);
    let shared = entry.shared_bytes + dynamic_shared_bytes;
    let by_shared = (limits.max_shared_bytes_per_block as u64).checked_div(shared).unwrap_or(u64::MAX);
    by_registers.min(by_shared)
}

/// Why a build with these ptxas records must not be timed, or `None` when it may.
///
/// `entries` are the records of the build's entry points (a missing one is a reason);
/// `threads` and `dynamic_shared_bytes` are the launch the build declares. Reasons: spills or
/// any other [`ArchLimits::check`] violation, or fewer than one block per SM
/// ([`blocks_per_sm`]). The text names the entry point and every violation.
pub fn prune_reason(
    entries: &[EntryResources],
    entry_points: &[String],
    threads: Option<u32>,
    dynamic_shared_bytes: u64,
    limits: &ArchLimits,
) -> Option<String> {
    let mut reasons = Vec::new();
    for name in entry_points {
        let Some(e) = entries.iter().find(|e| &e.entry == name) else {
            reasons.push(format!("{name}: not in the ptxas report"));
            continue;
        };
        let violations = limits.check(e, threads, dynamic_shared_bytes);
        if !violations.is_empty() {
            let v: Vec<String> = violations.iter().map(ToString::to_string).collect();
            reasons.push(format!("{name}: {}", v.join(", ")));
        } else if let Some(t) = threads {
            if blocks_per_sm(e, t, dynamic_shared_bytes, limits) < 1 {
                reasons.push(format!("{name}: occupancy below 1 block/SM"));
            }
        }
    }
    (!reasons.is_empty()).then(|| reasons.join("; "))
}

/// [`prune_reason`] for a verbose cubin compile of `build`, with spills of non-inlined callees
/// charged to the build. Errors when the build's configuration is invalid.
pub fn prune_compiled(build: &KernelBuild, compiled: &Compiled, limits: &ArchLimits) -> Result<Option<String>> {
    build.config.validate(build.dtype)?;
    let (threads, dynamic) = (Some(build.block_threads()), build.dynamic_shared_bytes());
    let mut reasons: Vec<String> = compiled
        .functions
        .iter()
        .filter(|f| f.spill_stores > 0 || f.spill_loads > 0)
        .map(|f| format!("callee {} spills ({} B stored, {} B loaded)", f.name, f.spill_stores, f.spill_loads))
        .collect();
    reasons.extend(prune_reason(&compiled.resources, &build.entry_points(), threads, dynamic, limits));
    Ok((!reasons.is_empty()).then(|| reasons.join("; ")))
}

/// The verdict on one candidate before timing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Screen {
    /// May be timed.
    Keep,
    /// Rejected by its compile report; the reason.
    Prune(String),
    /// Could not be compiled (or checked); the error, as text.
    Error(String),
}

/// Compiles candidates for one architecture and remembers each build's verdict (the same builds
/// serve every shape of a dtype).
#[derive(Debug)]
pub struct Pruner {
    arch: Arch,
    seen: HashMap<KernelBuild, Screen>,
}

impl Pruner {
    /// A pruner for `arch`.
    pub fn new(arch: Arch) -> Self {
        Pruner { arch, seen: HashMap::new() }
    }

    /// The architecture.
    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// The verdict on `candidate`: a verbose cubin compile with NVRTC, then [`prune_compiled`].
    pub fn screen(&mut self, candidate: &Candidate) -> Screen {
        self.screen_build(&candidate.build)
    }

    /// The verdict on one build (a block candidate's SGMV pair is screened as well as its ffn
    /// build).
    pub fn screen_build(&mut self, build: &KernelBuild) -> Screen {
        if let Some(s) = self.seen.get(build) {
            return s.clone();
        }
        let verdict = screen_build(build, self.arch);
        self.seen.insert(build.clone(), verdict.clone());
        verdict
    }
}

fn screen_build(build: &KernelBuild, arch: Arch) -> Screen {
    let compiled = match build.unit().and_then(|u| compile(&u, arch, Output::Cubin, true)) {
        Ok(c) => c,
        Err(MoleError::NvrtcCompile { status, log, .. }) => {
            return Screen::Error(format!("compile error ({status}): {}", log.lines().next().unwrap_or("")))
        }
        Err(e) => return Screen::Error(e.to_string()),
    };
    match prune_compiled(build, &compiled, &arch.limits()) {
        Ok(None) => Screen::Keep,
        Ok(Some(reason)) => Screen::Prune(reason),
        Err(e) => Screen::Error(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::{nvrtc_status, parse_ptxas_log};
    use crate::kernels::sgmv;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn candidate_zero_is_the_default_and_all_are_distinct() {
        for dtype in DType::ALL {
            let c = candidates(dtype);
            assert!(!c.is_empty(), "{dtype}");
            let default = sgmv::default_builds().into_iter().find(|b| b.dtype == dtype).unwrap();
            assert_eq!(c[0], Candidate { strategy: Strategy::Grouped, build: default }, "{dtype}");
            assert!(c.iter().all(|x| x.build.dtype == dtype), "dtype filter for {dtype}");
            for (i, a) in c.iter().enumerate() {
                assert!(c[i + 1..].iter().all(|b| b != a), "{a} twice");
            }
            // Every sgmv candidate of the dtype is in the space.
            let grouped = c.iter().filter(|x| x.strategy == Strategy::Grouped).count();
            assert_eq!(grouped, sgmv::candidates().iter().filter(|b| b.dtype == dtype).count());
            assert!(grouped > 1, "a space of one is no search");
        }
    }

    #[test]
    fn per_shape_candidate_zero_is_what_runs_without_tuning() {
        use crate::kernels::fused;
        use crate::model::{Method, MethodShape};
        let shape = |experts, rank| MethodShape { d_in: 4096, d_out: 4096, experts, rank, k: 2, alpha: 32.0 };
        let mixlora = Method::MixLoraPerLinear.spec(shape(8, 16)).unwrap();
        let fused_default = fused::build(DType::BF16, fused::FusedConfig::DEFAULT);
        for (tokens, strategy) in [(4096, Strategy::Fused), (1, Strategy::FusedSplit)] {
            let c = candidates_for(&mixlora, DType::BF16, tokens, 132);
            assert_eq!(c[0], Candidate { strategy, build: fused_default.clone() }, "T={tokens}");
            assert_eq!(c.len(), candidates(DType::BF16).len());
        }
        let wide = Method::MixLoraPerLinear.spec(shape(64, 16)).unwrap();
        let c = candidates_for(&wide, DType::BF16, 4096, 132);
        let sgmv_default = sgmv::build(DType::BF16, sgmv::SgmvConfig::DEFAULT);
        assert_eq!(c[0], Candidate { strategy: Strategy::Grouped, build: sgmv_default });
    }

    #[test]
    fn layers_and_blocks_have_disjoint_spaces() {
        use crate::kernels::ffn;
        for dtype in DType::ALL {
            let layer = candidates(dtype);
            let block = block_candidates(dtype);
            assert!(layer.iter().all(|c| !c.strategy.is_block() && c.build.family() != Family::Ffn), "{dtype}");
            assert!(block.iter().all(|c| c.strategy == Strategy::FfnBlock && c.build.family() == Family::Ffn));
            assert_eq!(block[0].build, ffn::build(dtype, ffn::FfnConfig::DEFAULT), "{dtype}");
            assert_eq!(block.len(), ffn::CONFIG_CANDIDATES.len(), "{dtype}");
            // Every block candidate has its SGMV pair.
            assert!(block.iter().all(|c| ffn::sgmv_build_for(&c.build).is_ok()), "{dtype}");
        }
        // A layer's per-shape space holds no block candidate.
        use crate::model::{Method, MethodShape};
        let s = MethodShape { d_in: 256, d_out: 256, experts: 8, rank: 16, k: 2, alpha: 32.0 };
        let spec = Method::MixLoraPerLinear.spec(s).unwrap();
        assert!(candidates_for(&spec, DType::BF16, 64, 132).iter().all(|c| !c.strategy.is_block()));
    }

    #[test]
    fn strategies_map_families() {
        assert_eq!(strategy_of(Family::Sgmv), &[Strategy::Grouped]);
        assert_eq!(strategy_of(Family::Ffn), &[Strategy::FfnBlock]);
        assert!(strategy_of(Family::Gating).is_empty());
        assert!(candidates(DType::F16).iter().all(|c| c.build.family() != Family::Gating));
        // Every candidate's family maps to its strategy.
        for dtype in DType::ALL {
            assert!(candidates(dtype).iter().all(|c| strategy_of(c.build.family()).contains(&c.strategy)));
        }
    }

    const SPILLS: &str = include_str!("../cuda/testdata/ptxas_sm90_spills.log");
    const SM80: &str = include_str!("../cuda/testdata/ptxas_sm80.log");

    #[test]
    fn prune_from_captured_ptxas_logs() {
        let l = Arch::Sm90.limits();
        let r = parse_ptxas_log(SPILLS);
        let why = prune_reason(&r.entries, &names(&["spilly"]), Some(128), 0, &l).unwrap();
        assert!(why.contains("spilly") && why.contains("spills (3200 B stored, 3200 B loaded)"), "{why}");
        assert_eq!(prune_reason(&r.entries, &names(&["small_f32"]), Some(256), 0, &l), None);
        let r80 = parse_ptxas_log(SM80);
        assert_eq!(prune_reason(&r80.entries, &names(&["small_f32", "spilly"]), Some(256), 0, &l), None);
        // A missing entry is a reason, not a pass.
        let why = prune_reason(&r80.entries, &names(&["small_f32", "nope"]), None, 0, &l).unwrap();
        assert!(why.contains("nope: not in the ptxas report"), "{why}");
    }

    #[test]
    fn prune_from_hand_made_logs() {
        let log = "ptxas info    : 0 bytes gmem\n\
            ptxas info    : Compiling entry function 'big_smem' for 'sm_86'\n\
            ptxas info    : Function properties for big_smem\n\
            ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
            ptxas info    : Used 40 registers, 40960 bytes smem, 380 bytes cmem[0]\n\
            ptxas info    : Compiling entry function 'fat_regs' for 'sm_86'\n\
            ptxas info    : Function properties for fat_regs\n\
            ptxas         .     0 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads\n\
            ptxas info    : Used 255 registers, 380 bytes cmem[0]\n";
        let r = parse_ptxas_log(log);
        let l86 = Arch::Sm86.limits();
        // 40 KiB static fits; plus 64 KiB dynamic is over sm_86's 99 KiB, not sm_80's 163 KiB.
        assert_eq!(prune_reason(&r.entries, &names(&["big_smem"]), Some(256), 0, &l86), None);
        let why = prune_reason(&r.entries, &names(&["big_smem"]), Some(256), 64 * 1024, &l86).unwrap();
        assert!(why.contains("shared/block > 101376"), "{why}");
        assert_eq!(prune_reason(&r.entries, &names(&["big_smem"]), Some(256), 64 * 1024, &Arch::Sm80.limits()), None);
        // 255 registers x 512 threads overflow the register file; the spill is reported too.
        let why = prune_reason(&r.entries, &names(&["fat_regs"]), Some(512), 0, &l86).unwrap();
        assert!(why.contains("spills (8 B stored, 8 B loaded)") && why.contains("registers/block"), "{why}");
    }

    #[test]
    fn occupancy_by_registers_and_shared_memory() {
        let l = Arch::Sm90.limits();
        let e = |registers, shared_bytes| EntryResources {
            entry: "k".into(),
            registers,
            shared_bytes,
            ..Default::default()
        };
        assert_eq!(blocks_per_sm(&e(32, 0), 256, 0, &l), 8); // 65536 / (32 * 256)
        assert_eq!(blocks_per_sm(&e(32, 100 * 1024), 128, 0, &l), 2); // 227 KiB / 100 KiB
        assert_eq!(blocks_per_sm(&e(32, 0), 128, 228 * 1024, &l), 0);
        assert_eq!(blocks_per_sm(&e(32, 0), 0, 0, &l), 0);
        assert_eq!(blocks_per_sm(&e(255, 0), 1024, 0, &l), 0);
    }

    /// NVRTC compiles of real candidates: the default passes on every architecture; the same
    /// report with more dynamic shared memory than the architecture has is pruned.
    #[test]
    fn prune_real_candidates_compiled_with_nvrtc() {
        if let Err(e) = nvrtc_status() {
            assert!(std::env::var("MOLE_REQUIRE_NVRTC").map_or(true, |v| v != "1"), "MOLE_REQUIRE_NVRTC=1 but {e}");
            eprintln!("note: prune_real_candidates_compiled_with_nvrtc skipped: {e}");
            return;
        }
        let default = candidates(DType::BF16).remove(0);
        for arch in [Arch::Sm80, Arch::Sm90] {
            let compiled = compile(&default.build.unit().unwrap(), arch, Output::Cubin, true).unwrap();
            assert_eq!(compiled.resources.len(), default.build.entry_points().len(), "{}", compiled.log);
            let limits = arch.limits();
            assert_eq!(prune_compiled(&default.build, &compiled, &limits).unwrap(), None, "{}", compiled.log);
            let threads = Some(default.build.block_threads());
            let too_much = limits.max_shared_bytes_per_block as u64 + 1;
            let why = prune_reason(&compiled.resources, &default.build.entry_points(), threads, too_much, &limits);
            assert!(why.is_some_and(|w| w.contains("shared/block")), "{arch}");
            assert_eq!(Pruner::new(arch).screen(&default), Screen::Keep);
        }
        // A build that cannot be compiled (its tiling breaks the kernel's constraints) is an
        // error, not a crash.
        let bad_tiling = sgmv::SgmvConfig { bm: 3, ..sgmv::SgmvConfig::DEFAULT };
        let broken = Candidate { strategy: Strategy::Grouped, build: sgmv::build(DType::BF16, bad_tiling) };
        assert!(matches!(Pruner::new(Arch::Sm90).screen(&broken), Screen::Error(_)));
    }
}
