//! Borrowed host tensors for one layer call, validated against a [`LayerSpec`].

use super::{Gating, LayerSpec, Mix, Router};
use crate::limits::check_len;
use crate::{MoleError, Result};

/// The tensors of one layer call (row-major host slices). Which optional tensors are required
/// follows from the spec; [`LayerInputs::validate`] checks presence and every shape.
#[derive(Clone, Copy, Debug)]
pub struct LayerInputs<'a, T> {
    /// Number of tokens `T` (0 is a no-op).
    pub tokens: usize,
    /// `x [T, d_in]`.
    pub x: &'a [T],
    /// `A [d_in, R]`.
    pub a: &'a [T],
    /// `B [R, d_out]`.
    pub b: &'a [T],
    /// Base output `y [T, d_out]`; the layer returns `y + delta`.
    pub y: &'a [T],
    /// `router_weight`: `[d_in, E]` for [`Router::X`], `[R, E]` for [`Router::H`].
    pub router_weight: Option<&'a [T]>,
    /// `router_bias [E]`.
    pub router_bias: Option<&'a [T]>,
    /// `logits [T, E]` for [`Router::Logits`].
    pub logits: Option<&'a [T]>,
    /// `weights [T, E]` for [`Gating::Given`].
    pub weights: Option<&'a [T]>,
    /// `adapter_ids [T]` for [`Gating::AdapterIds`].
    pub adapter_ids: Option<&'a [i32]>,
    /// `selection_bias [E]` for rules with `bias: true`.
    pub selection_bias: Option<&'a [T]>,
    /// `cores [C, R, R]` for [`Mix::CoreMerge`].
    pub cores: Option<&'a [T]>,
}

impl<'a, T> LayerInputs<'a, T> {
    /// The four tensors every layer takes; optional ones start as `None`.
    pub fn new(tokens: usize, x: &'a [T], a: &'a [T], b: &'a [T], y: &'a [T]) -> Self {
        Self {
            tokens,
            x,
            a,
            b,
            y,
            router_weight: None,
            router_bias: None,
            logits: None,
            weights: None,
            adapter_ids: None,
            selection_bias: None,
            cores: None,
        }
    }

    /// Checks that exactly the tensors the spec needs are present, each with the right length,
    /// and that adapter ids are in range. Validates the spec first.
    pub fn validate(&self, spec: &LayerSpec) -> Result<()> {
        spec.validate()?;
        crate::limits::check_max("tokens", self.tokens, crate::limits::MAX_TOKENS)?;
        let (t, r, e) = (self.tokens, spec.total_rank(), spec.routed_experts());
        check_len("x", self.x, &[t, spec.d_in])?;
        check_len("A", self.a, &[spec.d_in, r])?;
        check_len("B", self.b, &[r, spec.d_out])?;
        check_len("y", self.y, &[t, spec.d_out])?;

        let router = spec.router();
        let need = |present: bool, name: &'static str, needed: bool, by: &'static str| -> Result<()> {
            match (present, needed) {
                (false, true) => Err(MoleError::MissingInput { name, needed_by: by }),
                (true, false) => Err(MoleError::UnexpectedInput { name, reason: by }),
                _ => Ok(()),
            }
        };
        let w_rows = match router {
            Some(Router::X { .. }) => Some(spec.d_in),
            Some(Router::H { .. }) => Some(r),
            _ => None,
        };
        need(self.router_weight.is_some(), "router_weight", w_rows.is_some(), "the x or h router")?;
        if let (Some(w), Some(rows)) = (self.router_weight, w_rows) {
            check_len("router_weight", w, &[rows, e])?;
        }
        let bias = matches!(router, Some(Router::X { bias: true } | Router::H { bias: true }));
        need(self.router_bias.is_some(), "router_bias", bias, "a router with bias: true")?;
        if let Some(b) = self.router_bias {
            check_len("router_bias", b, &[e])?;
        }
        need(self.logits.is_some(), "logits", router == Some(Router::Logits), "the logits router")?;
        if let Some(z) = self.logits {
            check_len("logits", z, &[t, e])?;
        }
        let given = matches!(spec.gating, Gating::Given { .. });
        need(self.weights.is_some(), "weights", given, "given gating")?;
        if let Some(w) = self.weights {
            check_len("weights", w, &[t, e])?;
        }
        let ids = spec.gating == Gating::AdapterIds;
        need(self.adapter_ids.is_some(), "adapter_ids", ids, "adapter_ids gating")?;
        if let Some(ids) = self.adapter_ids {
            check_len("adapter_ids", ids, &[t])?;
            if let Some((token, &id)) = ids.iter().enumerate().find(|(_, &id)| id < -1 || id as i64 >= e as i64) {
                return Err(MoleError::ExpertIdOutOfRange { token, slot: 0, id: id as i64, experts: e });
            }
        }
        let sel_bias = spec.rule().is_some_and(|r| r.uses_selection_bias());
        need(self.selection_bias.is_some(), "selection_bias", sel_bias, "a rule with bias: true")?;
        if let Some(b) = self.selection_bias {
            check_len("selection_bias", b, &[e])?;
        }
        let cores = matches!(spec.mix, Mix::CoreMerge { .. });
        need(self.cores.is_some(), "cores", cores, "the core_merge mix")?;
        if let Some(c) = self.cores {
            check_len("cores", c, &[e, r, r])?;
        }
        Ok(())
    }
}
