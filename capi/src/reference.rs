//! The f64 reference on host buffers: what a C program tests its own results (or the GPU's)
//! against, without a GPU. Tensors are f32 (widened to f64 for the computation, the results
//! rounded to f32); adapter ids are int32. Every buffer comes with its element count, checked
//! against the spec and the token count before anything is written.

use crate::layer::spec_arg;
use crate::status::{arg, guard, mole_status, Failure};
use mole_core::model::{LayerInputs, LayerSpec};
use mole_core::MoleError;
use std::ffi::c_char;

/// The host tensors of a reference call (row-major, f32 except `adapter_ids`), each a pointer and
/// its element count. An absent optional tensor is a null pointer with count 0; which ones a
/// spec takes, and their shapes, are those of `MoleLayerPointers`, plus `y`: the base output
/// `[T, d_out]` the delta is added to.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MoleHostInputs {
    /// `x [T, d_in]`.
    pub x: *const f32,
    /// Elements of `x`.
    pub x_len: usize,
    /// `A [d_in, R]`.
    pub a: *const f32,
    /// Elements of `A`.
    pub a_len: usize,
    /// `B [R, d_out]`.
    pub b: *const f32,
    /// Elements of `B`.
    pub b_len: usize,
    /// The base output `y [T, d_out]`.
    pub y: *const f32,
    /// Elements of `y`.
    pub y_len: usize,
    /// `router_weight` (`[d_in, E]` or `[R, E]`).
    pub router_weight: *const f32,
    /// Its elements.
    pub router_weight_len: usize,
    /// `router_bias [E]`.
    pub router_bias: *const f32,
    /// Its elements.
    pub router_bias_len: usize,
    /// `logits [T, E]` (the logits router).
    pub logits: *const f32,
    /// Its elements.
    pub logits_len: usize,
    /// `weights [T, E]` (given gating).
    pub weights: *const f32,
    /// Its elements.
    pub weights_len: usize,
    /// `adapter_ids [T]` (int32; -1: none).
    pub adapter_ids: *const i32,
    /// Its elements.
    pub adapter_ids_len: usize,
    /// `selection_bias [E]`.
    pub selection_bias: *const f32,
    /// Its elements.
    pub selection_bias_len: usize,
    /// `cores [E, R, R]` (CoMoL).
    pub cores: *const f32,
    /// Its elements.
    pub cores_len: usize,
}

/// Where the reference backward writes its gradients (f32), each a pointer and its element count:
/// those the backward computes must be given with their exact size (`x` always; `a`, `b`, the
/// router's unless frozen; `logits` or `weights` where the gating takes them; `cores` for CoMoL
/// unless frozen), the others must be null with count 0.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MoleHostGrads {
    /// `dx [T, d_in]`.
    pub x: *mut f32,
    /// Elements of `dx`.
    pub x_len: usize,
    /// `dA [d_in, R]`.
    pub a: *mut f32,
    /// Its elements.
    pub a_len: usize,
    /// `dB [R, d_out]`.
    pub b: *mut f32,
    /// Its elements.
    pub b_len: usize,
    /// The router weight's gradient.
    pub router_weight: *mut f32,
    /// Its elements.
    pub router_weight_len: usize,
    /// The router bias's gradient.
    pub router_bias: *mut f32,
    /// Its elements.
    pub router_bias_len: usize,
    /// The logits' gradient `[T, E]`.
    pub logits: *mut f32,
    /// Its elements.
    pub logits_len: usize,
    /// The given weights' gradient `[T, E]`.
    pub weights: *mut f32,
    /// Its elements.
    pub weights_len: usize,
    /// The cores' gradient `[E, R, R]`.
    pub cores: *mut f32,
    /// Its elements.
    pub cores_len: usize,
}

/// `len` elements at `ptr` as a slice: `None` for a null pointer with count 0, an error for a
/// null pointer with a count, a misaligned one or a size past `isize::MAX` bytes.
///
/// # Safety
/// A non-null `ptr` points to `len` initialised elements that outlive `'a` and are not written
/// meanwhile.
unsafe fn host<'a, T>(ptr: *const T, len: usize, what: &str) -> Result<Option<&'a [T]>, Failure> {
    if ptr.is_null() {
        return match len {
            0 => Ok(None),
            _ => Err(Failure::new(
                mole_status::MOLE_ERROR_NULL_POINTER,
                format!("`{what}` is null but its count is {len}"),
            )),
        };
    }
    check_span::<T>(ptr as usize, len, what)?;
    // SAFETY: non-null, aligned and within isize::MAX bytes (checked above); the rest is the
    // caller's contract.
    Ok(Some(unsafe { std::slice::from_raw_parts(ptr, len) }))
}

/// A host buffer's address is aligned for `T` and its bytes fit `isize::MAX`.
fn check_span<T>(addr: usize, len: usize, what: &str) -> Result<(), Failure> {
    if !addr.is_multiple_of(std::mem::align_of::<T>()) {
        return Err(Failure::new(
            mole_status::MOLE_ERROR_INVALID_ARGUMENT,
            format!("`{what}` is not aligned to {} bytes", std::mem::align_of::<T>()),
        ));
    }
    if len.checked_mul(std::mem::size_of::<T>()).is_none_or(|b| b > isize::MAX as usize) {
        return Err(MoleError::TooLarge {
            what: what.into(),
            value: len.to_string(),
            limit: "isize::MAX bytes".into(),
        }
        .into());
    }
    Ok(())
}

/// A tensor every layer takes: a null pointer is an error unless its count is 0.
///
/// # Safety
/// As [`host`].
unsafe fn required<'a>(ptr: *const f32, len: usize, what: &str) -> Result<&'a [f32], Failure> {
    // SAFETY: forwarded.
    Ok(unsafe { host(ptr, len, what) }?.unwrap_or(&[]))
}

/// The spec and the borrowed inputs of a reference call.
///
/// # Safety
/// As [`host`] for every tensor of `inputs`; `spec_json` as `c_str`.
unsafe fn parse<'a>(
    spec_json: *const c_char,
    tokens: usize,
    inputs: *const MoleHostInputs,
) -> Result<(LayerSpec, LayerInputs<'a, f32>), Failure> {
    // SAFETY: forwarded from the caller's contract.
    let (spec, i) = unsafe { (spec_arg(spec_json)?, arg(inputs, "inputs")?) };
    // SAFETY: forwarded from the caller's contract.
    let li = unsafe {
        let mut li = LayerInputs::new(
            tokens,
            required(i.x, i.x_len, "x")?,
            required(i.a, i.a_len, "a")?,
            required(i.b, i.b_len, "b")?,
            required(i.y, i.y_len, "y")?,
        );
        li.router_weight = host(i.router_weight, i.router_weight_len, "router_weight")?;
        li.router_bias = host(i.router_bias, i.router_bias_len, "router_bias")?;
        li.logits = host(i.logits, i.logits_len, "logits")?;
        li.weights = host(i.weights, i.weights_len, "weights")?;
        li.adapter_ids = host(i.adapter_ids, i.adapter_ids_len, "adapter_ids")?;
        li.selection_bias = host(i.selection_bias, i.selection_bias_len, "selection_bias")?;
        li.cores = host(i.cores, i.cores_len, "cores")?;
        li
    };
    li.validate(&spec)?;
    Ok((spec, li))
}

/// An output buffer: non-null, aligned, exactly `want` elements.
fn check_out(ptr: *mut f32, len: usize, want: usize, what: &'static str) -> Result<(), Failure> {
    if ptr.is_null() {
        return Err(crate::status::null(what));
    }
    check_span::<f32>(ptr as usize, len, what)?;
    if len != want {
        return Err(MoleError::ShapeMismatch { what, expected: vec![want], got: len }.into());
    }
    Ok(())
}

/// Writes `values` rounded to f32 at `ptr` (checked by [`check_out`] for `values.len()`).
///
/// # Safety
/// `ptr` is valid for `values.len()` f32 writes and overlaps no input.
unsafe fn write_f32(ptr: *mut f32, values: &[f64]) {
    // SAFETY: the caller's contract.
    let out = unsafe { std::slice::from_raw_parts_mut(ptr, values.len()) };
    out.iter_mut().zip(values).for_each(|(o, &v)| *o = v as f32);
}

/// The f64 reference forward of the layer `spec_json` over `tokens` tokens on host f32 tensors:
/// writes `y + delta` (`[T, d_out]`, rounded to f32) to `y_out` (`y_out_len` elements, exactly
/// `T · d_out`) and, when `aux_loss_out` is not null, the weighted auxiliary losses of the spec.
/// Every size is checked before anything is written. No GPU is needed.
///
/// # Safety
/// `spec_json` is null or NUL-terminated; `inputs` is null or a live struct whose every non-null
/// pointer holds its count of elements; `y_out` is null or valid for `y_out_len` writes and
/// overlaps no input; `aux_loss_out` is null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn mole_reference_forward(
    spec_json: *const c_char,
    tokens: usize,
    inputs: *const MoleHostInputs,
    y_out: *mut f32,
    y_out_len: usize,
    aux_loss_out: *mut f64,
) -> mole_status {
    guard(|| {
        // SAFETY: forwarded from the caller's contract.
        let (spec, li) = unsafe { parse(spec_json, tokens, inputs) }?;
        check_out(y_out, y_out_len, tokens * spec.d_out, "y_out")?;
        let out = mole_core::reference::forward(&spec, &li)?;
        // SAFETY: checked for its size above; no overlap by the caller's contract.
        unsafe { write_f32(y_out, &out.y) };
        if !aux_loss_out.is_null() {
            // SAFETY: non-null, valid for a write by the caller's contract.
            unsafe { aux_loss_out.write(out.aux_loss) };
        }
        Ok(())
    })
}

/// The f64 reference backward of the layer `spec_json` over `tokens` tokens: the gradients of
/// `L = Σ dy · y + aux_loss` (`dy [T, d_out]`, `dy_len` elements) with the routing selection held
/// constant, as the GPU backward computes them, written (rounded to f32) where `grads` says (see
/// `MoleHostGrads`). Every size and the presence of each gradient are checked before anything is
/// written. No GPU is needed.
///
/// # Safety
/// As `mole_reference_forward`; `dy` is null or holds `dy_len` elements; `grads` is null or a
/// live struct whose every non-null pointer is valid for its count of writes and overlaps no
/// input and no other gradient.
#[no_mangle]
pub unsafe extern "C" fn mole_reference_backward(
    spec_json: *const c_char,
    tokens: usize,
    inputs: *const MoleHostInputs,
    dy: *const f32,
    dy_len: usize,
    grads: *const MoleHostGrads,
) -> mole_status {
    guard(|| {
        // SAFETY: forwarded from the caller's contract.
        let (spec, li) = unsafe { parse(spec_json, tokens, inputs) }?;
        // SAFETY: forwarded from the caller's contract.
        let (dy, g) = unsafe { (required(dy, dy_len, "dy")?, arg(grads, "grads")?) };
        let out = mole_core::reference::backward(&spec, &li, dy)?;
        let slots: [(&'static str, *mut f32, usize, Option<&Vec<f64>>); 8] = [
            ("grads.x", g.x, g.x_len, Some(&out.x)),
            ("grads.a", g.a, g.a_len, out.a.as_ref()),
            ("grads.b", g.b, g.b_len, out.b.as_ref()),
            ("grads.router_weight", g.router_weight, g.router_weight_len, out.router_weight.as_ref()),
            ("grads.router_bias", g.router_bias, g.router_bias_len, out.router_bias.as_ref()),
            ("grads.logits", g.logits, g.logits_len, out.logits.as_ref()),
            ("grads.weights", g.weights, g.weights_len, out.weights.as_ref()),
            ("grads.cores", g.cores, g.cores_len, out.cores.as_ref()),
        ];
        for &(what, ptr, len, values) in &slots {
            match values {
                Some(v) => check_out(ptr, len, v.len(), what)?,
                None if ptr.is_null() && len == 0 => {}
                None => {
                    return Err(MoleError::UnexpectedInput {
                        name: what,
                        reason: "this layer's backward does not compute it (a frozen parameter, or one the spec lacks): pass null and 0",
                    }
                    .into())
                }
            }
        }
        for (_, ptr, _, values) in slots {
            if let Some(v) = values {
                // SAFETY: checked for its size above; no overlap by the caller's contract.
                unsafe { write_f32(ptr, v) };
            }
        }
        Ok(())
    })
}
