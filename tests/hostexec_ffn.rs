//! The FFN-expert block's kernels (`kernels/ffn.cu` with the SGMV shrinks and expands) through the
//! host execution layer against the f64 reference [`mole::reference::ffn_forward`]: random
//! shapes (odd `d` and `f`, several f-slices and split-K slices), ragged ranks with zeros in each
//! of the three banks, banks left out, SiLU and GELU, every dtype, 1 to 3 slots with empty ones
//! (the routing as given weights), random thread schedules, and `a_mix` and every workspace
//! poisoned before the launch. The test plays the caller's part between the two halves: the base
//! projections `G = x·W_gate`, `U = x·W_up` and `y = a_mix·W_down`, each rounded to the dtype.
//!
//! Tolerance, per element, by first-order propagation of bounds on absolute sums, with
//! `τ = tolerance_with(2^-24, 2^-24, n)` for the f32 arithmetic (`n = d + f + r + slices + 8` the
//! longest chain of f32 operations on one path) and `u` the dtype's unit roundoff for what is
//! stored in it:
//! - `g`: `δg ≤ u·|G| + τ·(|G| + |s_g| Σ_c H_c |B^g_cn|)` with `H_c = Σ_k |x_k A^g_kc|` (`G`
//!   arrives rounded to the dtype; the shrink, the delta and the sum are f32), `u` likewise;
//! - `a = act(g)·u`: `δa ≤ L·δg·(|u| + δu) + |act(g)|·δu + 2^-20·|a|`, with `L = 1.13` bounding
//!   `|act'|` for SiLU (1.0998) and GELU (1.1289), and the last term the f32 `expf`/`erff`;
//! - `a_mix = Σ_s w_s a_s`: `Σ |w_s| δa_s + (slots·u + τ)·Σ |w_s a_s| + slots·ε` (a rounding per
//!   pass; `ε` half the spacing of the dtype's subnormals, a rounding's absolute error near 0);
//! - `y`: the kernels start from the caller's `y0 = a_mix·W_down` on their own (checked) `a_mix`,
//!   so `y` is compared with `y0` plus the reference's down delta `y_ref - a_mix_ref·W_down`, under
//!   the `a` bounds through `|A^d|` and `|B^d|`, `τ` of the delta's absolute sums, and
//!   `slots·(u·|y| + ε)` for the rounding of `y` after each down pass.

use half::{bf16, f16};
use mole::kernels::exec::{Bindings, Buf};
use mole::kernels::ffn::{self, FfnBank, FfnConfig, FfnShape};
use mole::kernels::sgmv::{self, SgmvConfig, SlotPlans};
use mole::model::{Activation, FfnSpec, Gating, ProjectionLora, RankLayout};
use mole::plan::TokenSlot;
use mole::reference::{ffn_forward, tolerance_with, FfnInputs};
use mole::synth::Rng;
use mole::{DType, Scalar};
use mole_hostexec::{Buffer, Schedule};

mod host;
use host::HostBackend;
use proptest::prelude::*;

#[derive(Clone, Debug)]
struct Case {
    tokens: usize,
    slots: usize,
    experts: usize,
    d: usize,
    f: usize,
    /// Per-expert ranks of the gate, up and down banks (`None`: no LoRA there).
    ranks: [Option<Vec<usize>>; 3],
    scales: [f32; 3],
    activation: Activation,
    dtype: DType,
    seed: u64,
    schedule: Schedule,
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (0usize..=40, 1usize..=3, 1usize..=6, 1usize..=70, 1usize..=300, 0usize..3, any::<u64>(), 0u8..4).prop_map(
        |(tokens, slots, experts, d, f, dt, seed, sch)| {
            let mut rng = Rng::new(seed ^ 0xff4);
            // A bank's total rank is positive (the model's rank layouts are).
            let bank = |rng: &mut Rng| {
                (rng.below(5) != 0).then(|| {
                    let mut r: Vec<usize> = (0..experts).map(|_| [0, 1, 3, 8, 16, 29, 64][rng.below(7)]).collect();
                    if r.iter().all(|&v| v == 0) {
                        r[rng.below(experts)] = 5;
                    }
                    r
                })
            };
            let ranks = [bank(&mut rng), bank(&mut rng), bank(&mut rng)];
            let scales = [0.5f32, 2.0, -1.25, 1.0].map(|s| s * if rng.below(2) == 0 { 1.0 } else { 0.5 });
            Case {
                tokens,
                slots: slots.min(experts),
                experts,
                d,
                f,
                ranks,
                scales: [scales[0], scales[1], scales[2]],
                activation: if rng.below(2) == 0 { Activation::Silu } else { Activation::Gelu },
                dtype: DType::ALL[dt],
                seed,
                schedule: match sch {
                    0 => Schedule::Forward,
                    1 => Schedule::Reverse,
                    _ => Schedule::Seeded(seed),
                },
            }
        },
    )
}

fn offsets(ranks: &[usize]) -> Vec<usize> {
    std::iter::once(0).chain(ranks.iter().scan(0, |acc, r| Some(*acc + r).inspect(|v| *acc = *v))).collect()
}

/// `v` rounded to `T`, as `T` and back in f64.
fn rounded<T: Scalar>(v: &[f64]) -> (Vec<T>, Vec<f64>) {
    let t: Vec<T> = v.iter().map(|&x| T::from_f64(x)).collect();
    let back = t.iter().map(|x| x.to_f64()).collect();
    (t, back)
}

/// `a [m, k] · b [k, n]` in f64.
fn matmul(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..k {
            let av = a[i * k + j];
            out[i * n..(i + 1) * n].iter_mut().zip(&b[j * n..(j + 1) * n]).for_each(|(o, bv)| *o += av * bv);
        }
    }
    out
}

fn buffer<T: bytemuck::Pod>(name: &str, v: &[T]) -> Buffer<T> {
    if v.is_empty() {
        Buffer::poisoned(name, 1)
    } else {
        Buffer::from_slice(name, v)
    }
}

/// One bank: rank offsets, `A [n_in, R]`, `B [R, n_out]` (rounded; in f64 and as `T`), scale.
struct Bank<T> {
    offs: Vec<usize>,
    a: Vec<f64>,
    b: Vec<f64>,
    a_t: Vec<T>,
    b_t: Vec<T>,
    scale: f64,
}

/// What one case produced: `a_mix` and `y`, in f64.
type Outputs = (Vec<f64>, Vec<f64>);

fn run_case(c: &Case) -> Result<Outputs, TestCaseError> {
    match c.dtype {
        DType::F32 => run_typed::<f32>(c),
        DType::F16 => run_typed::<f16>(c),
        DType::BF16 => run_typed::<bf16>(c),
    }
}

fn run_typed<T: Scalar + bytemuck::Pod>(c: &Case) -> Result<Outputs, TestCaseError> {
    let fail = |e: String| TestCaseError::fail(format!("{e}\n{c:?}"));
    let mut rng = Rng::new(c.seed);
    let (t_n, e_n, slots, d, f) = (c.tokens, c.experts, c.slots, c.d, c.f);
    // Routing: distinct experts per token, about 10% empty slots, f32-exact weights.
    let mut ids = vec![-1i32; t_n * slots];
    let mut w = vec![0.0f64; t_n * slots];
    let mut dense_w = vec![0.0f64; t_n * e_n];
    for t in 0..t_n {
        let first = rng.below(e_n);
        for s in 0..slots {
            if rng.below(10) == 0 {
                continue;
            }
            let e = (first + s) % e_n;
            ids[t * slots + s] = e as i32;
            w[t * slots + s] = rng.range(-1.0, 1.0) as f32 as f64;
            dense_w[t * e_n + e] = w[t * slots + s];
        }
    }
    let mut gen = |n: usize, amp: f64| -> Vec<f64> { (0..n).map(|_| rng.range(-amp, amp)).collect() };
    let (x_t, x) = rounded::<T>(&gen(t_n * d, 1.0));
    let (_, wg) = rounded::<T>(&gen(d * f, 0.5));
    let (_, wu) = rounded::<T>(&gen(d * f, 0.5));
    let (_, wd) = rounded::<T>(&gen(f * d, 0.5));
    let dims = [(d, f), (d, f), (f, d)];
    let mut banks: Vec<Option<Bank<T>>> = Vec::new();
    for ((ranks, (n_in, n_out)), scale) in c.ranks.iter().zip(dims).zip(c.scales) {
        banks.push(ranks.as_ref().map(|ranks| {
            let offs = offsets(ranks);
            let r = *offs.last().unwrap();
            let (a_t, a) = rounded::<T>(&gen(n_in * r, 0.5));
            let (b_t, b) = rounded::<T>(&gen(r * n_out, 0.5));
            Bank { offs, a, b, a_t, b_t, scale: scale as f64 }
        }));
    }
    let bank = |p: usize| banks[p].as_ref();

    // The caller's base projections, rounded to the dtype.
    let (g_t, g_base) = rounded::<T>(&matmul(&x, &wg, t_n, d, f));
    let (u_t, u_base) = rounded::<T>(&matmul(&x, &wu, t_n, d, f));

    let sgmv_build = sgmv::build(c.dtype, SgmvConfig::DEFAULT);
    let ffn_build = ffn::build(c.dtype, FfnConfig::DEFAULT);
    let plans =
        SlotPlans::build(&ids, t_n, slots, e_n, SgmvConfig::DEFAULT.bm as usize).map_err(|e| fail(e.to_string()))?;
    let offs32: Vec<Option<Vec<u32>>> =
        (0..3).map(|p| bank(p).map(|b| b.offs.iter().map(|&o| o as u32).collect())).collect();
    let kbank = |p: usize| offs32[p].as_ref().map(|o| FfnBank { rank_offsets: o, scale: c.scales[p] });
    let shape = FfnShape {
        tokens: t_n,
        slots,
        experts: e_n,
        d,
        f,
        activation: c.activation,
        gate: kbank(0),
        up: kbank(1),
        down: kbank(2),
    };
    let p = ffn::plan(&sgmv_build, &ffn_build, shape, plans.entry_stride).map_err(|e| fail(e.to_string()))?;

    let w32: Vec<f32> = w.iter().map(|&v| v as f32).collect();
    let x_buf = buffer("x", &x_t);
    let g_buf = buffer("gate_out", &g_t);
    let u_buf = buffer("up_out", &u_t);
    let po_buf = buffer("plan_offsets", &plans.offsets);
    let pe_buf: Buffer<TokenSlot> = buffer("plan_entries", &plans.entries);
    let w_buf = buffer("route_weights", &w32);
    let a_mix_buf = Buffer::<T>::poisoned("a_mix", (t_n * f).max(1));
    let nonempty = |n: usize| n.max(1);
    let parts = [Buf::GatePartials, Buf::UpPartials, Buf::DownPartials]
        .map(|b| Buffer::<f32>::poisoned(b.name(), nonempty(p.lens.get(b))));
    let names = [
        (Buf::GateA, Buf::GateB, Buf::GateRankOffsets),
        (Buf::UpA, Buf::UpB, Buf::UpRankOffsets),
        (Buf::DownA, Buf::DownB, Buf::DownRankOffsets),
    ];
    type BankBuffers<T> = (Buffer<T>, Buffer<T>, Buffer<u32>);
    let bank_bufs: Vec<Option<BankBuffers<T>>> = (0..3)
        .map(|i| {
            bank(i).map(|b| {
                let offs = offs32[i].as_ref().unwrap();
                (buffer(names[i].0.name(), &b.a_t), buffer(names[i].1.name(), &b.b_t), buffer("offs", offs))
            })
        })
        .collect();
    let mut binds = Bindings::new();
    let mut bind = |buf: Buf, ptr: u64, len: usize| {
        binds.sized(buf, ptr, len);
    };
    bind(Buf::X, x_buf.device_ptr(), x_buf.len());
    bind(Buf::GateOut, g_buf.device_ptr(), g_buf.len());
    bind(Buf::UpOut, u_buf.device_ptr(), u_buf.len());
    bind(Buf::PlanOffsets, po_buf.device_ptr(), po_buf.len());
    bind(Buf::PlanEntries, pe_buf.device_ptr(), pe_buf.len());
    bind(Buf::RouteWeights, w_buf.device_ptr(), w_buf.len());
    bind(Buf::AMix, a_mix_buf.device_ptr(), a_mix_buf.len());
    for (b, part) in [Buf::GatePartials, Buf::UpPartials, Buf::DownPartials].into_iter().zip(&parts) {
        bind(b, part.device_ptr(), part.len());
    }
    for (i, bufs) in bank_bufs.iter().enumerate() {
        if let Some((a, b, o)) = bufs {
            bind(names[i].0, a.device_ptr(), a.len());
            bind(names[i].1, b.device_ptr(), b.len());
            bind(names[i].2, o.device_ptr(), o.len());
        }
    }
    let mut host = HostBackend::new(c.schedule);
    // SAFETY: every bound address is a live host-execution buffer of the bound length.
    unsafe { ffn::run_activation(&sgmv_build, &ffn_build, &p, &binds, &mut host) }.map_err(|e| fail(e.to_string()))?;
    let a_mix: Vec<f64> = a_mix_buf.read().iter().take(t_n * f).map(|v| v.to_f64()).collect();
    // The caller's base down projection on the kernels' a_mix, rounded to the dtype.
    let (y0_t, y0) = rounded::<T>(&matmul(&a_mix, &wd, t_n, f, d));
    let y_buf = buffer("y", &y0_t);
    binds.sized(Buf::Y, y_buf.device_ptr(), y_buf.len());
    // SAFETY: as above; the down partials were written by the first half.
    unsafe { ffn::run_down_delta(&sgmv_build, &ffn_build, &p, &binds, &mut host) }.map_err(|e| fail(e.to_string()))?;
    let y: Vec<f64> = y_buf.read().iter().take(t_n * d).map(|v| v.to_f64()).collect();

    // The reference: the block with the routing as given weights (every expert a slot; the
    // unselected ones weigh 0).
    let lora = |p: usize| {
        bank(p).map(|b| ProjectionLora { ranks: RankLayout::from_offsets(b.offs.clone()).unwrap(), scale: b.scale })
    };
    let spec = FfnSpec {
        d,
        f,
        activation: c.activation,
        gating: Gating::Given { top_k: None, softmax_topk: false },
        experts: e_n,
        gate: lora(0),
        up: lora(1),
        down: lora(2),
    };
    let inputs = FfnInputs {
        weights: Some(&dense_w[..]),
        gate_a: bank(0).map(|b| &b.a[..]),
        gate_b: bank(0).map(|b| &b.b[..]),
        up_a: bank(1).map(|b| &b.a[..]),
        up_b: bank(1).map(|b| &b.b[..]),
        down_a: bank(2).map(|b| &b.a[..]),
        down_b: bank(2).map(|b| &b.b[..]),
        ..FfnInputs::new(t_n, &x[..], &wg[..], &wu[..], &wd[..])
    };
    let want = ffn_forward(&spec, &inputs).map_err(|e| fail(e.to_string()))?;

    // Bounds (see the file's documentation).
    let u_dt = c.dtype.unit_roundoff();
    let r_max = (0..3).filter_map(bank).map(|b| b.offs.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0)).max();
    let n = d + f + r_max.unwrap_or(0) + p.params.f_splits as usize + 8;
    // f32 arithmetic (f32 intermediates, f32 accumulation) over at most n terms.
    let tau = tolerance_with(f64::powi(2.0, -24), f64::powi(2.0, -24), n);
    const L: f64 = 1.13;
    // Half the spacing of the dtype's subnormals: a rounding's absolute error near zero.
    let tiny = match c.dtype {
        DType::F16 => f64::powi(2.0, -25),
        DType::BF16 => f64::powi(2.0, -134),
        DType::F32 => f64::powi(2.0, -150),
    };
    for t in 0..t_n {
        let xr = &x[t * d..(t + 1) * d];
        let (mut mix_bound, mut mix_abs) = (vec![0.0f64; f], vec![0.0f64; f]);
        let (mut delta_bound, mut y_abs) = (vec![0.0f64; d], vec![0.0f64; d]);
        for s in 0..slots {
            let id = ids[t * slots + s];
            if id < 0 {
                continue;
            }
            let (e, ws) = (id as usize, w[t * slots + s]);
            // Per projection: the value (f64) and its absolute-sum magnitude, columns [f].
            let project = |p: usize, base: &[f64]| -> (Vec<f64>, Vec<f64>) {
                let row = &base[t * f..(t + 1) * f];
                let (mut v, mut m): (Vec<f64>, Vec<f64>) = (row.to_vec(), row.iter().map(|b| b.abs()).collect());
                if let Some(b) = bank(p) {
                    let r = *b.offs.last().unwrap();
                    for col in b.offs[e]..b.offs[e + 1] {
                        let h: f64 = (0..d).map(|k| xr[k] * b.a[k * r + col]).sum();
                        let habs: f64 = (0..d).map(|k| (xr[k] * b.a[k * r + col]).abs()).sum();
                        for j in 0..f {
                            v[j] += b.scale * h * b.b[col * f + j];
                            m[j] += (b.scale * habs * b.b[col * f + j]).abs();
                        }
                    }
                }
                (v, m)
            };
            let ((g, gm), (uu, um)) = (project(0, &g_base), project(1, &u_base));
            let mut da = vec![0.0f64; f];
            let mut a = vec![0.0f64; f];
            for j in 0..f {
                // G and U arrive rounded to the dtype; the LoRA delta and the sum are f32.
                let dg = u_dt * g_base[t * f + j].abs() + tau * gm[j];
                let du = u_dt * u_base[t * f + j].abs() + tau * um[j];
                let act = c.activation.apply(g[j]);
                a[j] = act * uu[j];
                da[j] = L * dg * (uu[j].abs() + du) + act.abs() * du + f64::powi(2.0, -20) * a[j].abs();
                mix_bound[j] += ws.abs() * da[j];
                mix_abs[j] += (ws * a[j]).abs();
            }
            if let Some(b) = bank(2) {
                let r = *b.offs.last().unwrap();
                for col in b.offs[e]..b.offs[e + 1] {
                    let hd: f64 = (0..f).map(|j| a[j] * b.a[j * r + col]).sum();
                    let hd_abs: f64 = (0..f).map(|j| (a[j] * b.a[j * r + col]).abs()).sum();
                    let dhd: f64 = (0..f).map(|j| da[j] * b.a[j * r + col].abs()).sum::<f64>() + tau * hd_abs;
                    for (m, (db, ya)) in delta_bound.iter_mut().zip(&mut y_abs).enumerate() {
                        let coef = (ws * b.scale * b.b[col * d + m]).abs();
                        *db += coef * (dhd + tau * (hd.abs() + dhd));
                        *ya += coef * hd_abs;
                    }
                }
            }
        }
        for j in 0..f {
            let i = t * f + j;
            // Headroom 2 on the first-order terms: an f16 a_mix in the subnormal range once came out
            // at 1.2 times them (a = 5.0e-6, |err| 5.0e-8 against 4.1e-8).
            let lim = 2.0 * (mix_bound[j] + (slots as f64 * u_dt + tau) * mix_abs[j]) + slots as f64 * tiny;
            prop_assert!(
                (a_mix[i] - want.a_mix[i]).abs() <= lim,
                "a_mix[{t},{j}] = {}, want {} (|err| {:.3e} > {lim:.3e})\n{c:?}",
                a_mix[i],
                want.a_mix[i],
                (a_mix[i] - want.a_mix[i]).abs()
            );
        }
        // y starts from the caller's y0 = a_mix·W_down on the kernels' a_mix (checked above):
        // what is left is the down-LoRA delta, the reference's `y - a_mix·W_down`.
        let ref_base = matmul(&want.a_mix[t * f..(t + 1) * f], &wd, 1, f, d);
        for m in 0..d {
            let i = t * d + m;
            let expect = y0[i] + (want.y[i] - ref_base[m]);
            let lim = delta_bound[m] + tau * y_abs[m] + slots as f64 * (u_dt * y0[i].abs().max(y[i].abs()) + tiny);
            prop_assert!(
                (y[i] - expect).abs() <= lim,
                "y[{t},{m}] = {}, want {expect} (|err| {:.3e} > {lim:.3e})\n{c:?}",
                y[i],
                (y[i] - expect).abs()
            );
        }
    }
    Ok((a_mix, y))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn ffn_block_matches_the_reference(c in case_strategy()) {
        run_case(&c)?;
    }

    /// One writer per element and pass, slices and slots summed in a fixed order: bit-identical
    /// under any thread schedule.
    #[test]
    fn ffn_block_is_deterministic_across_schedules(c in case_strategy()) {
        let first = run_case(&Case { schedule: Schedule::Forward, ..c.clone() })?;
        let again = run_case(&Case { schedule: Schedule::Seeded(c.seed.wrapping_add(7)), ..c.clone() })?;
        let same = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        prop_assert!(same(&first.0, &again.0) && same(&first.1, &again.1), "results differ\n{c:?}");
    }
}

/// LoRA on the down projection alone, with several steps per f-slice: the one barrier between a
/// step's down shrink (reading the activation tile) and the next step's writes to it is the only
/// one in the loop.
#[test]
fn ffn_block_with_down_lora_only() {
    for schedule in [Schedule::Reverse, Schedule::Seeded(5)] {
        let c = Case {
            tokens: 19,
            slots: 2,
            experts: 3,
            d: 24,
            f: 1000,
            ranks: [None, None, Some(vec![4, 0, 9])],
            scales: [1.0, 1.0, 1.5],
            activation: Activation::Gelu,
            dtype: DType::BF16,
            seed: 4,
            schedule,
        };
        run_case(&c).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// MixLoRA's shape scaled down: every bank at rank 16 (the largest the plans pass in one chunk
/// and more), eight experts, two slots, `f` spanning all eight f-slices.
#[test]
fn ffn_block_at_a_mixlora_like_shape() {
    for (dtype, activation) in
        [(DType::BF16, Activation::Silu), (DType::F16, Activation::Gelu), (DType::F32, Activation::Silu)]
    {
        let ranks = Some(vec![16; 8]);
        let c = Case {
            tokens: 37,
            slots: 2,
            experts: 8,
            d: 96,
            f: 520,
            ranks: [ranks.clone(), ranks.clone(), ranks],
            scales: [2.0, 2.0, 2.0],
            activation,
            dtype,
            seed: 11,
            schedule: Schedule::Seeded(3),
        };
        let (a_mix, y) = run_case(&c).unwrap_or_else(|e| panic!("{e}"));
        assert!(a_mix.iter().any(|v| v.abs() > 1e-2) && y.iter().any(|v| v.abs() > 1e-2));
    }
}
