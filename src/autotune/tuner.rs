//! Tuning one shape: enumerate, prune, check and time each candidate within a time budget, and
//! choose the fastest correct one. A candidate that is pruned, fails or is wrong is recorded and
//! skipped; it never aborts the search and is never chosen.

use super::measure::{block_reference_y, measure, prepare_block_run, prepare_run, reference_y, MeasureOptions};
use super::space::{block_candidates, candidates_for, Pruner, Screen};
use super::TunableRun;
use crate::cuda::{nvrtc_present, Device};
use crate::kernels::{ffn, Family, KernelBuild};
use crate::model::{FfnSpec, LayerSpec};
use crate::tune::{Candidate, Provenance, ShapeKey, TunedEntry};
use crate::{DType, MoleError, Result};
use std::cmp::Ordering;
use std::time::{Duration, Instant};

/// What happened to one candidate.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Correct, timed, and the fastest: the winner.
    Chosen,
    /// Correct and timed, not the fastest.
    Timed,
    /// Rejected from its compile report before timing; the reason.
    Pruned(String),
    /// Could not be compiled, prepared, run or timed; the error.
    Failed(String),
    /// Ran but disagreed with the reference.
    Wrong {
        /// Max scaled error.
        err: f64,
        /// The tolerance it exceeded.
        tol: f64,
    },
    /// Not tried: the time budget was spent.
    Skipped(String),
}

/// What evaluating one candidate produced (before the winner is chosen).
#[derive(Clone, Debug, PartialEq)]
pub enum Evaluation {
    /// Rejected before timing; the reason.
    Pruned(String),
    /// Could not be compiled or run; why.
    Failed(String),
    /// Disagreed with the reference.
    Wrong {
        /// Max scaled error.
        err: f64,
        /// Tolerance.
        tol: f64,
    },
    /// Correct, with its median time (ms) and bandwidth (GB/s).
    Timed {
        /// Median time, ms.
        median_ms: f64,
        /// Effective bandwidth, GB/s.
        gbs: f64,
    },
}

/// One candidate's line in a shape's report.
#[derive(Clone, Debug, PartialEq)]
pub struct CandidateReport {
    /// Index in the search space (0 is the default).
    pub index: usize,
    /// The candidate.
    pub candidate: Candidate,
    /// What happened.
    pub outcome: Outcome,
    /// Median time, ms, when timed.
    pub median_ms: Option<f64>,
    /// Effective bandwidth, GB/s, when timed.
    pub gbs: Option<f64>,
}

/// Evaluates `candidates` in order with `evaluate` and marks the fastest correct one
/// [`Outcome::Chosen`] (the lower index on ties). Candidate 0 (the default) is always evaluated;
/// the others only while `budget` (from the start of the search) is not spent. An error from
/// `evaluate` or a non-finite time is [`Outcome::Failed`]; nothing stops the search.
pub fn search(
    candidates: &[Candidate],
    budget: Option<Duration>,
    mut evaluate: impl FnMut(usize, &Candidate) -> Result<Evaluation>,
) -> Vec<CandidateReport> {
    let start = Instant::now();
    let mut reports: Vec<CandidateReport> = Vec::with_capacity(candidates.len());
    for (index, candidate) in candidates.iter().enumerate() {
        let report =
            |outcome, median_ms, gbs| CandidateReport { index, candidate: candidate.clone(), outcome, median_ms, gbs };
        if let Some(b) = budget.filter(|b| index > 0 && start.elapsed() >= *b) {
            reports.push(report(
                Outcome::Skipped(format!("time budget of {:.1} s spent", b.as_secs_f64())),
                None,
                None,
            ));
            continue;
        }
        reports.push(match evaluate(index, candidate) {
            Err(e) => report(Outcome::Failed(e.to_string()), None, None),
            Ok(Evaluation::Pruned(why)) => report(Outcome::Pruned(why), None, None),
            Ok(Evaluation::Failed(why)) => report(Outcome::Failed(why), None, None),
            Ok(Evaluation::Wrong { err, tol }) => report(Outcome::Wrong { err, tol }, None, None),
            Ok(Evaluation::Timed { median_ms, .. }) if !(median_ms.is_finite() && median_ms >= 0.0) => {
                report(Outcome::Failed(format!("measured time {median_ms} ms is not a time")), None, None)
            }
            Ok(Evaluation::Timed { median_ms, gbs }) => report(Outcome::Timed, Some(median_ms), Some(gbs)),
        });
    }
    let best = reports
        .iter()
        .filter(|r| r.outcome == Outcome::Timed)
        .min_by(|a, b| a.median_ms.unwrap_or(f64::INFINITY).total_cmp(&b.median_ms.unwrap_or(f64::INFINITY)))
        .map(|r| r.index);
    if let Some(i) = best {
        reports[i].outcome = Outcome::Chosen;
    }
    reports
}

/// How [`tune_shape`] works.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TuneOptions {
    /// How each candidate is timed.
    pub measure: MeasureOptions,
    /// Wall-clock budget of the shape; the default is always measured.
    pub budget: Option<Duration>,
}

/// The result of tuning one shape.
#[derive(Clone, Debug, PartialEq)]
pub struct ShapeResult {
    /// The shape's key.
    pub key: ShapeKey,
    /// Tokens it was measured at.
    pub tokens: usize,
    /// Every candidate, in search-space order.
    pub reports: Vec<CandidateReport>,
    /// The winner as a cache entry; `None` when no candidate was correct.
    pub entry: Option<TunedEntry>,
}

impl ShapeResult {
    /// The winner's report.
    pub fn chosen(&self) -> Option<&CandidateReport> {
        self.reports.iter().find(|r| r.outcome == Outcome::Chosen)
    }

    /// The default's (candidate 0) report.
    pub fn default_report(&self) -> Option<&CandidateReport> {
        self.reports.first()
    }
}

/// The cache entry of a finished search, when a candidate was chosen.
pub fn entry_of(key: &ShapeKey, reports: &[CandidateReport], provenance: &Provenance) -> Option<TunedEntry> {
    let chosen = reports.iter().find(|r| r.outcome == Outcome::Chosen)?;
    let default_time = reports.first().filter(|r| matches!(r.outcome, Outcome::Chosen | Outcome::Timed));
    Some(TunedEntry::new(
        key.clone(),
        chosen.candidate.clone(),
        chosen.median_ms?,
        default_time.and_then(|r| r.median_ms),
        chosen.gbs?,
        provenance,
    ))
}

/// Tunes `spec` in `dtype` at `tokens` tokens on `device`: every candidate of
/// [`candidates_for`] (the heuristic's choice first) is screened by `pruner` (compile report),
/// prepared ([`prepare_run`]), checked against the shape's f64 reference ([`reference_y`],
/// computed once) and timed ([`measure`]).
///
/// Errors only for a call that cannot be tuned at all (zero tokens, an invalid spec, an empty
/// search space); a candidate's failure is in its report. Without NVRTC only the shipped default
/// builds can run, unscreened; the others fail with the reason.
pub fn tune_shape(
    device: &Device,
    pruner: &mut Pruner,
    spec: &LayerSpec,
    dtype: DType,
    tokens: usize,
    opts: &TuneOptions,
    provenance: &Provenance,
) -> Result<ShapeResult> {
    if tokens == 0 {
        return Err(MoleError::ZeroDimension { name: "tokens" });
    }
    spec.validate()?;
    let key = ShapeKey::new(spec, dtype, tokens);
    let space = candidates_for(spec, dtype, tokens, device.sm_count());
    if space.is_empty() {
        return Err(MoleError::Unsupported(format!("no kernel candidates for {dtype}")));
    }
    let reference = reference_y(spec, dtype, tokens)?;
    let reports = search(&space, opts.budget, |_, c| {
        let run = || prepare_run(device, spec, c.strategy, &c.build, tokens, Some(reference.clone()));
        evaluate(device, pruner, std::slice::from_ref(&c.build), &opts.measure, run)
    });
    let entry = entry_of(&key, &reports, provenance);
    Ok(ShapeResult { key, tokens, reports, entry })
}

/// Tunes the FFN-expert block `spec` in `dtype` at `tokens` tokens on `device`, as
/// [`tune_shape`] a layer: every candidate of [`block_candidates`] (the default ffn build first),
/// its ffn build and SGMV pair ([`ffn::sgmv_build_for`]) screened by `pruner`, the whole block
/// prepared ([`prepare_block_run`]), checked against the shape's f64 reference
/// ([`block_reference_y`], once) and timed. The entry is keyed by [`ShapeKey::for_ffn`].
pub fn tune_block(
    device: &Device,
    pruner: &mut Pruner,
    spec: &FfnSpec,
    dtype: DType,
    tokens: usize,
    opts: &TuneOptions,
    provenance: &Provenance,
) -> Result<ShapeResult> {
    if tokens == 0 {
        return Err(MoleError::ZeroDimension { name: "tokens" });
    }
    spec.validate()?;
    let key = ShapeKey::for_ffn(spec, dtype, tokens);
    let space = block_candidates(dtype);
    if space.is_empty() {
        return Err(MoleError::Unsupported(format!("no block candidates for {dtype}")));
    }
    let reference = block_reference_y(spec, dtype, tokens)?;
    let reports = search(&space, opts.budget, |_, c| {
        let builds = [c.build.clone(), ffn::sgmv_build_for(&c.build)?];
        let run = || prepare_block_run(device, spec, &c.build, tokens, Some(reference.clone()));
        evaluate(device, pruner, &builds, &opts.measure, run)
    });
    let entry = entry_of(&key, &reports, provenance);
    Ok(ShapeResult { key, tokens, reports, entry })
}

/// One candidate of a search: `builds` (every build it compiles that may differ from a default)
/// screened by `pruner` (or, without NVRTC, required to be shipped default builds), then the
/// run from `prepare` checked and, when correct, timed.
fn evaluate<'r>(
    device: &Device,
    pruner: &mut Pruner,
    builds: &[KernelBuild],
    measure_opts: &MeasureOptions,
    prepare: impl FnOnce() -> Result<Box<dyn TunableRun + 'r>>,
) -> Result<Evaluation> {
    if nvrtc_present() {
        for build in builds {
            match pruner.screen_build(build) {
                Screen::Keep => {}
                Screen::Prune(why) => return Ok(Evaluation::Pruned(format!("{}: {why}", build.family()))),
                Screen::Error(e) => return Ok(Evaluation::Failed(e)),
            }
        }
    } else if !builds.iter().all(|b| Family::ALL.iter().any(|f| f.default_builds().contains(b))) {
        return Ok(Evaluation::Failed("NVRTC is not available: only the shipped default builds run".into()));
    }
    let mut run = prepare()?;
    let (err, tol) = run.check()?;
    // NaN is not correct.
    if !matches!(err.partial_cmp(&tol), Some(Ordering::Less | Ordering::Equal)) {
        return Ok(Evaluation::Wrong { err, tol });
    }
    let m = measure(device, run.as_mut(), measure_opts)?;
    Ok(Evaluation::Timed { median_ms: m.median_ms, gbs: m.gbs(run.bytes()) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Method, MethodShape};

    fn space() -> Vec<Candidate> {
        super::super::space::candidates(DType::BF16)
    }

    fn timed(ms: f64) -> Result<Evaluation> {
        Ok(Evaluation::Timed { median_ms: ms, gbs: 1.0 / ms })
    }

    #[test]
    fn the_fastest_correct_candidate_wins_and_failures_never_abort() {
        let s = space();
        assert!(s.len() >= 4);
        // 0: default 2 ms; 1: wrong but fastest; 2: errors; 3: 1 ms; rest pruned.
        let reports = search(&s, None, |i, _| match i {
            0 => timed(2.0),
            1 => Ok(Evaluation::Wrong { err: 1.0, tol: 0.1 }),
            2 => Err(MoleError::Unsupported("boom".into())),
            3 => timed(1.0),
            _ => Ok(Evaluation::Pruned("spills".into())),
        });
        assert_eq!(reports.len(), s.len());
        assert_eq!(reports[0].outcome, Outcome::Timed);
        assert_eq!(reports[1].outcome, Outcome::Wrong { err: 1.0, tol: 0.1 });
        assert!(matches!(&reports[2].outcome, Outcome::Failed(e) if e.contains("boom")));
        assert_eq!(reports[3].outcome, Outcome::Chosen);
        assert!(reports[4..].iter().all(|r| matches!(r.outcome, Outcome::Pruned(_))));
        let key = ShapeKey::new(&Method::MixLoraPerLinear.spec(shape()).unwrap(), DType::BF16, 16);
        let e = entry_of(&key, &reports, &Provenance::current()).unwrap();
        assert_eq!((e.time_ms, e.default_time_ms, e.speedup()), (1.0, Some(2.0), Some(2.0)));
        assert_eq!(e.candidate(), s[3]);
    }

    fn shape() -> MethodShape {
        MethodShape { d_in: 64, d_out: 48, experts: 8, rank: 4, k: 2, alpha: 8.0 }
    }

    #[test]
    fn nothing_correct_means_no_winner_and_nan_is_a_failure() {
        let s = space();
        let reports =
            search(
                &s,
                None,
                |i, _| if i == 0 { timed(f64::NAN) } else { Ok(Evaluation::Wrong { err: f64::NAN, tol: 1.0 }) },
            );
        assert!(matches!(reports[0].outcome, Outcome::Failed(_)));
        assert!(reports.iter().all(|r| r.outcome != Outcome::Chosen));
        let key = ShapeKey::new(&Method::MixLoraPerLinear.spec(shape()).unwrap(), DType::BF16, 16);
        assert_eq!(entry_of(&key, &reports, &Provenance::current()), None);
    }

    #[test]
    fn ties_go_to_the_default_and_the_budget_skips_the_rest() {
        let s = space();
        let reports = search(&s, None, |_, _| timed(1.0));
        assert_eq!(reports[0].outcome, Outcome::Chosen);
        assert!(reports[1..].iter().all(|r| r.outcome == Outcome::Timed));
        let mut calls = 0;
        let reports = search(&s, Some(Duration::ZERO), |_, _| {
            calls += 1;
            timed(1.0)
        });
        assert_eq!(calls, 1, "only the default runs with no budget left");
        assert_eq!(reports[0].outcome, Outcome::Chosen);
        assert!(reports[1..].iter().all(|r| matches!(r.outcome, Outcome::Skipped(_))));
    }
}
