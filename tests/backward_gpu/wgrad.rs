//! (A module of `tests/backward_gpu.rs`: one GPU test binary for the backward, so the GPU kit's
//! pack stays under the device tool's limit.) The weight-gradient kernels (`kernels/wgrad.cu`) on the GPU, through the launch path
//! ([`CudaBackend`]): `out[b, m, n] = scale · Σ_t rw[t, b] · P[t, m] · Q[t, n]` at the backward's
//! shapes (`dA = xᵀ·dh` with a sparse `dh`, `dB = scale · hmᵀ·dy`, the bias's column sums,
//! CoMoL's cores through row weights, a router weight read from a column block) against the f64
//! sum, with `tolerance(dtype, T + splits + 3) · Σ_t |scale · rw · P · Q|` as in
//! `tests/hostexec_wgrad.rs`; every dtype and tiling; the output and the partials poisoned with
//! NaN; and a second run, poisoned again, bit-identical to the first.

use super::gpu;
use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
use mole::cuda::Device;
use mole::kernels::exec::{Buf, CudaBackend, LoadedBuild, TypedBindings};
use mole::kernels::wgrad::{self, WgradOperand, WgradRowWeight, WgradShape};
use mole::kernels::KernelBuild;
use mole::reference::tolerance;
use mole::synth::Rng;
use mole::KernelElement;
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Ones,
    Data,
    Float,
}

/// One call: `P` and `Q` as `(kind, stride, col)`, the row weights as `(stride, col, count)`.
#[derive(Clone, Copy, Debug)]
struct Case {
    name: &'static str,
    tokens: usize,
    m: usize,
    n: usize,
    splits: usize,
    p: (Kind, usize, usize),
    q: (Kind, usize, usize),
    rw: Option<(usize, usize, usize)>,
    scale: f32,
    /// Every other token's `Q` row zero (a sparse top-k's `dh`).
    sparse: bool,
}

fn cases() -> Vec<Case> {
    let t = if gpu::quick() { 97 } else { 1000 };
    let d = if gpu::quick() { 160 } else { 1024 };
    let plain = |kind, cols: usize| (kind, cols, 0);
    vec![
        Case {
            name: "dA = x^T dh",
            tokens: t,
            m: d,
            n: 64,
            splits: 4,
            p: plain(Kind::Data, d),
            q: plain(Kind::Float, 64),
            rw: None,
            scale: 1.0,
            sparse: true,
        },
        Case {
            name: "dB = scale hm^T dy",
            tokens: t,
            m: 64,
            n: d,
            splits: 5,
            p: plain(Kind::Float, 64),
            q: plain(Kind::Data, d),
            rw: None,
            scale: 2.0,
            sparse: false,
        },
        Case {
            name: "db = sum dz",
            tokens: t - 3,
            m: 1,
            n: 8,
            splits: 3,
            p: (Kind::Ones, 0, 0),
            q: plain(Kind::Float, 8),
            rw: None,
            scale: 1.0,
            sparse: false,
        },
        Case {
            name: "dC_c = sum w_c h^T g",
            tokens: t / 3,
            m: 16,
            n: 16,
            splits: 2,
            p: plain(Kind::Float, 16),
            q: plain(Kind::Float, 16),
            rw: Some((6, 1, 4)),
            scale: 1.0,
            sparse: false,
        },
        Case {
            name: "dW_r from column blocks",
            tokens: t / 2 + 1,
            m: 61,
            n: 7,
            splits: 9,
            p: (Kind::Float, 70, 3),
            q: (Kind::Float, 9, 1),
            rw: None,
            scale: -0.5,
            sparse: false,
        },
    ]
}

/// A case's operands as stored on the host (each empty where the case does not take it).
struct Host<'a, T> {
    p_data: &'a [T],
    p_float: &'a [f32],
    q_data: &'a [T],
    q_float: &'a [f32],
    rw: &'a [f32],
}

fn upload<T: DeviceRepr>(stream: &Arc<CudaStream>, v: &[T]) -> CudaSlice<T> {
    stream.clone_htod(v).expect("upload")
}

/// One run of `c` on `build`, from NaN-poisoned output and partials; the output in f64.
fn run<T: KernelElement + DeviceRepr>(dev: &Device, build: &KernelBuild, c: &Case, host: &Host<'_, T>) -> Vec<f64> {
    let Host { p_data, p_float, q_data, q_float, rw } = *host;
    let plan = wgrad::plan(build, shape_of(c)).unwrap_or_else(|e| panic!("{}: {e}", c.name));
    let stream = dev.stream();
    let bufs = (
        (c.p.0 == Kind::Data).then(|| upload(stream, p_data)),
        (c.p.0 == Kind::Float).then(|| upload(stream, p_float)),
        (c.q.0 == Kind::Data).then(|| upload(stream, q_data)),
        (c.q.0 == Kind::Float).then(|| upload(stream, q_float)),
        c.rw.map(|_| upload(stream, rw)),
    );
    let mut partials = upload(stream, &vec![f32::NAN; plan.partials_len()]);
    let mut out = upload(stream, &vec![T::from_f64(f64::NAN); plan.out_len()]);
    let loaded = LoadedBuild::load(dev, build, &wgrad::kernel::ALL).expect("load");
    {
        let mut b = TypedBindings::new(stream, build.dtype);
        b.input_opt(Buf::WgradP, bufs.0.as_ref())
            .input_opt(Buf::WgradPFloat, bufs.1.as_ref())
            .input_opt(Buf::WgradQ, bufs.2.as_ref())
            .input_opt(Buf::WgradQFloat, bufs.3.as_ref())
            .input_opt(Buf::WgradRowWeight, bufs.4.as_ref())
            .output(Buf::WgradPartials, &mut partials)
            .output(Buf::WgradOut, &mut out);
        dev.bind().expect("bind");
        let builds = [&loaded];
        let mut backend = CudaBackend::new(&builds, stream.cu_stream());
        // SAFETY: every bound address is a live slice of the device's context with its length
        // bound (checked against the plan by `run`); the outputs are distinct allocations.
        unsafe { wgrad::run(build, &plan, b.bindings().expect("bindings"), &mut backend) }
            .unwrap_or_else(|e| panic!("{}: {e}", c.name));
    }
    stream.synchronize().expect("synchronize");
    stream.clone_dtoh(&out).expect("download").iter().map(|v| v.to_f64()).collect()
}

fn check_dtype<T: KernelElement + DeviceRepr>(dev: &Device) {
    let builds: Vec<KernelBuild> = wgrad::candidates().into_iter().filter(|b| b.dtype == T::DTYPE).collect();
    for (ci, c) in cases().iter().enumerate() {
        let mut rng = Rng::new(100 + ci as u64);
        let matrix = |rng: &mut Rng, (kind, stride, _): (Kind, usize, usize)| -> Vec<f64> {
            if kind == Kind::Ones {
                return Vec::new();
            }
            (0..c.tokens * stride).map(|_| rng.range(-1.0, 1.0)).collect()
        };
        let mut p = matrix(&mut rng, c.p);
        let mut q = matrix(&mut rng, c.q);
        if c.sparse {
            q.chunks_mut(c.q.1).step_by(2).for_each(|row| row.fill(0.0));
        }
        let mut rw: Vec<f64> =
            c.rw.map_or(Vec::new(), |(s, _, _)| (0..c.tokens * s).map(|_| rng.range(0.0, 1.0)).collect());
        // As stored: P and Q in their kind, the row weights in f32.
        let store = |v: &mut Vec<f64>, kind: Kind| -> (Vec<T>, Vec<f32>) {
            if kind == Kind::Data {
                let d: Vec<T> = v.iter().map(|&x| T::from_f64(x)).collect();
                v.iter_mut().zip(&d).for_each(|(x, d)| *x = d.to_f64());
                (d, Vec::new())
            } else {
                let f: Vec<f32> = v.iter().map(|&x| x as f32).collect();
                v.iter_mut().zip(&f).for_each(|(x, f)| *x = *f as f64);
                (Vec::new(), f)
            }
        };
        let (p_data, p_float) = store(&mut p, c.p.0);
        let (q_data, q_float) = store(&mut q, c.q.0);
        let (_, rw_float) = store(&mut rw, Kind::Float);
        let outputs = c.rw.map_or(1, |(_, _, count)| count);
        let (mut want, mut abs) = (vec![0.0f64; outputs * c.m * c.n], vec![0.0f64; outputs * c.m * c.n]);
        for t in 0..c.tokens {
            for b in 0..outputs {
                let w = c.rw.map_or(1.0, |(s, col, _)| rw[t * s + col + b]);
                for i in 0..c.m {
                    let pv = if c.p.0 == Kind::Ones { 1.0 } else { p[t * c.p.1 + c.p.2 + i] };
                    for j in 0..c.n {
                        let term = c.scale as f64 * w * pv * q[t * c.q.1 + c.q.2 + j];
                        want[(b * c.m + i) * c.n + j] += term;
                        abs[(b * c.m + i) * c.n + j] += term.abs();
                    }
                }
            }
        }
        let host = Host { p_data: &p_data, p_float: &p_float, q_data: &q_data, q_float: &q_float, rw: &rw_float };
        for build in &builds {
            let got = run::<T>(dev, build, c, &host);
            let splits = wgrad::plan(build, shape_of(c)).unwrap().splits();
            let tol = tolerance(T::DTYPE, c.tokens + splits + 3);
            for (k, ((g, w), a)) in got.iter().zip(&want).zip(&abs).enumerate() {
                let lim = tol * a + f64::powi(2.0, -25);
                assert!(
                    (g - w).abs() <= lim,
                    "{} on {build}: out[{k}] = {g}, want {w} (|err| {:.3e} > {lim:.3e})",
                    c.name,
                    (g - w).abs()
                );
            }
            let again = run::<T>(dev, build, c, &host);
            let same = got.iter().zip(&again).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{} on {build}: a rerun with the same splits differs", c.name);
        }
    }
}

/// The shape of `c` (for its plan's split count).
fn shape_of(c: &Case) -> WgradShape {
    let operand = |(kind, stride, col): (Kind, usize, usize)| match kind {
        Kind::Ones => WgradOperand::Ones,
        Kind::Data => WgradOperand::Data { stride, col },
        Kind::Float => WgradOperand::Float { stride, col },
    };
    WgradShape {
        tokens: c.tokens,
        m: c.m,
        n: c.n,
        splits: c.splits,
        p: operand(c.p),
        q: operand(c.q),
        row_weight: c.rw.map(|(stride, col, count)| WgradRowWeight { stride, col, count }),
        scale: c.scale,
    }
}

#[test]
#[ignore = "needs a GPU: run by the GPU kit (scripts/gpu)"]
fn wgrad_matches_the_f64_sum_and_reruns_bit_for_bit() {
    let Some(dev) = gpu::device_or_skip("wgrad_matches_the_f64_sum_and_reruns_bit_for_bit") else { return };
    check_dtype::<f32>(&dev);
    check_dtype::<half::f16>(&dev);
    check_dtype::<half::bf16>(&dev);
}
