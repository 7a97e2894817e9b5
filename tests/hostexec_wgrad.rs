//! The weight-gradient kernels (`kernels/wgrad.cu`) through the host execution layer against an
//! f64 computation of `out[b, m, n] = scale · Σ_t rw[t, b] · P[t, m] · Q[t, n]`: odd `M`, `N`
//! and `T` (0, 1, 31, 33, 257, ...), 1 to 300 token splits, `P` ones, in the dtype or f32, `Q` in
//! the dtype or f32, with and without row weights (one output per weight column), column blocks
//! at offsets inside wider matrices, rows of `Q` that are zero (a sparse top-k's `dh`), every
//! dtype, random thread schedules, and the output and the partials workspace poisoned. Then the
//! layer's weight gradients as the backward computes them with these kernels (MixLoRA per linear
//! and CoMoL, each router with a bias) against [`mole::reference::backward`].
//!
//! Tolerance, per element: `tolerance(dtype, T + splits + 3) · Σ_t |scale · rw · P · Q|` plus half
//! the dtype's smallest subnormal spacing. A product's longest chain of f32 roundings is the row
//! weight's multiply, the product, at most `T` additions within its split, `splits` additions in
//! the reduction and the scale; the output is rounded to the dtype once (the `u_dtype` part of
//! [`tolerance`]); the subnormal term covers that rounding's absolute error near zero (f16).

use half::{bf16, f16};
use mole::kernels::exec::{Bindings, Buf};
use mole::kernels::wgrad::{self, WgradConfig, WgradOperand, WgradRowWeight, WgradShape};
use mole::reference::tolerance;
use mole::synth::Rng;
use mole::{DType, Scalar};
use mole_hostexec::{Buffer, Schedule};

mod host;
use host::HostBackend;
use proptest::prelude::*;

/// How an operand is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// `P = 1`.
    Ones,
    /// The dtype.
    Data,
    /// f32.
    Float,
}

/// A block of `count` columns at `col` of a `[T, col + count + after]` matrix.
#[derive(Clone, Copy, Debug)]
struct Cols {
    col: usize,
    after: usize,
}

#[derive(Clone, Debug)]
struct Case {
    tokens: usize,
    m: usize,
    n: usize,
    splits: usize,
    p: Kind,
    q: Kind,
    p_cols: Cols,
    q_cols: Cols,
    /// Row weights: their columns and the number of outputs.
    rw: Option<(Cols, usize)>,
    scale: f32,
    /// About half the rows of `Q` are zero.
    sparse: bool,
    dtype: DType,
    seed: u64,
    schedule: Schedule,
    /// Blocks in flight at once (`None`: the schedule's default).
    resident: Option<u32>,
}

fn dim() -> impl Strategy<Value = usize> {
    prop_oneof![Just(1usize), Just(31), Just(33), Just(65), 1usize..80]
}

fn cols() -> impl Strategy<Value = Cols> {
    (0usize..3, 0usize..3).prop_map(|(col, after)| Cols { col, after })
}

fn case_strategy() -> impl Strategy<Value = Case> {
    let tokens = prop_oneof![Just(0usize), Just(1), Just(31), Just(33), Just(257), 0usize..300];
    let splits = prop_oneof![1usize..=4, 5usize..=40, Just(300)];
    let rw = prop::option::of((cols(), 1usize..=3));
    (tokens, dim(), dim(), splits, 0usize..3, 0usize..2, (cols(), cols(), rw), 0usize..3, any::<u64>(), 0u8..4)
        .prop_map(|(tokens, m, n, splits, p, q, (p_cols, q_cols, rw), dt, seed, sch)| {
            let p = [Kind::Ones, Kind::Data, Kind::Float][p];
            Case {
                tokens,
                m: if p == Kind::Ones { 1 } else { m },
                n,
                splits,
                p,
                q: [Kind::Data, Kind::Float][q],
                p_cols,
                q_cols,
                rw,
                scale: [1.0, 0.5, -1.25, 3.0][(seed % 4) as usize],
                sparse: seed & 16 != 0,
                dtype: DType::ALL[dt],
                seed,
                schedule: match sch {
                    0 => Schedule::Forward,
                    1 => Schedule::Reverse,
                    _ => Schedule::Seeded(seed),
                },
                resident: None,
            }
        })
}

/// What fills the columns a call must not read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outside {
    /// Random values like the rest.
    Random,
    /// NaN and infinities.
    NonFinite,
}

/// One operand's matrix `[T, stride]` as stored (in the dtype or f32) and as read back in f64.
struct Matrix<T> {
    data: Vec<T>,
    float: Vec<f32>,
    values: Vec<f64>,
    stride: usize,
}

fn matrix<T: Scalar>(rng: &mut Rng, kind: Kind, tokens: usize, count: usize, c: Cols, outside: Outside) -> Matrix<T> {
    let stride = c.col + count + c.after;
    let mut raw = vec![0.0f64; tokens * stride];
    for (i, v) in raw.iter_mut().enumerate() {
        let inside = (c.col..c.col + count).contains(&(i % stride));
        let r = rng.range(-1.0, 1.0);
        *v = match (inside, outside) {
            (true, _) | (false, Outside::Random) => r,
            (false, Outside::NonFinite) => [f64::NAN, f64::INFINITY, f64::NEG_INFINITY][i % 3],
        };
    }
    let (data, float, values) = match kind {
        Kind::Data => {
            let d: Vec<T> = raw.iter().map(|&v| T::from_f64(v)).collect();
            let back = d.iter().map(|v| v.to_f64()).collect();
            (d, Vec::new(), back)
        }
        _ => {
            let f: Vec<f32> = raw.iter().map(|&v| v as f32).collect();
            let back = f.iter().map(|&v| v as f64).collect();
            (Vec::new(), f, back)
        }
    };
    Matrix { data, float, values, stride }
}

fn buffer<T: bytemuck::Pod>(name: &str, v: &[T]) -> Buffer<T> {
    if v.is_empty() {
        Buffer::poisoned(name, 1)
    } else {
        Buffer::from_slice(name, v)
    }
}

fn operand(kind: Kind, m: &Matrix<impl Scalar>, col: usize) -> WgradOperand {
    match kind {
        Kind::Ones => WgradOperand::Ones,
        Kind::Data => WgradOperand::Data { stride: m.stride, col },
        Kind::Float => WgradOperand::Float { stride: m.stride, col },
    }
}

/// Runs `c` with the columns outside the call's blocks filled as `outside`, checks the result
/// against the f64 sum and returns it (`[outputs, M, N]` in f64).
fn run_case(c: &Case, outside: Outside) -> Result<Vec<f64>, TestCaseError> {
    match c.dtype {
        DType::F32 => run_typed::<f32>(c, outside),
        DType::F16 => run_typed::<f16>(c, outside),
        DType::BF16 => run_typed::<bf16>(c, outside),
    }
}

fn run_typed<T: Scalar + bytemuck::Pod>(c: &Case, outside: Outside) -> Result<Vec<f64>, TestCaseError> {
    let fail = |e: String| TestCaseError::fail(format!("{e}\n{c:?}"));
    let mut rng = Rng::new(c.seed);
    let (t_n, m_n, n_n) = (c.tokens, c.m, c.n);
    let p = matrix::<T>(&mut rng, c.p, t_n, m_n, c.p_cols, outside);
    let mut q = matrix::<T>(&mut rng, c.q, t_n, n_n, c.q_cols, outside);
    if c.sparse {
        // Whole rows of zeros (outside columns kept), as dh outside the selected experts.
        for t in (0..t_n).filter(|_| rng.below(2) == 0) {
            for j in c.q_cols.col..c.q_cols.col + n_n {
                let i = t * q.stride + j;
                q.values[i] = 0.0;
                match c.q {
                    Kind::Data => q.data[i] = T::from_f64(0.0),
                    _ => q.float[i] = 0.0,
                }
            }
        }
    }
    let (rw_cols, outputs) = c.rw.unwrap_or((Cols { col: 0, after: 0 }, 1));
    let rw = c.rw.map(|(cols, count)| matrix::<f32>(&mut rng, Kind::Float, t_n, count, cols, outside));

    let build = wgrad::build(c.dtype, WgradConfig::DEFAULT);
    let shape = WgradShape {
        tokens: t_n,
        m: m_n,
        n: n_n,
        splits: c.splits,
        p: operand(c.p, &p, c.p_cols.col),
        q: operand(c.q, &q, c.q_cols.col),
        row_weight: rw.as_ref().map(|w| WgradRowWeight { stride: w.stride, col: rw_cols.col, count: outputs }),
        scale: c.scale,
    };
    let plan = wgrad::plan(&build, shape).map_err(|e| fail(e.to_string()))?;

    let bufs = (
        buffer("wgrad_p", &p.data),
        buffer("wgrad_p_float", &p.float),
        buffer("wgrad_q", &q.data),
        buffer("wgrad_q_float", &q.float),
        buffer("wgrad_row_weight", rw.as_ref().map_or(&[][..], |w| &w.float[..])),
    );
    let partials = Buffer::<f32>::poisoned("wgrad_partials", plan.partials_len());
    let out = Buffer::<T>::poisoned("wgrad_out", plan.out_len());
    let mut binds = Bindings::new();
    binds
        .sized(Buf::WgradP, bufs.0.device_ptr(), p.data.len())
        .sized(Buf::WgradPFloat, bufs.1.device_ptr(), p.float.len())
        .sized(Buf::WgradQ, bufs.2.device_ptr(), q.data.len())
        .sized(Buf::WgradQFloat, bufs.3.device_ptr(), q.float.len())
        .sized(Buf::WgradRowWeight, bufs.4.device_ptr(), rw.as_ref().map_or(0, |w| w.float.len()))
        .sized(Buf::WgradPartials, partials.device_ptr(), partials.len())
        .sized(Buf::WgradOut, out.device_ptr(), out.len());
    let mut host = HostBackend::new(c.schedule);
    host.resident_blocks = c.resident;
    // SAFETY: every bound address is a live host-execution buffer of the bound length.
    unsafe { wgrad::run(&build, &plan, &binds, &mut host) }.map_err(|e| fail(e.to_string()))?;
    prop_assert_eq!(host.launches, 2);
    let got: Vec<f64> = out.read().iter().map(|v| v.to_f64()).collect();

    let tol = tolerance(c.dtype, t_n + plan.splits() + 3);
    let tiny = match c.dtype {
        DType::F16 => f64::powi(2.0, -25),
        DType::BF16 => f64::powi(2.0, -134),
        DType::F32 => f64::powi(2.0, -150),
    };
    let scale = c.scale as f64;
    for b in 0..outputs {
        for i in 0..m_n {
            for j in 0..n_n {
                let (mut want, mut abs) = (0.0f64, 0.0f64);
                for t in 0..t_n {
                    let pv = if c.p == Kind::Ones { 1.0 } else { p.values[t * p.stride + c.p_cols.col + i] };
                    let w = rw.as_ref().map_or(1.0, |w| w.values[t * w.stride + rw_cols.col + b]);
                    let term = scale * w * pv * q.values[t * q.stride + c.q_cols.col + j];
                    want += term;
                    abs += term.abs();
                }
                let g = got[(b * m_n + i) * n_n + j];
                let lim = tol * abs + tiny;
                prop_assert!(
                    (g - want).abs() <= lim,
                    "out[{b},{i},{j}] = {g}, want {want} (|err| {:.3e} > {lim:.3e}, splits {})\n{c:?}",
                    (g - want).abs(),
                    plan.splits()
                );
            }
        }
    }
    Ok(got)
}

fn same_bits(a: &[f64], b: &[f64]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn wgrad_matches_the_f64_sum(c in case_strategy()) {
        run_case(&c, Outside::NonFinite)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    /// One thread per output element and split, splits added in order: for the same number of
    /// splits the result is bit-identical whatever the thread and block order and however many
    /// blocks run interleaved.
    #[test]
    fn wgrad_is_deterministic_across_schedules(c in case_strategy()) {
        let first = run_case(&Case { schedule: Schedule::Forward, resident: None, ..c.clone() }, Outside::Random)?;
        for (schedule, resident) in [
            (Schedule::Reverse, None),
            (Schedule::Seeded(c.seed.wrapping_add(7)), None),
            (Schedule::Seeded(c.seed.wrapping_add(9)), Some(16)),
        ] {
            let again = run_case(&Case { schedule, resident, ..c.clone() }, Outside::Random)?;
            prop_assert!(same_bits(&first, &again), "{schedule:?} x {resident:?} differs\n{c:?}");
        }
    }

    /// Only the given column blocks are read: the result is bit-identical whether the other
    /// columns of `P`, `Q` and the row weights hold random numbers or NaN and infinities.
    #[test]
    fn wgrad_reads_only_its_columns(c in case_strategy()) {
        let c = Case {
            p_cols: Cols { col: c.p_cols.col + 1, after: c.p_cols.after + 1 },
            q_cols: Cols { col: c.q_cols.col + 1, after: c.q_cols.after + 1 },
            tokens: c.tokens.max(1),
            ..c
        };
        let random = run_case(&c, Outside::Random)?;
        let poisoned = run_case(&c, Outside::NonFinite)?;
        prop_assert!(same_bits(&random, &poisoned), "the result depends on other columns\n{c:?}");
    }
}

/// A gradient's operand as the backward holds it: ones, a tensor in the dtype, or an f32
/// workspace, each `[T, stride]` read from column 0.
#[derive(Clone, Copy)]
enum Src<'a, T> {
    Ones,
    Data(&'a [T], usize),
    Float(&'a [f32], usize),
}

/// One weight gradient through the kernels (`splits` token splits): `P` of `m` and `Q` of `n`
/// columns, the optional row weights (`[T, count]`, one output per column). `P` in the dtype is
/// bound as the layer's `x` and handed to the kernel with [`Bindings::aliased`], as a composed
/// backward does. Returns `[outputs, M, N]` in f64.
#[allow(clippy::too_many_arguments)]
fn gradient<T: Scalar + bytemuck::Pod>(
    dtype: DType,
    tokens: usize,
    (m, n): (usize, usize),
    p: Src<'_, T>,
    q: Src<'_, T>,
    rw: Option<(&[f32], usize)>,
    scale: f64,
    splits: usize,
) -> Vec<f64> {
    let operand = |s: &Src<'_, T>| match *s {
        Src::Ones => WgradOperand::Ones,
        Src::Data(_, stride) => WgradOperand::Data { stride, col: 0 },
        Src::Float(_, stride) => WgradOperand::Float { stride, col: 0 },
    };
    let build = wgrad::build(dtype, WgradConfig::DEFAULT);
    let shape = WgradShape {
        tokens,
        m,
        n,
        splits,
        p: operand(&p),
        q: operand(&q),
        row_weight: rw.map(|(_, count)| WgradRowWeight { stride: count, col: 0, count }),
        scale: scale as f32,
    };
    let plan = wgrad::plan(&build, shape).unwrap();
    let mut keep_t = Vec::new();
    let mut keep_f = Vec::new();
    let mut binds = Bindings::new();
    for (src, (data_buf, float_buf)) in [(p, (Buf::X, Buf::WgradPFloat)), (q, (Buf::WgradQ, Buf::WgradQFloat))] {
        match src {
            Src::Ones => {}
            Src::Data(v, _) => {
                keep_t.push(buffer("data", v));
                binds.sized(data_buf, keep_t.last().unwrap().device_ptr(), v.len());
            }
            Src::Float(v, _) => {
                keep_f.push(buffer("float", v));
                binds.sized(float_buf, keep_f.last().unwrap().device_ptr(), v.len());
            }
        }
    }
    if let Some((w, _)) = rw {
        keep_f.push(buffer("row_weight", w));
        binds.sized(Buf::WgradRowWeight, keep_f.last().unwrap().device_ptr(), w.len());
    }
    let partials = Buffer::<f32>::poisoned("wgrad_partials", plan.partials_len());
    let out = Buffer::<T>::poisoned("wgrad_out", plan.out_len());
    binds.sized(Buf::WgradPartials, partials.device_ptr(), partials.len());
    binds.sized(Buf::WgradOut, out.device_ptr(), out.len());
    let binds = binds.aliased(&[(Buf::WgradP, Buf::X)]);
    let mut host = HostBackend::new(Schedule::Seeded(tokens as u64));
    // SAFETY: every bound address is a live host-execution buffer of the bound length.
    unsafe { wgrad::run(&build, &plan, &binds, &mut host) }.unwrap();
    out.read().iter().map(|v| v.to_f64()).collect()
}

/// `Σ_t |scale · rw[t, b] · P[t, m] · Q[t, n]|` for `P [T, M]`, `Q [T, N]`, `rw [T, B]`.
fn abs_sums(
    p: &[f64],
    q: &[f64],
    rw: Option<&[f64]>,
    (t_n, m, n, outputs): (usize, usize, usize, usize),
    scale: f64,
) -> Vec<f64> {
    let mut out = vec![0.0; outputs * m * n];
    for t in 0..t_n {
        for b in 0..outputs {
            let w = rw.map_or(1.0, |w| w[t * outputs + b]);
            for i in 0..m {
                for j in 0..n {
                    out[(b * m + i) * n + j] += (scale * w * p[t * m + i] * q[t * n + j]).abs();
                }
            }
        }
    }
    out
}

fn rounded<T: Scalar>(v: &mut [f64]) -> Vec<T> {
    v.iter_mut()
        .map(|x| {
            let r = T::from_f64(*x);
            *x = r.to_f64();
            r
        })
        .collect()
}

fn to_f32(v: &[f64]) -> (Vec<f32>, Vec<f64>) {
    let f: Vec<f32> = v.iter().map(|&x| x as f32).collect();
    let back = f.iter().map(|&x| x as f64).collect();
    (f, back)
}

/// The layer's weight gradients as the backward's last stage computes them, from the f32
/// workspaces of the earlier stages (here in f64 from the reference, then rounded to f32),
/// against [`mole::reference::backward`]: `dA = xᵀ·dh` (`dh` with the h router's `dz·W_rᵀ`),
/// `dB = scale · hmᵀ·dy`, the router's `dW = xᵀ·dz` or `hᵀ·dz` and `db = Σ_t dz`, and CoMoL's
/// `dC_c = Σ_t w[t, c]·h_tᵀ g_t` in one call. `dz` is the reference's own: its gradient of the
/// logits when the same scores are given as logits.
fn check_backward<T: Scalar + bytemuck::Pod>(dtype: DType, spec: &mole::model::LayerSpec, tokens: usize, seed: u64) {
    use mole::model::{Gating, Mix, Router};
    use mole::reference::{backward, forward};
    use mole::synth::SyntheticLayer;
    let (d_in, d_out, r, e) = (spec.d_in, spec.d_out, spec.total_rank(), spec.routed_experts());
    let mut data = SyntheticLayer::<f64>::new(spec, tokens, seed);
    let x_t = rounded::<T>(&mut data.x);
    let _ = rounded::<T>(&mut data.a);
    let _ = rounded::<T>(&mut data.b);
    for v in [&mut data.router_weight, &mut data.router_bias, &mut data.cores].into_iter().flatten() {
        let _ = rounded::<T>(v);
    }
    let mut dy: Vec<f64> = Rng::new(seed + 1).fill(tokens * d_out, 1.0);
    let dy_t = rounded::<T>(&mut dy);
    let out = forward(spec, &data.inputs()).unwrap();
    let grads = backward(spec, &data.inputs(), &dy).unwrap();
    // dz: the same scores as logits.
    let mut logits_spec = spec.clone();
    let Gating::Routed { router, .. } = &mut logits_spec.gating else { panic!("a routed spec") };
    let h_router = matches!(*router, Router::H { .. });
    *router = Router::Logits;
    let mut logits_data = data.clone();
    (logits_data.router_weight, logits_data.router_bias) = (None, None);
    logits_data.logits = out.scores.clone();
    let dz = backward(&logits_spec, &logits_data.inputs(), &dy).unwrap().logits.unwrap();

    // The workspaces: w [T, E] dense, g = scale · s_e · dy·Bᵀ, dh, hm = h_mixed.
    let mut w = vec![0.0; tokens * e];
    for (slot, &id) in out.routing.ids.iter().enumerate() {
        if id >= 0 {
            w[slot / out.routing.slots * e + id as usize] += out.routing.weights[slot];
        }
    }
    let mut g = vec![0.0; tokens * r];
    for t in 0..tokens {
        for ex in 0..spec.ranks.num_experts() {
            for c in spec.ranks.cols(ex) {
                let s: f64 = (0..d_out).map(|j| dy[t * d_out + j] * data.b[c * d_out + j]).sum();
                g[t * r + c] = spec.scale * spec.expert_scale(ex) * s;
            }
        }
    }
    let mut dh = vec![0.0; tokens * r];
    for t in 0..tokens {
        match spec.mix {
            Mix::ExpertScale => (0..spec.ranks.num_experts()).for_each(|ex| {
                spec.ranks.cols(ex).for_each(|c| dh[t * r + c] = w[t * e + ex] * g[t * r + c]);
            }),
            Mix::CoreMerge { .. } => {
                let cores = data.cores.as_ref().unwrap();
                for c in 0..e {
                    for i in 0..r {
                        let row = &cores[(c * r + i) * r..(c * r + i + 1) * r];
                        dh[t * r + i] +=
                            w[t * e + c] * row.iter().zip(&g[t * r..(t + 1) * r]).map(|(m, g)| m * g).sum::<f64>();
                    }
                }
            }
        }
        if h_router {
            let wr = data.router_weight.as_ref().unwrap();
            for i in 0..r {
                dh[t * r + i] += (0..e).map(|k| dz[t * e + k] * wr[i * e + k]).sum::<f64>();
            }
        }
    }
    let ((dh32, dh), (hm32, hm), (h32, h)) = (to_f32(&dh), to_f32(&out.h_mixed), to_f32(&out.h));
    let ((dz32, dz), (w32, w), (g32, g)) = (to_f32(&dz), to_f32(&w), to_f32(&g));
    let ones = vec![1.0; tokens];

    let splits = 3;
    let tol = tolerance(dtype, tokens + splits + 4);
    let check = |name: &str, got: Vec<f64>, want: &[f64], abs: Vec<f64>| {
        assert_eq!((got.len(), abs.len()), (want.len(), want.len()), "{name}");
        assert!(want.iter().any(|v| v.abs() > 1e-3), "{name}: an all-zero gradient tests nothing");
        for (i, ((g, w), a)) in got.iter().zip(want).zip(&abs).enumerate() {
            let lim = tol * a + f64::powi(2.0, -25);
            assert!(
                (g - w).abs() <= lim,
                "{name}[{i}] ({dtype}) = {g}, want {w} (|err| {:.3e} > {lim:.3e})",
                (g - w).abs()
            );
        }
    };
    let da = gradient::<T>(dtype, tokens, (d_in, r), Src::Data(&x_t, d_in), Src::Float(&dh32, r), None, 1.0, splits);
    check("dA", da, grads.a.as_ref().unwrap(), abs_sums(&data.x, &dh, None, (tokens, d_in, r, 1), 1.0));
    let db = gradient::<T>(
        dtype,
        tokens,
        (r, d_out),
        Src::Float(&hm32, r),
        Src::Data(&dy_t, d_out),
        None,
        spec.scale,
        splits,
    );
    check("dB", db, grads.b.as_ref().unwrap(), abs_sums(&hm, &dy, None, (tokens, r, d_out, 1), spec.scale));
    let (router_p, router_p_f64, k) =
        if h_router { (Src::Float(&h32, r), &h, r) } else { (Src::Data(&x_t, d_in), &data.x, d_in) };
    let dw = gradient::<T>(dtype, tokens, (k, e), router_p, Src::Float(&dz32, e), None, 1.0, splits);
    check(
        "dW_router",
        dw,
        grads.router_weight.as_ref().unwrap(),
        abs_sums(router_p_f64, &dz, None, (tokens, k, e, 1), 1.0),
    );
    let dbias = gradient::<T>(dtype, tokens, (1, e), Src::Ones, Src::Float(&dz32, e), None, 1.0, splits);
    check("db_router", dbias, grads.router_bias.as_ref().unwrap(), abs_sums(&ones, &dz, None, (tokens, 1, e, 1), 1.0));
    if let Mix::CoreMerge { .. } = spec.mix {
        let dc = gradient::<T>(
            dtype,
            tokens,
            (r, r),
            Src::Float(&h32, r),
            Src::Float(&g32, r),
            Some((&w32, e)),
            1.0,
            splits,
        );
        check("dC", dc, grads.cores.as_ref().unwrap(), abs_sums(&h, &g, Some(&w), (tokens, r, r, e), 1.0));
    }
}

/// MixLoRA per linear (x router with a bias, renormalised top-2, per-expert scales, Switch
/// balance) and CoMoL (h router with a bias, its cores, an expert scale, balance): every weight
/// gradient the backward computes with these kernels matches the reference backward.
#[test]
fn the_backwards_weight_gradients_match_the_reference() {
    use mole::model::{AuxLosses, Gating, Method, MethodShape, Router};
    let shape = MethodShape { d_in: 40, d_out: 24, experts: 4, rank: 3, k: 2, alpha: 6.0 };
    let with_bias = |method: Method, scales: Vec<f64>| {
        let mut spec = method.spec(shape).unwrap();
        if let Gating::Routed { router, .. } = &mut spec.gating {
            *router = match *router {
                Router::X { .. } => Router::X { bias: true },
                _ => Router::H { bias: true },
            };
        }
        spec.expert_scales = Some(scales);
        spec.training.aux_losses = AuxLosses { load_balancing: 0.3, ..Default::default() };
        spec.validate().unwrap();
        spec
    };
    let mixlora = with_bias(Method::MixLoraPerLinear, vec![0.5, 2.0, -1.0, 1.5]);
    let comol = with_bias(Method::Comol, vec![-1.5]);
    for (spec, tokens) in [(&mixlora, 70), (&comol, 45)] {
        check_backward::<f32>(DType::F32, spec, tokens, 3);
        check_backward::<bf16>(DType::BF16, spec, tokens, 4);
        check_backward::<f16>(DType::F16, spec, tokens, 5);
    }
}

/// Tokens whose products in a tile are all zero are skipped (a sparse top-k's `dh` and `hm`), but
/// a zero times an infinity or NaN is not a zero: such a token's row or column stays NaN, as in
/// the f64 sum, and every other element matches it.
#[test]
fn zero_rows_do_not_hide_non_finite_products() {
    let (t_n, m, n) = (70, 5, 7);
    let mut rng = Rng::new(8);
    let mut p: Vec<f64> = (0..t_n * m).map(|_| rng.range(-1.0, 1.0)).collect();
    let mut q: Vec<f64> = (0..t_n * n).map(|_| rng.range(-1.0, 1.0)).collect();
    for t in 0..t_n {
        if t % 3 == 0 {
            q[t * n..(t + 1) * n].fill(0.0);
        }
        if t % 5 == 1 {
            p[t * m..(t + 1) * m].fill(0.0);
        }
    }
    // Q zero on tokens 3 and 66 (the last step), P zero on token 11.
    (p[3 * m + 1], p[66 * m + 2], q[11 * n + 4]) = (f64::INFINITY, f64::NAN, f64::NEG_INFINITY);
    let (p32, p) = to_f32(&p);
    let (q32, q) = to_f32(&q);
    let mut want = vec![0.0f64; m * n];
    for t in 0..t_n {
        for i in 0..m {
            for j in 0..n {
                want[i * n + j] += p[t * m + i] * q[t * n + j];
            }
        }
    }
    let abs = abs_sums(&p, &q, None, (t_n, m, n, 1), 1.0);
    for splits in [1, 2, 7] {
        let got = gradient::<f32>(DType::F32, t_n, (m, n), Src::Float(&p32, m), Src::Float(&q32, n), None, 1.0, splits);
        for (k, ((g, w), a)) in got.iter().zip(&want).zip(&abs).enumerate() {
            let (i, j) = (k / n, k % n);
            assert_eq!(w.is_nan(), i == 1 || i == 2 || j == 4, "the f64 sum at [{i},{j}]");
            if w.is_nan() {
                assert!(g.is_nan(), "[{i},{j}] = {g}, want NaN (splits {splits})");
            } else {
                let lim = tolerance(DType::F32, t_n + splits + 3) * a;
                assert!((g - w).abs() <= lim, "[{i},{j}] = {g}, want {w} (splits {splits})");
            }
        }
    }
}
