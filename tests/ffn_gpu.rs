//! The FFN-expert block's runtime (`mole::runtime::CompiledFfn`) on the GPU, on raw pointers as a
//! framework calls it: the cuBLAS forward against the f64 reference (both block presets, SiLU and
//! GELU, f32 and bf16, several token counts, `y` and the workspace poisoned with NaN bytes first),
//! the caller-GEMM path (`activation_raw`, the caller's own products, `down_delta_raw`) bit for
//! bit against the cuBLAS forward, reruns bit for bit, and bad calls refused with typed errors
//! before anything is launched. Needs a GPU (and cuBLAS): without one each test prints a note and
//! returns.
//!
//! Tolerance (largest `|got - want| / (1 + |want|)`): `tolerance(dtype, d + f + r)·(2·slots + 2)`,
//! f32 sums over the chained reductions (`d` for `G`, `U` and the gate/up shrinks, `f` for the
//! down projection and its shrink, `r` for the expands) and the roundings of an element of `y` to
//! the dtype: `G` and `U`, `a_mix` after every slot pass, `y` after the base product and after
//! every down pass. A token may be left out (at most `ceil(T/512)`) only where the reference's
//! own routing is a near-tie: f32 router scores on the device may route it the other way.

mod gpu;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr};
use mole::cuda::{Blas, Device, DeviceMatrix, Gemm};
use mole::model::{Activation, FfnMethod, FfnShape, FfnSpec};
use mole::reference::{self, ffn_forward, FfnOutput};
use mole::runtime::{CompiledFfn, FfnPointers};
use mole::synth::SyntheticFfn;
use mole::{KernelElement, MoleError};
use std::sync::Arc;

/// Odd multiples of 8: no tile of the kernels or of cuBLAS divides them evenly.
fn spec(method: FfnMethod, activation: Activation) -> FfnSpec {
    method.spec(FfnShape { d: 264, f: 712, experts: 8, rank: 16, k: 2, alpha: 32.0, activation }).unwrap()
}

fn token_counts() -> Vec<usize> {
    if gpu::quick() {
        vec![1, 7]
    } else {
        vec![1, 7, 300]
    }
}

/// A block's tensors on the device: the inputs, `y` and the workspace poisoned with NaN bytes.
struct OnDevice<T: DeviceRepr> {
    _inputs: Vec<CudaSlice<T>>,
    y: CudaSlice<T>,
    workspace: CudaSlice<u8>,
    ptrs: FfnPointers,
}

impl<T: KernelElement + DeviceRepr> OnDevice<T> {
    /// `data` uploaded, with a workspace of `workspace_bytes` (+256 spare, so a shifted start
    /// still has the bytes).
    fn new(stream: &Arc<CudaStream>, data: &SyntheticFfn<T>, workspace_bytes: usize) -> Self {
        let put = |v: &[T]| stream.clone_htod(v).unwrap();
        let ptr = |s: &CudaSlice<T>| s.device_ptr(stream).0;
        let mut inputs = vec![put(&data.x), put(data.router_weight.as_deref().expect("the block presets route on x"))];
        let base: Vec<CudaSlice<T>> = data.base.iter().map(|w| put(w)).collect();
        let mut banks = [(0, 0); 3];
        for (i, bank) in data.banks.iter().enumerate() {
            let (a, b) = bank.as_ref().expect("every projection of the presets is adapted");
            let (a, b) = (put(a), put(b));
            banks[i] = (ptr(&a), ptr(&b));
            inputs.extend([a, b]);
        }
        let mut y = put(&vec![T::from_f64(f64::NAN); data.x.len()]);
        let mut workspace = stream.clone_htod(&vec![0xffu8; workspace_bytes + 256]).unwrap();
        let ptrs = FfnPointers {
            x: ptr(&inputs[0]),
            gating: [ptr(&inputs[1]), 0, 0, 0, 0],
            base: [ptr(&base[0]), ptr(&base[1]), ptr(&base[2])],
            banks,
            y: y.device_ptr_mut(stream).0,
            workspace: workspace.device_ptr_mut(stream).0,
            workspace_bytes,
        };
        inputs.extend(base);
        OnDevice { _inputs: inputs, y, workspace, ptrs }
    }

    fn poison_y(&mut self, stream: &Arc<CudaStream>) {
        stream.memcpy_htod(&vec![T::from_f64(f64::NAN); self.y.len()], &mut self.y).unwrap();
    }

    fn y(&self, stream: &Arc<CudaStream>) -> Vec<T> {
        stream.clone_dtoh(&self.y).unwrap()
    }
}

/// Bit patterns, so NaN compares equal to the same NaN.
fn bits<T: KernelElement>(v: &[T]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

/// Whether the reference's routing of token `t` is within `eps` of choosing differently: two
/// probabilities that close, or (top-p) a cumulative sum that close to `p`.
fn near_tie(want: &FfnOutput, t: usize, top_p: Option<f64>) -> bool {
    let e = want.routing.experts;
    let probs = want.routing.probs.as_ref().expect("softmax rules keep their probabilities");
    let mut row = probs[t * e..(t + 1) * e].to_vec();
    row.sort_by(|a, b| b.total_cmp(a));
    let eps = 1e-4;
    let tied = row.windows(2).any(|w| w[0] - w[1] < eps);
    let crossing = top_p.is_some_and(|p| row.iter().scan(0.0, |c, v| Some(*c + v)).any(|c: f64| (c - p).abs() < eps));
    tied || crossing
}

/// `got` against the reference within the tolerance (module documentation), every element finite.
fn assert_matches<T: KernelElement>(spec: &FfnSpec, got: &[T], want: &FfnOutput, what: &str) {
    let d = spec.d;
    let rank = spec.projections().iter().filter_map(|(_, l)| *l).map(|l| l.ranks.max_rank()).max().unwrap();
    let tol = reference::tolerance(T::DTYPE, spec.d + spec.f + rank) * (2.0 * spec.slots() as f64 + 2.0);
    let top_p = (spec.slots() == spec.experts).then_some(0.8);
    let tokens = want.routing.tokens;
    let mut left_out = 0;
    for (t, (g, w)) in got.chunks(d).zip(want.y.chunks(d)).enumerate() {
        let g: Vec<f64> = g.iter().map(|v| v.to_f64()).collect();
        assert!(g.iter().all(|v| v.is_finite()), "{what}: token {t} has a non-finite output");
        let err = reference::max_scaled_error(&g, w);
        if err > tol {
            assert!(near_tie(want, t, top_p), "{what}: token {t}: error {err:.3e} > {tol:.3e}");
            left_out += 1;
        }
    }
    assert!(left_out <= tokens.div_ceil(512), "{what}: {left_out} near-tie tokens differ");
    assert!(want.y.iter().any(|v| v.abs() > 1e-2), "{what}: the reference is all but zero");
}

fn forward_matches<T: KernelElement + DeviceRepr>(device: &Device, spec: &FfnSpec, seed: u64) {
    let stream = device.stream();
    let ffn = CompiledFfn::new(device, spec, T::DTYPE).unwrap();
    for tokens in token_counts() {
        let data = SyntheticFfn::<T>::new(spec, tokens, seed + tokens as u64);
        let want = ffn_forward(spec, &data.inputs(data.tokens)).unwrap();
        let mut u = OnDevice::new(stream, &data, ffn.workspace_bytes(tokens).unwrap());
        // SAFETY: every pointer is a live allocation of the device's context holding its tensor;
        // the workspace has the bytes the plan needs; all on the device's stream.
        unsafe { ffn.forward_raw(stream.cu_stream(), tokens, u.ptrs) }.unwrap();
        let what = format!("{} {} {} T={tokens}", spec.slots(), spec.activation, T::DTYPE);
        assert_matches(spec, &u.y(stream), &want, &what);
        u.poison_y(stream);
    }
}

#[test]
#[ignore = "needs a GPU: run by the GPU kit (scripts/gpu)"]
fn the_cublas_forward_matches_the_reference() {
    let Some(device) = gpu::device_or_skip("the FFN block GPU tests") else { return };
    for (method, activation) in [
        (FfnMethod::MixLora, Activation::Silu),
        (FfnMethod::MixLora, Activation::Gelu),
        (FfnMethod::MixLoraDynamic, Activation::Silu),
        (FfnMethod::MixLoraDynamic, Activation::Gelu),
    ] {
        let spec = spec(method, activation);
        forward_matches::<f32>(&device, &spec, 1);
        forward_matches::<half::bf16>(&device, &spec, 2);
    }
}

/// `y` of the caller-GEMM path: `G`, `U` by the caller into the stage buffers, the first half,
/// `y = a_mix·W_down` by the caller, the second half.
fn caller_gemm<T: KernelElement + DeviceRepr>(
    device: &Device,
    blas: &Blas,
    ffn: &CompiledFfn,
    tokens: usize,
    u: &OnDevice<T>,
) {
    let stream = device.stream().cu_stream();
    let spec = ffn.planner().spec();
    let (d, f, p) = (spec.d, spec.f, &u.ptrs);
    let stage = ffn.stage_buffers(tokens, p.workspace).unwrap();
    let m = |ptr: u64, rows: usize, cols: usize| DeviceMatrix { ptr, len: rows * cols, ld: cols };
    let up_proj = Gemm { dtype: T::DTYPE, m: tokens, n: f, k: d, alpha: 1.0, beta: 0.0 };
    let down_proj = Gemm { dtype: T::DTYPE, m: tokens, n: d, k: f, alpha: 1.0, beta: 0.0 };
    // The caller's own pointers carry no base weights: this path never reads them.
    let ptrs = FfnPointers { base: [0; 3], ..*p };
    // SAFETY: as in `forward_matches`; the stage buffers are workspace regions of T·f elements,
    // all on one stream in order.
    unsafe {
        blas.gemm(stream, &up_proj, m(p.x, tokens, d), m(p.base[0], d, f), m(stage.gate_out, tokens, f)).unwrap();
        blas.gemm(stream, &up_proj, m(p.x, tokens, d), m(p.base[1], d, f), m(stage.up_out, tokens, f)).unwrap();
        ffn.activation_raw(stream, tokens, ptrs).unwrap();
        blas.gemm(stream, &down_proj, m(stage.a_mix, tokens, f), m(p.base[2], f, d), m(p.y, tokens, d)).unwrap();
        ffn.down_delta_raw(stream, tokens, ptrs).unwrap();
    }
}

fn caller_gemm_is_bitwise_the_forward<T: KernelElement + DeviceRepr>(device: &Device, blas: &Blas, spec: &FfnSpec) {
    let stream = device.stream();
    let ffn = CompiledFfn::new(device, spec, T::DTYPE).unwrap();
    for tokens in token_counts() {
        let data = SyntheticFfn::<T>::new(spec, tokens, 40 + tokens as u64);
        let mut u = OnDevice::new(stream, &data, ffn.workspace_bytes(tokens).unwrap());
        // SAFETY: as in `forward_matches`.
        unsafe { ffn.forward_raw(stream.cu_stream(), tokens, u.ptrs) }.unwrap();
        let forward = u.y(stream);
        u.poison_y(stream);
        stream.memcpy_htod(&vec![0xffu8; u.workspace.len()], &mut u.workspace).unwrap();
        caller_gemm(device, blas, &ffn, tokens, &u);
        let what = format!("{} {} T={tokens}", spec.activation, T::DTYPE);
        assert_eq!(bits(&u.y(stream)), bits(&forward), "{what}: the caller-GEMM path differs");
        let want = ffn_forward(spec, &data.inputs(data.tokens)).unwrap();
        assert_matches(spec, &forward, &want, &what);
    }
}

#[test]
#[ignore = "needs a GPU: run by the GPU kit (scripts/gpu)"]
fn the_caller_gemm_path_gives_the_forward_bit_for_bit() {
    let Some(device) = gpu::device_or_skip("the FFN block GPU tests") else { return };
    let blas = Blas::new(&device).unwrap();
    for (method, activation) in [(FfnMethod::MixLora, Activation::Silu), (FfnMethod::MixLoraDynamic, Activation::Gelu)]
    {
        let spec = spec(method, activation);
        caller_gemm_is_bitwise_the_forward::<f32>(&device, &blas, &spec);
        caller_gemm_is_bitwise_the_forward::<half::bf16>(&device, &blas, &spec);
    }
}

#[test]
#[ignore = "needs a GPU: run by the GPU kit (scripts/gpu)"]
fn reruns_are_bit_identical() {
    let Some(device) = gpu::device_or_skip("the FFN block GPU tests") else { return };
    let stream = device.stream();
    let tokens = if gpu::quick() { 7 } else { 300 };
    for method in [FfnMethod::MixLora, FfnMethod::MixLoraDynamic] {
        let spec = spec(method, Activation::Silu);
        let ffn = CompiledFfn::new(&device, &spec, mole::DType::BF16).unwrap();
        let data = SyntheticFfn::<half::bf16>::new(&spec, tokens, 77);
        let mut u = OnDevice::new(stream, &data, ffn.workspace_bytes(tokens).unwrap());
        let mut first = None;
        for run in 0..5 {
            u.poison_y(stream);
            // SAFETY: as in `forward_matches`.
            unsafe { ffn.forward_raw(stream.cu_stream(), tokens, u.ptrs) }.unwrap();
            let y = bits(&u.y(stream));
            match &first {
                None => first = Some(y),
                Some(f) => assert_eq!(&y, f, "{method}: run {run} differs from the first"),
            }
        }
        let want = ffn_forward(&spec, &data.inputs(data.tokens)).unwrap();
        assert_matches(&spec, &u.y(stream), &want, &format!("{method} reruns"));
    }
}

#[test]
#[ignore = "needs a GPU: run by the GPU kit (scripts/gpu)"]
fn bad_calls_are_typed_errors_before_any_launch() {
    let Some(device) = gpu::device_or_skip("the FFN block GPU tests") else { return };
    let stream = device.stream();
    let spec = spec(FfnMethod::MixLora, Activation::Silu);
    let ffn = CompiledFfn::new(&device, &spec, mole::DType::BF16).unwrap();
    let tokens = 7;
    let bytes = ffn.workspace_bytes(tokens).unwrap();
    let data = SyntheticFfn::<half::bf16>::new(&spec, tokens, 5);
    let u = OnDevice::new(stream, &data, bytes);
    let s = stream.cu_stream();
    let short = FfnPointers { workspace_bytes: bytes - 1, ..u.ptrs };
    let shifted = FfnPointers { workspace: u.ptrs.workspace + 4, ..u.ptrs };
    let no_base = FfnPointers { base: [u.ptrs.base[0], 0, u.ptrs.base[2]], ..u.ptrs };
    // Inputs only the last stages read: refused before the first product runs too.
    let no_y = FfnPointers { y: 0, ..u.ptrs };
    let no_down_b = FfnPointers { banks: [u.ptrs.banks[0], u.ptrs.banks[1], (u.ptrs.banks[2].0, 0)], ..u.ptrs };
    let odd_down = FfnPointers { base: [u.ptrs.base[0], u.ptrs.base[1], u.ptrs.base[2] + 1], ..u.ptrs };
    // SAFETY: the pointers are live allocations (the shifted workspace still has `bytes` bytes
    // after its start); every call below is refused before it launches anything.
    unsafe {
        let err = ffn.forward_raw(s, tokens, short).unwrap_err();
        assert!(matches!(err, MoleError::ShapeMismatch { what: "workspace", .. }), "{err}");
        let err = ffn.activation_raw(s, tokens, short).unwrap_err();
        assert!(matches!(err, MoleError::ShapeMismatch { what: "workspace", .. }), "{err}");
        let err = ffn.forward_raw(s, tokens, shifted).unwrap_err();
        assert!(matches!(err, MoleError::InvalidParameter { name: "workspace", .. }), "{err}");
        let err = ffn.down_delta_raw(s, tokens, shifted).unwrap_err();
        assert!(matches!(err, MoleError::InvalidParameter { name: "workspace", .. }), "{err}");
        let err = ffn.forward_raw(s, 0, u.ptrs).unwrap_err();
        assert_eq!(err, MoleError::ZeroDimension { name: "tokens" });
        let err = ffn.forward_raw(s, tokens, no_base).unwrap_err();
        assert!(matches!(err, MoleError::MissingInput { name: "base_up", .. }), "{err}");
        let err = ffn.forward_raw(s, tokens, no_y).unwrap_err();
        assert!(matches!(err, MoleError::MissingInput { name: "y", .. }), "{err}");
        let err = ffn.forward_raw(s, tokens, no_down_b).unwrap_err();
        assert!(matches!(err, MoleError::MissingInput { name: "down_b", .. }), "{err}");
        let err = ffn.forward_raw(s, tokens, odd_down).unwrap_err();
        assert!(matches!(err, MoleError::InvalidOperand { .. }), "{err}");
    }
    // Nothing ran: y and the workspace hold their poison bytes.
    stream.synchronize().unwrap();
    assert!(u.y(stream).iter().all(|v| v.to_bits() == half::bf16::from_f64(f64::NAN).to_bits()), "y was written");
    let ws = stream.clone_dtoh(&u.workspace).unwrap();
    assert!(ws.iter().all(|&b| b == 0xff), "the workspace was written");
}
