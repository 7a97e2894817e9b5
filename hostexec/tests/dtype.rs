//! The storage conversions every kernel stores and loads through (`common/dtype.cuh`), bit for
//! bit against the `half` crate: round to nearest even at every tie, into and out of the f16
//! subnormals, at the overflow boundary, signed zeros, infinities and NaN.

use half::{bf16, f16};
use mole_hostexec::{Arg, Buffer, Kernel, LaunchConfig};

fn kernel(name: &str) -> Kernel {
    Kernel::find("tests/kernels/dtype.cu", "", name).unwrap()
}

/// f32 bit patterns that probe each rounding: for both 16-bit formats, every tie (the dropped
/// bits exactly half) with an even and an odd kept bit, one ulp either side of it, across the
/// exponent range (f16 subnormals and overflow included), plus specials and a pseudo-random
/// spread.
fn probes() -> Vec<u32> {
    let mut v = vec![0, 0x8000_0000, 0x7f80_0000, 0xff80_0000, 0x7fc0_0000, 0xffc0_1234, 0x7f80_0001, 1, 0x8000_0001];
    for exp in 0u32..255 {
        for mantissa_hi in [0u32, 1, 2, 3, 0x3ff, 0x3fe, 0x7f, 0x7e] {
            let base = exp << 23;
            // bf16 keeps the top 7 mantissa bits: tie at bit 15.
            let bf = base | (mantissa_hi & 0x7f) << 16;
            // f16 (normal) keeps the top 10: tie at bit 12.
            let hf = base | (mantissa_hi & 0x3ff) << 13;
            for (kept, half) in [(bf, 0x8000u32), (hf, 0x1000)] {
                for x in [kept | half, (kept | half) - 1, (kept | half) + 1, kept] {
                    v.extend([x, x | 0x8000_0000]);
                }
            }
        }
        // f16 subnormal ties: for exponents 103..112 the dropped part is bits below 126 - exp.
        if (103..113).contains(&exp) {
            let shift = 126 - exp;
            for q in [0u32, 1, 2, 3, 0x155] {
                let sig = (q << shift | 1 << (shift - 1)) & 0x7f_ffff;
                v.extend([exp << 23 | sig, exp << 23 | sig.wrapping_sub(1) & 0x7f_ffff]);
            }
        }
    }
    v.extend([0x477f_e000, 0x477f_efff, 0x477f_f000, 0x477f_f001, 0x3300_0000, 0x3300_0001, 0x387f_e000]);
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..4096 {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        v.push((s >> 32) as u32);
    }
    v
}

/// Same bits, or both NaN with the same sign (NaN payloads are the formats' own business).
fn same<T: Copy + PartialEq + std::fmt::Debug>(got: T, want: T, nan: impl Fn(T) -> Option<bool>) -> bool {
    match (nan(got), nan(want)) {
        (Some(a), Some(b)) => a == b,
        _ => got == want,
    }
}

#[test]
fn every_store_rounds_like_the_half_crate_bit_for_bit() {
    let bits = probes();
    let n = bits.len();
    let input: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
    let ib = Buffer::from_slice("in", &input);
    let (h, b, f) = (Buffer::<u16>::poisoned("h", n), Buffer::<u16>::poisoned("b", n), Buffer::<u32>::poisoned("f", n));
    let cfg = LaunchConfig::new(n.div_ceil(128) as u32, 128);
    let args = [Arg::buffer(&ib), Arg::buffer(&h), Arg::buffer(&b), Arg::buffer(&f), Arg::value(n as u32)];
    kernel("dtype_stores").launch(&cfg, &args).unwrap();
    let (h, b, f) = (h.read(), b.read(), f.read());
    let sign_if_nan16 = |e: u16, m: u16| move |x: u16| (x & e == e && x & m != 0).then_some(x >> 15);
    for (i, &x) in input.iter().enumerate() {
        let want_h = f16::from_f32(x).to_bits();
        let want_b = bf16::from_f32(x).to_bits();
        let nan_h = sign_if_nan16(0x7c00, 0x3ff);
        let nan_b = sign_if_nan16(0x7f80, 0x7f);
        assert!(
            same(h[i], want_h, |v| nan_h(v).map(|s| s == 1)),
            "f16({:#010x}) = {:#06x}, want {want_h:#06x}",
            bits[i],
            h[i]
        );
        assert!(
            same(b[i], want_b, |v| nan_b(v).map(|s| s == 1)),
            "bf16({:#010x}) = {:#06x}, want {want_b:#06x}",
            bits[i],
            b[i]
        );
        assert_eq!(f[i], bits[i], "f32 store of {:#010x}", bits[i]);
    }
}

#[test]
fn every_load_widens_exactly() {
    let all: Vec<u16> = (0..=u16::MAX).collect();
    let n = all.len();
    let (h, b) = (Buffer::from_slice("h", &all), Buffer::from_slice("b", &all));
    let (hf, bf) = (Buffer::<u32>::poisoned("hf", n), Buffer::<u32>::poisoned("bf", n));
    let cfg = LaunchConfig::new(n.div_ceil(256) as u32, 256);
    let args = [Arg::buffer(&h), Arg::buffer(&b), Arg::buffer(&hf), Arg::buffer(&bf), Arg::value(n as u32)];
    kernel("dtype_loads").launch(&cfg, &args).unwrap();
    let (hf, bf) = (hf.read(), bf.read());
    for &x in &all {
        let (wh, wb) = (f16::from_bits(x).to_f32(), bf16::from_bits(x).to_f32());
        let (gh, gb) = (f32::from_bits(hf[x as usize]), f32::from_bits(bf[x as usize]));
        assert!(gh.to_bits() == wh.to_bits() || (gh.is_nan() && wh.is_nan()), "f16 {x:#06x}: {gh} vs {wh}");
        assert!(gb.to_bits() == wb.to_bits() || (gb.is_nan() && wb.is_nan()), "bf16 {x:#06x}: {gb} vs {wb}");
    }
}
