//! Borrowed host tensors for one layer call, validated against a [`LayerSpec`].

use super::{Gating, LayerSpec, Mix, Router};
use crate::limits::{check_count, check_len};
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

        let given = [
            self.router_weight.map(<[T]>::len),
            self.router_bias.map(<[T]>::len),
            self.logits.map(<[T]>::len),
            self.weights.map(<[T]>::len),
            self.adapter_ids.map(<[i32]>::len),
            self.selection_bias.map(<[T]>::len),
            self.cores.map(<[T]>::len),
        ];
        for ((name, by, shape), len) in optional_inputs(spec, t).into_iter().zip(given) {
            match (len, shape) {
                (None, Some(_)) => return Err(MoleError::MissingInput { name, needed_by: by }),
                (Some(_), None) => return Err(MoleError::UnexpectedInput { name, reason: by }),
                (Some(len), Some(shape)) => check_count(name, len, &shape)?,
                (None, None) => {}
            }
        }
        if let Some(ids) = self.adapter_ids {
            if let Some((token, &id)) = ids.iter().enumerate().find(|(_, &id)| id < -1 || id as i64 >= e as i64) {
                return Err(MoleError::ExpertIdOutOfRange { token, slot: 0, id: id as i64, experts: e });
            }
        }
        Ok(())
    }
}

/// The optional tensors of a layer call in [`LayerInputs`]' field order: each one's name, what
/// in the spec takes it (named in errors) and its shape where the spec takes it.
type OptionalInput = (&'static str, &'static str, Option<Vec<usize>>);

fn optional_inputs(spec: &LayerSpec, tokens: usize) -> [OptionalInput; 7] {
    let (t, r, e) = (tokens, spec.total_rank(), spec.routed_experts());
    let router = spec.router();
    let router_rows = match router {
        Some(Router::X { .. }) => Some(spec.d_in),
        Some(Router::H { .. }) => Some(r),
        _ => None,
    };
    let router_bias = matches!(router, Some(Router::X { bias: true } | Router::H { bias: true }));
    let selection_bias = spec.rule().is_some_and(|r| r.uses_selection_bias());
    [
        ("router_weight", "the x or h router", router_rows.map(|rows| vec![rows, e])),
        ("router_bias", "a router with bias: true", router_bias.then(|| vec![e])),
        ("logits", "the logits router", (router == Some(Router::Logits)).then(|| vec![t, e])),
        ("weights", "given gating", matches!(spec.gating, Gating::Given { .. }).then(|| vec![t, e])),
        ("adapter_ids", "adapter_ids gating", (spec.gating == Gating::AdapterIds).then(|| vec![t])),
        ("selection_bias", "a rule with bias: true", selection_bias.then(|| vec![e])),
        ("cores", "the core_merge mix", matches!(spec.mix, Mix::CoreMerge { .. }).then(|| vec![e, r, r])),
    ]
}

impl LayerSpec {
    /// The tensors a forward over `tokens` tokens reads, named as [`LayerInputs`]' fields, with
    /// their shapes: `x`, `a`, `b`, `y`, then the optional ones the spec takes (in field order).
    /// What [`LayerInputs::validate`] requires, for bindings that state it to their callers.
    pub fn input_shapes(&self, tokens: usize) -> Vec<(&'static str, Vec<usize>)> {
        let (t, r) = (tokens, self.total_rank());
        let mut shapes = vec![
            ("x", vec![t, self.d_in]),
            ("a", vec![self.d_in, r]),
            ("b", vec![r, self.d_out]),
            ("y", vec![t, self.d_out]),
        ];
        shapes.extend(optional_inputs(self, t).into_iter().filter_map(|(name, _, shape)| Some((name, shape?))));
        shapes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Method, MethodShape};

    /// Every preset: the tensors [`LayerSpec::input_shapes`] states pass
    /// [`LayerInputs::validate`]; leaving out any optional one is that tensor missing, one
    /// element short is that tensor's shape, and a tensor the spec does not take is refused.
    #[test]
    fn the_stated_shapes_are_what_validate_accepts() {
        let shape = MethodShape { d_in: 6, d_out: 5, experts: 4, rank: 2, k: 2, alpha: 4.0 };
        let t = 3;
        for method in Method::ALL {
            let spec =
                method.spec(shape).or_else(|_| method.spec(MethodShape { rank: 1, experts: 8, ..shape })).unwrap();
            let shapes = spec.input_shapes(t);
            let data: Vec<(&str, usize)> = shapes.iter().map(|(n, s)| (*n, s.iter().product())).collect();
            let floats = vec![0.5f32; data.iter().map(|d| d.1).max().unwrap() + 1];
            let ids = vec![0i32; t + 1];
            let inputs = |skip: Option<&str>, short: Option<&str>, extra: Option<&str>| {
                let len =
                    |name: &str| data.iter().find(|d| d.0 == name).map(|d| d.1 - usize::from(short == Some(name)));
                let slice = |name: &str| {
                    if skip == Some(name) {
                        return None;
                    }
                    len(name).or((extra == Some(name)).then_some(1)).map(|n| &floats[..n])
                };
                let mut li = LayerInputs::new(
                    t,
                    slice("x").unwrap(),
                    slice("a").unwrap(),
                    slice("b").unwrap(),
                    slice("y").unwrap(),
                );
                (li.router_weight, li.router_bias, li.logits) =
                    (slice("router_weight"), slice("router_bias"), slice("logits"));
                (li.weights, li.selection_bias, li.cores) = (slice("weights"), slice("selection_bias"), slice("cores"));
                li.adapter_ids = slice("adapter_ids").map(|s| &ids[..s.len()]);
                li.validate(&spec)
            };
            let name = method.name();
            assert_eq!(inputs(None, None, None), Ok(()), "{name}");
            for &(tensor, _) in &data[4..] {
                let missing = inputs(Some(tensor), None, None);
                assert!(
                    matches!(missing, Err(MoleError::MissingInput { name, .. }) if name == tensor),
                    "{name} {tensor}: {missing:?}"
                );
                let short = inputs(None, Some(tensor), None);
                assert!(
                    matches!(short, Err(MoleError::ShapeMismatch { what, .. }) if what == tensor),
                    "{name} {tensor}: {short:?}"
                );
            }
            for (tensor, _, _) in optional_inputs(&spec, t) {
                if data.iter().all(|d| d.0 != tensor) {
                    let extra = inputs(None, None, Some(tensor));
                    assert!(
                        matches!(extra, Err(MoleError::UnexpectedInput { name, .. }) if name == tensor),
                        "{name} {tensor}: {extra:?}"
                    );
                }
            }
        }
    }
}
