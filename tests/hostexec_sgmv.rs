//! The SGMV kernels (`kernels/sgmv.cu`) through the host execution layer against the f64
//! reference [`mole::reference::grouped_forward`]: random shapes (odd `d_in`/`d_out`, ragged
//! ranks including rank 0, several split-K slices), segment-length distributions that stress the
//! plans (identical, uniform, zipf, one expert taking every token, many empty experts), every
//! dtype, per-expert scales (zero and negative among them) on part of the cases, random thread
//! schedules, `y` filled with random non-zero data and the `h` workspace poisoned before the
//! launch.
//!
//! Tolerance, per output element: with
//! `P = |y| + |scale| Σ_s |s_e w_s| Σ_c (Σ_k |x_k A_kc|) |B_cn|`
//! (the sum of absolute terms), `|got - exact| <= tolerance_with(slots · u, 2^-24, n) · P`, where
//! `n = d_in + r_max + splits + 8` covers the f32 operations on one path (shrink over the split,
//! the in-order split sum, the expand over the rank, the weight and the add) and `slots · u`
//! the rounding of `y` to the dtype after each slot pass. Inputs are rounded to the dtype before
//! the reference sees them. An element no slot touches must come back bit-exact.

use half::{bf16, f16};
use mole::kernels::exec::{Backend, Bindings, Buf, Launch};
use mole::kernels::sgmv::{self, SgmvConfig, SgmvShape, SlotPlans};
use mole::model::RankLayout;
use mole::plan::{RoutingPlan, TokenSlot};
use mole::reference::{grouped_forward, tolerance_with, Bank, Routing};
use mole::synth::Rng;
use mole::{DType, Scalar};
use mole_hostexec::{Buffer, Schedule};

mod host;
use host::HostBackend;
use proptest::prelude::*;

/// How tokens spread over experts.
#[derive(Clone, Copy, Debug)]
enum Spread {
    /// Every token picks the same experts.
    Identical,
    Uniform,
    /// P(e) ∝ 1 / (e + 1).
    Zipf,
    /// Slot 0 of every token goes to one expert.
    OneHot,
    /// Only a handful of many experts are ever picked.
    ManyEmpty,
}

#[derive(Clone, Debug)]
struct Case {
    tokens: usize,
    slots: usize,
    d_in: usize,
    d_out: usize,
    ranks: Vec<usize>,
    spread: Spread,
    dtype: DType,
    scale: f32,
    /// Per-expert scales `s_e` (exact in f32), or none (all 1, passed as null).
    expert_scales: Option<Vec<f32>>,
    /// Shrink with the FMA kernel even where the plan picks the tensor-core one.
    force_fma: bool,
    /// Expand with the FMA kernel even where the plan picks the tensor-core one.
    force_fma_expand: bool,
    seed: u64,
    schedule: Schedule,
}

fn pick(rng: &mut Rng, spread: Spread, e: usize, t: usize, s: usize, hot: &[usize]) -> usize {
    match spread {
        Spread::Identical => s % e,
        Spread::Uniform => rng.below(e),
        Spread::Zipf => {
            let h: f64 = (1..=e).map(|i| 1.0 / i as f64).sum();
            let mut u = rng.uniform() * h;
            (0..e)
                .find(|&i| {
                    u -= 1.0 / (i + 1) as f64;
                    u <= 0.0
                })
                .unwrap_or(e - 1)
        }
        Spread::OneHot if s == 0 => hot[0],
        Spread::OneHot => rng.below(e),
        Spread::ManyEmpty => hot[(t + rng.below(hot.len())) % hot.len()],
    }
}

/// Routing ids (no expert twice in a token, about 10% empty slots) and f32-exact weights.
fn routing(c: &Case, rng: &mut Rng) -> (Vec<i32>, Vec<f64>) {
    let e = c.ranks.len();
    // Hot experts: up to three ranked ones and one at random (which may have rank 0).
    let ranked: Vec<usize> = (0..e).filter(|&i| c.ranks[i] > 0).collect();
    let mut hot: Vec<usize> = (0..3).map(|_| ranked[rng.below(ranked.len())]).collect();
    hot.push(rng.below(e));
    let mut ids = vec![-1i32; c.tokens * c.slots];
    let mut w = vec![0.0f64; c.tokens * c.slots];
    for t in 0..c.tokens {
        for s in 0..c.slots {
            if rng.below(10) == 0 {
                continue;
            }
            let row = &ids[t * c.slots..t * c.slots + s];
            let first = pick(rng, c.spread, e, t, s, &hot);
            // The next free expert after the pick keeps the token's experts distinct.
            if let Some(id) = (0..e).map(|i| ((first + i) % e) as i32).find(|id| !row.contains(id)) {
                ids[t * c.slots + s] = id;
                w[t * c.slots + s] = rng.range(-1.0, 1.0) as f32 as f64;
            }
        }
    }
    (ids, w)
}

fn case_strategy() -> impl Strategy<Value = Case> {
    let spread = prop_oneof![
        Just(Spread::Identical),
        Just(Spread::Uniform),
        Just(Spread::Zipf),
        Just(Spread::OneHot),
        Just(Spread::ManyEmpty)
    ];
    (0usize..=96, 1usize..=4, 1usize..=130, 1usize..=130, 1usize..=10, spread, 0usize..3, any::<u64>(), 0u8..4)
        .prop_map(|(tokens, slots, d_in, d_out, experts, spread, d, seed, sch)| {
            // Half the shapes take the tensor-core shrink in 16-bit dtypes (d_in % 8 == 0).
            let d_in = if seed % 2 == 0 { d_in.div_ceil(8) * 8 } else { d_in };
            // Half take the tensor-core expand (d_out % 8 == 0; tails in N when d_out % 32 != 0).
            let d_out = if (seed >> 1) % 2 == 0 { d_out.div_ceil(8) * 8 } else { d_out };
            let mut rng = Rng::new(seed ^ 0x5eed);
            let experts = if matches!(spread, Spread::ManyEmpty) { 40 + experts * 30 } else { experts };
            // Ragged ranks with zeros, R <= 64; many-empty layouts keep a few ranked experts.
            let mut ranks: Vec<usize> =
                (0..experts)
                    .map(|_| {
                        if experts > 10 && rng.below(8) != 0 {
                            0
                        } else {
                            [0, 1, 2, 3, 5, 8, 13, 24, 40][rng.below(9)]
                        }
                    })
                    .collect();
            while ranks.iter().sum::<usize>() > 64 {
                let i = ranks.iter().position(|&r| r > 0).unwrap();
                ranks[i] = 0;
            }
            if ranks.iter().all(|&r| r == 0) {
                ranks[rng.below(experts)] = 7;
            }
            // Per-expert scales on half the cases, zero and negative ones among them.
            let expert_scales = (rng.below(2) == 0).then(|| random_scales(&mut rng, experts));
            Case {
                tokens,
                slots: slots.min(experts),
                d_in,
                d_out,
                ranks,
                spread,
                dtype: DType::ALL[d],
                scale: [0.5, 1.0, 2.0, -1.5][rng.below(4)],
                expert_scales,
                force_fma: rng.below(4) == 0,
                force_fma_expand: rng.below(4) == 0,
                seed,
                schedule: match sch {
                    0 => Schedule::Forward,
                    1 => Schedule::Reverse,
                    _ => Schedule::Seeded(seed),
                },
            }
        })
}

/// `n` per-expert scales, exact in f32: zero, negative, fractional and large ones.
fn random_scales(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| [0.0, -1.5, 0.75, 2.0, -0.25, 1.0, 3.5, -2.0][rng.below(8)]).collect()
}

/// A buffer of `T` from f64 values, and the values as the kernel sees them.
fn rounded<T: Scalar + bytemuck::Pod>(name: &str, v: &[f64]) -> (Buffer<T>, Vec<f64>) {
    let t: Vec<T> = v.iter().map(|&x| T::from_f64(x)).collect();
    let back = t.iter().map(|x| x.to_f64()).collect();
    let buf = if t.is_empty() { Buffer::poisoned(name, 1) } else { Buffer::from_slice(name, &t) };
    (buf, back)
}

/// Binds `buf` to a host-execution buffer, with its length.
fn bind<T: bytemuck::Pod>(b: &mut Bindings, buf: Buf, data: &Buffer<T>) {
    b.sized(buf, data.device_ptr(), data.len());
}

/// Runs `c` through the kernels, checks it against the reference, and returns `y` as computed.
fn run_case(c: &Case) -> Result<Vec<f64>, TestCaseError> {
    match c.dtype {
        DType::F32 => run_typed::<f32>(c),
        DType::F16 => run_typed::<f16>(c),
        DType::BF16 => run_typed::<bf16>(c),
    }
}

fn run_typed<T: Scalar + bytemuck::Pod>(c: &Case) -> Result<Vec<f64>, TestCaseError> {
    let fail = |e: String| TestCaseError::fail(format!("{e}\n{c:?}"));
    let mut rng = Rng::new(c.seed);
    let (t_n, e_n, slots) = (c.tokens, c.ranks.len(), c.slots);
    let mut offs = vec![0usize];
    for r in &c.ranks {
        offs.push(offs.last().unwrap() + r);
    }
    let r_total = *offs.last().unwrap();
    let layout = RankLayout::from_offsets(offs.clone()).map_err(|e| fail(e.to_string()))?;
    let offs32: Vec<u32> = offs.iter().map(|&o| o as u32).collect();
    let (ids, w) = routing(c, &mut rng);
    let gen = |rng: &mut Rng, n: usize| -> Vec<f64> { (0..n).map(|_| rng.range(-1.0, 1.0)).collect() };
    let (x_buf, x) = rounded::<T>("x", &gen(&mut rng, t_n * c.d_in));
    let (a_buf, a) = rounded::<T>("a", &gen(&mut rng, c.d_in * r_total));
    let (b_buf, b) = rounded::<T>("b", &gen(&mut rng, r_total * c.d_out));
    // y is in/out: random, non-zero.
    let y_init: Vec<f64> =
        (0..t_n * c.d_out).map(|_| rng.range(0.25, 2.0) * if rng.below(2) == 0 { 1.0 } else { -1.0 }).collect();
    let (y_buf, y0) = rounded::<T>("y", &y_init);

    let build = sgmv::build(c.dtype, SgmvConfig::DEFAULT);
    let bm = SgmvConfig::DEFAULT.bm as usize;
    let plans = SlotPlans::build(&ids, t_n, slots, e_n, bm).map_err(|e| fail(e.to_string()))?;
    let expert_scales = c.expert_scales.is_some();
    let shape = SgmvShape { tokens: t_n, slots, d_in: c.d_in, d_out: c.d_out, scale: c.scale, expert_scales };
    let p = sgmv::plan(&build, shape, &offs32, plans.entry_stride).map_err(|e| fail(e.to_string()))?;

    let w32: Vec<f32> = w.iter().map(|&v| v as f32).collect();
    let nonempty = |n: usize| n.max(1);
    let ro_buf = Buffer::from_slice("rank_offsets", &offs32);
    let po_buf = Buffer::from_slice("plan_offsets", &plans.offsets);
    let pe_buf = if plans.entries.is_empty() {
        Buffer::<TokenSlot>::poisoned("plan_entries", 1)
    } else {
        Buffer::from_slice("plan_entries", &plans.entries)
    };
    let w_buf = if w32.is_empty() { Buffer::poisoned("weights", 1) } else { Buffer::from_slice("weights", &w32) };
    let s_buf = c.expert_scales.as_ref().map(|s| Buffer::from_slice("expert_scales", s));
    let h_buf = Buffer::<f32>::poisoned("h_part", nonempty(p.lens.get(Buf::Partials)));
    let mut p = p;
    if c.force_fma {
        p = p.with_fma_shrink();
    }
    if c.force_fma_expand {
        p = p.with_fma_expand();
    }
    let mut binds = Bindings::new();
    bind(&mut binds, Buf::X, &x_buf);
    bind(&mut binds, Buf::A, &a_buf);
    bind(&mut binds, Buf::B, &b_buf);
    bind(&mut binds, Buf::RankOffsets, &ro_buf);
    bind(&mut binds, Buf::PlanOffsets, &po_buf);
    bind(&mut binds, Buf::PlanEntries, &pe_buf);
    bind(&mut binds, Buf::RouteWeights, &w_buf);
    bind(&mut binds, Buf::Partials, &h_buf);
    bind(&mut binds, Buf::Y, &y_buf);
    if let Some(s) = &s_buf {
        bind(&mut binds, Buf::ExpertScales, s);
    }
    let mut host = HostBackend::new(c.schedule);
    // SAFETY: every bound address is a live host-execution buffer of the bound length.
    unsafe { sgmv::run(&build, &p, &binds, &mut host) }.map_err(|e| fail(e.to_string()))?;
    prop_assert_eq!(host.launches, if p.shrink.is_some() { 1 + slots } else { 0 });
    let got: Vec<f64> = y_buf.read().iter().take(t_n * c.d_out).map(|v| v.to_f64()).collect();

    let routing = Routing { tokens: t_n, slots, experts: e_n, ids: ids.clone(), weights: w.clone(), probs: None };
    let rplan = RoutingPlan::build(&ids, t_n, slots, e_n, 1).map_err(|e| fail(e.to_string()))?;
    let scales: Option<Vec<f64>> = c.expert_scales.as_ref().map(|s| s.iter().map(|&v| v as f64).collect());
    let scale_of = |e: usize| scales.as_ref().map_or(1.0, |s| s[e]);
    let (scale, d_in, d_out) = (c.scale as f64, c.d_in, c.d_out);
    let bank = Bank { a: &a, b: &b, ranks: &layout, scale, expert_scales: scales.as_deref(), d_in, d_out };
    let want = grouped_forward(&x, &y0, bank, &routing, &rplan);

    let r_max = c.ranks.iter().copied().max().unwrap_or(0);
    let n = c.d_in + r_max + p.params.splits as usize + 8;
    // 2^-23 per f32 operation: the tensor cores truncate (the emulation does by default).
    let tol = tolerance_with(slots as f64 * c.dtype.unit_roundoff(), f64::powi(2.0, -23), n);
    for t in 0..t_n {
        let mut bound = vec![0.0f64; c.d_out];
        for s in 0..slots {
            let id = ids[t * slots + s];
            if id < 0 || c.ranks[id as usize] == 0 {
                continue;
            }
            let ws = (scale * w[t * slots + s] * scale_of(id as usize)).abs();
            for col in layout.cols(id as usize) {
                let habs: f64 = (0..c.d_in).map(|k| (x[t * c.d_in + k] * a[k * r_total + col]).abs()).sum();
                for (nn, bnd) in bound.iter_mut().enumerate() {
                    *bnd += ws * habs * b[col * c.d_out + nn].abs();
                }
            }
        }
        for (nn, &bnd) in bound.iter().enumerate() {
            let i = t * c.d_out + nn;
            let (g, ex) = (got[i], want[i]);
            if bnd == 0.0 {
                prop_assert!(g.to_bits() == y0[i].to_bits(), "untouched y[{t},{nn}] changed: {g} vs {}\n{c:?}", y0[i]);
                continue;
            }
            let lim = tol * (bnd + y0[i].abs());
            prop_assert!(
                (g - ex).abs() <= lim,
                "y[{t},{nn}] = {g}, want {ex} (|err| {} > {lim})\n{c:?}",
                (g - ex).abs()
            );
        }
    }
    Ok(got)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 160, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn sgmv_matches_the_grouped_reference(c in case_strategy()) {
        run_case(&c)?;
    }

    /// No atomics, one writer per element and pass, splits and slots summed in a fixed order: the
    /// result does not depend on the thread schedule, bit for bit.
    #[test]
    fn sgmv_is_deterministic_across_schedules(c in case_strategy()) {
        let first = run_case(&Case { schedule: Schedule::Forward, ..c.clone() })?;
        for schedule in [Schedule::Reverse, Schedule::Seeded(c.seed.wrapping_add(1))] {
            let again = run_case(&Case { schedule, ..c.clone() })?;
            prop_assert!(
                first.iter().zip(&again).all(|(a, b)| a.to_bits() == b.to_bits()),
                "results differ under {schedule:?}\n{c:?}"
            );
        }
    }
}

/// One bigger fixed case: E = 4096 (mostly rank 0) with ranks up to 256, several split-K slices,
/// odd d_out, two slots, every dtype.
#[test]
fn many_experts_and_full_rank() {
    for (i, &dtype) in DType::ALL.iter().enumerate() {
        let mut ranks = vec![0usize; 4096];
        for (e, r) in [(0, 1), (17, 256), (1000, 33), (4095, 16), (2048, 3)] {
            ranks[e] = r;
        }
        let c = Case {
            tokens: 40,
            slots: 2,
            d_in: 104,
            // 48 (f16): the tensor-core expand over ranks up to 256.
            d_out: 45 + 3 * i,
            ranks,
            spread: Spread::ManyEmpty,
            dtype,
            scale: 2.0,
            expert_scales: (i > 0).then(|| (0..4096).map(|e| [1.5, -0.5, 0.0, 2.0][e % 4]).collect()),
            force_fma: false,
            force_fma_expand: false,
            seed: 7 + i as u64,
            schedule: Schedule::Seeded(11),
        };
        run_case(&c).unwrap();
    }
}

/// The hi + lo split of the tensor-core expand carries `h` exactly when `h` has at most twice the
/// dtype's significand bits: with `B` a signed power-of-two selection (one non-zero per column
/// and expert), `acc` is exact on both paths, so the tensor-core and FMA expands must agree bit
/// for bit. Row magnitudes span `2^-8 .. 2^17` (past f16's range: the per-row scaling must keep
/// hi finite); ragged ranks give K tails, `d_out = 40` an N tail, 50 tokens an M tail.
#[test]
fn expand_mma_carries_h_exactly() {
    expand_exact::<f16>(DType::F16, 11);
    expand_exact::<bf16>(DType::BF16, 8);
}

fn expand_exact<T: Scalar + bytemuck::Pod>(dtype: DType, p_bits: i32) {
    let (t_n, d_out, ranks) = (50usize, 40usize, [5usize, 0, 24, 16, 3]);
    let mut rng = Rng::new(99 + p_bits as u64);
    let mut offs = vec![0u32];
    for r in ranks {
        offs.push(offs.last().unwrap() + r as u32);
    }
    let r_total = *offs.last().unwrap() as usize;
    let ids: Vec<i32> = (0..t_n).map(|_| rng.below(ranks.len()) as i32).collect();
    let plans = SlotPlans::build(&ids, t_n, 1, ranks.len(), SgmvConfig::DEFAULT.bm as usize).unwrap();
    let build = sgmv::build(dtype, SgmvConfig::DEFAULT);
    let shape = SgmvShape { tokens: t_n, slots: 1, d_in: 16, d_out, scale: 0.75, expert_scales: false };
    let p = sgmv::plan(&build, shape, &offs, plans.entry_stride).unwrap();
    let expand = p.expand.unwrap();
    assert!(std::ptr::eq(expand.kernel, &sgmv::kernel::EXPAND_MMA));
    // h: 2p-bit values with one exponent per row, all in split 0 (the other splits hold zeros).
    let r_max = p.params.r_max as usize;
    let mut h = vec![0.0f32; p.lens.get(Buf::Partials)];
    let mut w = vec![0.0f32; t_n];
    for t in 0..t_n {
        let k = rng.below(26) as i32 - 8;
        w[t] = (rng.range(0.5, 1.0) * f64::powi(2.0, -k)) as f32;
        for v in &mut h[t * r_max..(t + 1) * r_max] {
            let m = (1u64 << (2 * p_bits - 1)) + rng.below(1 << (2 * p_bits - 1)) as u64;
            let sign = if rng.below(2) == 0 { 1.0 } else { -1.0 };
            *v = (sign * m as f64 * f64::powi(2.0, k - 2 * p_bits + 1)) as f32;
        }
    }
    let mut b = vec![0.0f64; r_total * d_out];
    for (e, &r) in ranks.iter().enumerate().filter(|(_, &r)| r > 0) {
        for n in 0..d_out {
            let sign = if rng.below(2) == 0 { 1.0 } else { -1.0 };
            b[(offs[e] as usize + n % r) * d_out + n] = sign * f64::powi(2.0, rng.below(3) as i32 - 1);
        }
    }
    let y0: Vec<f64> = (0..t_n * d_out).map(|_| rng.range(-2.0, 2.0)).collect();
    let (b_buf, _) = rounded::<T>("b", &b);
    let h_buf = Buffer::from_slice("h_part", &h);
    let ro_buf = Buffer::from_slice("rank_offsets", &offs);
    let po_buf = Buffer::from_slice("plan_offsets", &plans.offsets);
    let pe_buf = Buffer::from_slice("plan_entries", &plans.entries);
    let w_buf = Buffer::from_slice("weights", &w);
    let run = |launch: sgmv::SgmvLaunch| -> Vec<u64> {
        let (y_buf, _) = rounded::<T>("y", &y0);
        let mut binds = Bindings::new();
        bind(&mut binds, Buf::Partials, &h_buf);
        bind(&mut binds, Buf::B, &b_buf);
        bind(&mut binds, Buf::RankOffsets, &ro_buf);
        bind(&mut binds, Buf::PlanOffsets, &po_buf);
        bind(&mut binds, Buf::PlanEntries, &pe_buf);
        bind(&mut binds, Buf::RouteWeights, &w_buf);
        bind(&mut binds, Buf::Y, &y_buf);
        let mut l = Launch::pack(launch.kernel, launch.dims(), &p.expand_params(0), &binds).unwrap();
        // SAFETY: every bound address is a live host-execution buffer holding what the plan reads.
        unsafe { HostBackend::new(Schedule::Seeded(5)).launch(&build, &mut l) }.unwrap();
        y_buf.read().iter().map(|v| v.to_f64().to_bits()).collect()
    };
    let fma = run(sgmv::expand_launch(p.config, expand.grid.0, d_out as u32, false));
    let mma = run(expand);
    let differ = fma.iter().zip(&mma).filter(|(a, b)| a != b).count();
    assert_eq!(differ, 0, "{dtype:?}: {differ} of {} elements differ from the FMA expand", fma.len());
}

/// An infinite `h` (one `A` entry is +inf, so `h = x · A` is ±inf in one rank column of expert 1)
/// through both expands: the tensor-core one (16-bit dtypes; its hi / lo split must keep the
/// infinity in hi, not make `lo = inf - inf`) and the FMA one. Where the f64 reference gives ±inf
/// the kernel must give the same infinity; tokens of the other experts stay within tolerance.
#[test]
fn infinite_h_reaches_y_as_the_reference_infinity() {
    infinite_h::<f16>(DType::F16);
    infinite_h::<bf16>(DType::BF16);
    infinite_h::<f32>(DType::F32);
}

fn infinite_h<T: Scalar + bytemuck::Pod>(dtype: DType) {
    let (t_n, d_in, d_out, ranks) = (40usize, 32usize, 40usize, [5usize, 16, 3]);
    let mut rng = Rng::new(7);
    let mut offs = vec![0usize];
    for r in ranks {
        offs.push(offs.last().unwrap() + r);
    }
    let r_total = offs[ranks.len()];
    let offs32: Vec<u32> = offs.iter().map(|&o| o as u32).collect();
    let layout = RankLayout::from_offsets(offs.clone()).unwrap();
    let ids: Vec<i32> = (0..t_n).map(|t| (t % ranks.len()) as i32).collect();
    let w: Vec<f64> =
        (0..t_n).map(|_| rng.range(0.5, 1.0) as f32 as f64 * if rng.below(2) == 0 { 1.0 } else { -1.0 }).collect();
    // Magnitudes kept from zero: x[t, k] · inf must be an infinity, never 0 · inf.
    let mut gen = |n: usize| -> Vec<f64> {
        (0..n).map(|_| rng.range(0.25, 1.0) * if rng.below(2) == 0 { 1.0 } else { -1.0 }).collect()
    };
    let (x_buf, x) = rounded::<T>("x", &gen(t_n * d_in));
    let mut a_raw = gen(d_in * r_total);
    a_raw[5 * r_total + offs[1] + 3] = f64::INFINITY;
    let (a_buf, a) = rounded::<T>("a", &a_raw);
    let (b_buf, b) = rounded::<T>("b", &gen(r_total * d_out));
    let y_init = gen(t_n * d_out);
    let (_, y0) = rounded::<T>("y", &y_init);

    let build = sgmv::build(dtype, SgmvConfig::DEFAULT);
    let plans = SlotPlans::build(&ids, t_n, 1, ranks.len(), SgmvConfig::DEFAULT.bm as usize).unwrap();
    let shape = SgmvShape { tokens: t_n, slots: 1, d_in, d_out, scale: 0.5, expert_scales: false };
    let p = sgmv::plan(&build, shape, &offs32, plans.entry_stride).unwrap();
    let fma_plan = p.clone().with_fma_expand();
    let mma = !std::ptr::eq(p.expand.unwrap().kernel, fma_plan.expand.unwrap().kernel);
    assert_eq!(mma, dtype != DType::F32, "{dtype:?}: the plan's expand");

    let routing =
        Routing { tokens: t_n, slots: 1, experts: ranks.len(), ids: ids.clone(), weights: w.clone(), probs: None };
    let rplan = RoutingPlan::build(&ids, t_n, 1, ranks.len(), 1).unwrap();
    let bank = Bank { a: &a, b: &b, ranks: &layout, scale: 0.5, expert_scales: None, d_in, d_out };
    let want = grouped_forward(&x, &y0, bank, &routing, &rplan);
    let abs = |v: &[f64]| v.iter().map(|e| e.abs()).collect::<Vec<f64>>();
    let (a_abs, b_abs) = (abs(&a), abs(&b));
    let abs_routing = Routing { weights: abs(&w), ..routing.clone() };
    let bank_abs = Bank { a: &a_abs, b: &b_abs, ranks: &layout, scale: 0.5, expert_scales: None, d_in, d_out };
    let bound = grouped_forward(&abs(&x), &abs(&y0), bank_abs, &abs_routing, &rplan);
    let infinite = want.iter().filter(|v| v.is_infinite()).count();
    assert!(infinite >= t_n / 3 * d_out, "{dtype:?}: the reference has only {infinite} infinities");
    let tol = tolerance_with(dtype.unit_roundoff(), f64::powi(2.0, -23), d_in + 16 + p.params.splits as usize + 8);

    let ro_buf = Buffer::from_slice("rank_offsets", &offs32);
    let po_buf = Buffer::from_slice("plan_offsets", &plans.offsets);
    let pe_buf = Buffer::from_slice("plan_entries", &plans.entries);
    let w32: Vec<f32> = w.iter().map(|&v| v as f32).collect();
    let w_buf = Buffer::from_slice("weights", &w32);
    for plan in [&p, &fma_plan] {
        let h_buf = Buffer::<f32>::poisoned("h_part", p.lens.get(Buf::Partials));
        let (y_buf, _) = rounded::<T>("y", &y_init);
        let mut binds = Bindings::new();
        bind(&mut binds, Buf::X, &x_buf);
        bind(&mut binds, Buf::A, &a_buf);
        bind(&mut binds, Buf::B, &b_buf);
        bind(&mut binds, Buf::RankOffsets, &ro_buf);
        bind(&mut binds, Buf::PlanOffsets, &po_buf);
        bind(&mut binds, Buf::PlanEntries, &pe_buf);
        bind(&mut binds, Buf::RouteWeights, &w_buf);
        bind(&mut binds, Buf::Partials, &h_buf);
        bind(&mut binds, Buf::Y, &y_buf);
        // SAFETY: every bound address is a live host-execution buffer of the bound length.
        unsafe { sgmv::run(&build, plan, &binds, &mut HostBackend::new(Schedule::Seeded(3))) }.unwrap();
        let launch = plan.expand.unwrap().kernel.name;
        let got: Vec<f64> = y_buf.read().iter().map(|v| v.to_f64()).collect();
        for (i, ((&g, &e), &bnd)) in got.iter().zip(&want).zip(&bound).enumerate() {
            let ok = if e.is_finite() { (g - e).abs() <= tol * bnd } else { g == e || (e.is_nan() && g.is_nan()) };
            assert!(ok, "{dtype:?} {launch}: y[{}, {}] = {g}, reference {e}", i / d_out, i % d_out);
        }
    }
}
