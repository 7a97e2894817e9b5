//! What both runtimes ([`super::CompiledLayer`], [`super::CompiledFfn`]) keep between calls: plans
//! memoised per token count, and the builds loaded on their device.

use crate::cuda::Device;
use crate::kernels::exec::LoadedBuild;
use crate::kernels::KernelBuild;
use crate::{MoleError, Result};
use std::sync::{Arc, Mutex};

/// Token counts whose plans are kept; past it the memo starts over (a decode loop reuses a few).
const MEMO_PLANS: usize = 64;

/// Plans memoised per token count.
#[derive(Debug)]
pub(crate) struct PlanMemo<P>(Mutex<Vec<(usize, Arc<P>)>>);

impl<P> Default for PlanMemo<P> {
    fn default() -> Self {
        PlanMemo(Mutex::new(Vec::new()))
    }
}

impl<P> PlanMemo<P> {
    /// The plan of `tokens`, made by `make` unless memoised. Errors: zero tokens, and `make`'s.
    pub(crate) fn get(&self, tokens: usize, make: impl FnOnce() -> Result<P>) -> Result<Arc<P>> {
        if tokens == 0 {
            return Err(MoleError::ZeroDimension { name: "tokens" });
        }
        // A poisoned lock only means a panic elsewhere; the memo is still a valid memo.
        let mut plans = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, p)) = plans.iter().find(|(t, _)| *t == tokens) {
            return Ok(p.clone());
        }
        let plan = Arc::new(make()?);
        if plans.len() >= MEMO_PLANS {
            plans.clear();
        }
        plans.push((tokens, plan.clone()));
        Ok(plan)
    }
}

/// The builds loaded on one device, each loaded once, on first use.
#[derive(Default)]
pub(crate) struct LoadedBuilds(Mutex<Vec<Arc<LoadedBuild>>>);

impl LoadedBuilds {
    /// `build` loaded on `device` (compiled or taken from the caches the first time).
    pub(crate) fn get(&self, device: &Device, build: &KernelBuild) -> Result<Arc<LoadedBuild>> {
        let mut loaded = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = loaded.iter().find(|l| l.build() == build) {
            return Ok(l.clone());
        }
        let l = Arc::new(LoadedBuild::load(device, build, build.kernels())?);
        loaded.push(l.clone());
        Ok(l)
    }
}
