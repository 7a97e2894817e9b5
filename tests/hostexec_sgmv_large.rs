//! Index arithmetic past 2^32 elements in the SGMV kernels (`kernels/sgmv.cu`): `x` holds
//! 4100 tokens of `d_in = 2^20` (8.6 GB of bf16), so the rows of tokens 4096.. start at element
//! 2^32 and beyond; an offset computed in 32 bits (`t * d_in` before widening) reads row
//! `t - 4096` instead. The buffer's pages are mapped only where written (a few rows), so the
//! test needs little memory; it runs the tensor-core and the FMA shrink.

use half::bf16;
use mole::kernels::exec::{Bindings, Buf};
use mole::kernels::sgmv::{self, SgmvConfig, SgmvShape, SlotPlans};
use mole::reference::tolerance;
use mole::DType;
use mole_hostexec::{Buffer, Schedule};

mod host;
use host::HostBackend;

const D_IN: usize = 1 << 20;
const TOKENS: usize = 4100;
const RANK: usize = 16;
const D_OUT: usize = 16;
/// Routed tokens: two below the 2^32 boundary, three past it (4096 * 2^20 = 2^32).
const ROUTED: [usize; 5] = [0, 1, 4096, 4097, 4099];
/// Non-zero entries per routed row of x, spread over all of d_in.
const NONZERO: usize = 256;

fn lcg(s: &mut u64) -> u64 {
    *s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    *s >> 33
}

/// A dyadic value `k / denom`, `|k| <= span`, never 0.
fn dyadic(s: &mut u64, span: u64, denom: f32) -> f32 {
    let k = (lcg(s) % (2 * span)) as i64 - span as i64;
    (if k >= 0 { k + 1 } else { k }) as f32 / denom
}

#[test]
fn shrink_offsets_past_2_pow_32_elements() {
    let mut s = 7u64;
    let mut x = Buffer::<bf16>::lazy_zeroed("x", TOKENS * D_IN);
    // Sparse rows: h = x . A sums NONZERO dyadic products, exact in f32 whatever the order.
    let mut rows: Vec<Vec<(usize, f32)>> = Vec::new();
    for &t in &ROUTED {
        let mut row = vec![bf16::ZERO; D_IN];
        let entries: Vec<(usize, f32)> = (0..NONZERO)
            .map(|i| ((t * 7919 + i * 4093 + (lcg(&mut s) as usize % 7)) % D_IN, dyadic(&mut s, 16, 16.0)))
            .collect();
        for &(k, v) in &entries {
            row[k] = bf16::from_f32(v);
        }
        x.write_at(t * D_IN, &row);
        rows.push(entries.iter().map(|&(k, _)| (k, row[k].to_f32())).collect());
    }
    let a: Vec<bf16> = (0..D_IN * RANK).map(|_| bf16::from_f32(dyadic(&mut s, 32, 256.0))).collect();
    let b: Vec<bf16> = (0..RANK * D_OUT).map(|_| bf16::from_f32(dyadic(&mut s, 8, 8.0))).collect();
    let y0: Vec<bf16> = (0..TOKENS * D_OUT).map(|_| bf16::from_f32(dyadic(&mut s, 8, 4.0))).collect();
    let scale = 0.5f32;

    let mut ids = vec![-1i32; TOKENS];
    let weights: Vec<f32> = (0..TOKENS).map(|t| if ROUTED.contains(&t) { 1.0 } else { 0.0 }).collect();
    for &t in &ROUTED {
        ids[t] = 0;
    }
    let dtype = DType::BF16;
    let bm = SgmvConfig::DEFAULT.bm as usize;
    let plans = SlotPlans::build(&ids, TOKENS, 1, 1, bm).unwrap();
    let offs = [0u32, RANK as u32];
    let shape = SgmvShape { tokens: TOKENS, slots: 1, d_in: D_IN, d_out: D_OUT, scale, expert_scales: false };
    let p = sgmv::plan(&sgmv::build(dtype, SgmvConfig::DEFAULT), shape, &offs, plans.entry_stride).unwrap();
    let build = sgmv::build(dtype, SgmvConfig::DEFAULT);
    let shrink = p.shrink.unwrap();
    assert!(
        std::ptr::eq(shrink.kernel, &sgmv::kernel::SHRINK_MMA),
        "bf16 with d_in % 8 == 0 takes the tensor-core shrink"
    );

    let (ab, bb) = (Buffer::from_slice("a", &a), Buffer::from_slice("b", &b));
    let ro = Buffer::from_slice("rank_offsets", &offs);
    let po = Buffer::from_slice("plan_offsets", &plans.offsets);
    let pe = Buffer::from_slice("plan_entries", &plans.entries);
    let wb = Buffer::from_slice("weights", &weights);
    for plan in [p.clone(), p.clone().with_fma_shrink()] {
        let y = Buffer::from_slice("y", &y0);
        let h = Buffer::<f32>::poisoned("h_part", p.lens.get(Buf::Partials));
        let mut binds = Bindings::new();
        binds.raw(Buf::X, x.device_ptr()).raw(Buf::A, ab.device_ptr()).raw(Buf::B, bb.device_ptr());
        binds.raw(Buf::RankOffsets, ro.device_ptr()).raw(Buf::PlanOffsets, po.device_ptr());
        binds.raw(Buf::PlanEntries, pe.device_ptr()).raw(Buf::RouteWeights, wb.device_ptr());
        binds.raw(Buf::Partials, h.device_ptr()).raw(Buf::Y, y.device_ptr());
        // SAFETY: every bound address is a live host-execution buffer of the plan's length.
        unsafe { sgmv::run(&build, &plan, &binds, &mut HostBackend::new(Schedule::Seeded(3))) }.unwrap();
        let shrink_entry = plan.shrink.unwrap().kernel.name;
        let got = y.read();
        let tol = tolerance(dtype, RANK + p.params.splits as usize + 8);
        for (row, &t) in rows.iter().zip(&ROUTED) {
            let hv: Vec<f64> =
                (0..RANK).map(|c| row.iter().map(|&(k, v)| v as f64 * a[k * RANK + c].to_f64()).sum::<f64>()).collect();
            for n in 0..D_OUT {
                let terms = (0..RANK).map(|c| scale as f64 * hv[c] * b[c * D_OUT + n].to_f64());
                let want = y0[t * D_OUT + n].to_f64() + terms.clone().sum::<f64>();
                let bound = tol * (y0[t * D_OUT + n].to_f64().abs() + terms.map(f64::abs).sum::<f64>());
                let g = got[t * D_OUT + n].to_f64();
                assert!((g - want).abs() <= bound, "{shrink_entry}: y[{t},{n}] = {g}, want {want} (bound {bound})");
            }
        }
    }
}
