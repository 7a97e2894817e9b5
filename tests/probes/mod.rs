//! The probe kernels of the host execution layer (`hostexec/tests/kernels/mma.cu`: `mma.sync`
//! bf16/f16 and `ldmatrix` in every form) on fixed inputs, their emulation, and the comparison
//! of two runs: shared by the CPU test (emulation against emulation and against plain matrix
//! products) and the GPU test (the device against the emulation), so the GPU comparison is
//! itself tested on every CPU run.

use half::{bf16, f16};
use mole_hostexec::{Arg, Buffer, Kernel, LaunchConfig, MmaAccumulation};

/// The probe kernels' source, for NVRTC.
#[allow(dead_code)] // used by the GPU test only
pub const MMA_CU: &str = include_str!("../../hostexec/tests/kernels/mma.cu");

/// One mma probe: 16-bit A [16][16] and B [16][8] bits, f32 C [16][8], row-major.
pub struct MmaCase {
    /// Entry point (`mma_bf16_direct` or `mma_f16_direct`).
    pub entry: &'static str,
    /// A bits.
    pub a: Vec<u16>,
    /// B bits.
    pub b: Vec<u16>,
    /// C.
    pub c: Vec<f32>,
    /// Whether every sum is exact in f32 (then any rounding agrees bit for bit).
    pub exact: bool,
}

fn stream(seed: u64) -> impl FnMut() -> u64 {
    let mut s = seed;
    move || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        s >> 33
    }
}

/// bf16 and f16 cases: dyadic data (exact sums) and spread data (real rounding).
pub fn mma_cases() -> Vec<MmaCase> {
    let mut out = Vec::new();
    for (entry, to_bits) in [
        ("mma_bf16_direct", (|v: f32| bf16::from_f32(v).to_bits()) as fn(f32) -> u16),
        ("mma_f16_direct", |v: f32| f16::from_f32(v).to_bits()),
    ] {
        for (seed, exact) in [(1u64, true), (2, false)] {
            let mut next = stream(seed);
            let mut value = |n: usize| -> Vec<f32> {
                (0..n)
                    .map(|_| {
                        let k = (next() % 33) as f32 - 16.0;
                        if exact {
                            k / 16.0
                        } else {
                            k * (1.0 + (next() % 1000) as f32 / 977.0) * 0.37
                        }
                    })
                    .collect()
            };
            let (a, b, c) = (value(256), value(128), value(128));
            out.push(MmaCase {
                entry,
                a: a.iter().map(|&v| to_bits(v)).collect(),
                b: b.iter().map(|&v| to_bits(v)).collect(),
                c,
                exact,
            });
        }
    }
    out
}

/// The 16-bit value of `bits` for `entry`'s type.
pub fn value(entry: &str, bits: u16) -> f64 {
    if entry.contains("bf16") {
        bf16::from_bits(bits).to_f64()
    } else {
        f16::from_bits(bits).to_f64()
    }
}

/// D = A B + C in f64, and the same on absolute values (the error scale).
pub fn mma_reference(case: &MmaCase) -> (Vec<f64>, Vec<f64>) {
    let (mut d, mut p) = (vec![0.0; 128], vec![0.0; 128]);
    for i in 0..16 {
        for j in 0..8 {
            let terms = (0..16).map(|k| value(case.entry, case.a[i * 16 + k]) * value(case.entry, case.b[k * 8 + j]));
            d[i * 8 + j] = case.c[i * 8 + j] as f64 + terms.clone().sum::<f64>();
            p[i * 8 + j] = (case.c[i * 8 + j] as f64).abs() + terms.map(f64::abs).sum::<f64>();
        }
    }
    (d, p)
}

/// `case` through the emulation.
pub fn emulate_mma(case: &MmaCase, mode: MmaAccumulation) -> Vec<f32> {
    let k = Kernel::find("tests/kernels/mma.cu", "", case.entry).unwrap();
    let (a, b, c) =
        (Buffer::from_slice("a", &case.a), Buffer::from_slice("b", &case.b), Buffer::from_slice("c", &case.c));
    let d = Buffer::<f32>::poisoned("d", 128);
    let args = [Arg::buffer(&a), Arg::buffer(&b), Arg::buffer(&c), Arg::buffer(&d)];
    k.launch(&LaunchConfig::new(1, 32).mma(mode), &args).unwrap();
    d.read()
}

/// Compares two runs of `case` (`got` from the device or one emulation mode, `want` from the
/// emulation): bit for bit on exact data, else each within 2^-18 of the error scale of the
/// reference (two f32 summations of 17 terms, each off by at most about 16 units of 2^-23
/// of it; a wrong fragment or a swapped operand is off by the size of a term).
pub fn compare_mma(case: &MmaCase, got: &[f32], want: &[f32]) -> Result<(), String> {
    let (exact, scale) = mma_reference(case);
    for i in 0..128 {
        let (g, w) = (got[i], want[i]);
        let ok = if case.exact {
            g.to_bits() == w.to_bits() && g as f64 == exact[i]
        } else {
            (g as f64 - w as f64).abs() <= scale[i] * 2f64.powi(-18)
        };
        if !ok {
            return Err(format!(
                "{} ({}): D[{}][{}] = {g}, expected {w}",
                case.entry,
                if case.exact { "exact data" } else { "spread data" },
                i / 8,
                i % 8
            ));
        }
    }
    Ok(())
}

/// The ldmatrix probe's input: 32 rows of 8 distinct u16 and the row each lane points at.
pub fn ldmatrix_input() -> (Vec<u16>, Vec<i32>) {
    let tile: Vec<u16> = (0..256).map(|i| i as u16 * 3 + 1).collect();
    let mut next = stream(4);
    let mut perm: Vec<i32> = (0..32).collect();
    for i in (1..32).rev() {
        perm.swap(i, next() as usize % (i + 1));
    }
    (tile, perm)
}

/// The ldmatrix modes of the probe kernel: 1, 2, 4 matrices, +8 for `.trans`.
pub const LDMATRIX_MODES: [i32; 6] = [1, 2, 4, 9, 10, 12];

/// The probe's 32 x 4 registers for `mode`, by the PTX ISA formulas.
pub fn ldmatrix_expected(tile: &[u16], perm: &[i32], mode: i32) -> Vec<u32> {
    let (num, trans) = ((mode & 7) as usize, mode & 8 != 0);
    let at = |m: usize, r: usize, c: usize| tile[perm[8 * m + r] as usize * 8 + c] as u32;
    let mut out = vec![0u32; 128];
    for lane in 0..32 {
        for m in 0..num {
            out[4 * lane + m] = if !trans {
                at(m, lane / 4, 2 * (lane % 4)) | at(m, lane / 4, 2 * (lane % 4) + 1) << 16
            } else {
                at(m, 2 * (lane % 4), lane / 4) | at(m, 2 * (lane % 4) + 1, lane / 4) << 16
            };
        }
    }
    out
}

/// The probe through the emulation.
pub fn emulate_ldmatrix(tile: &[u16], perm: &[i32], mode: i32) -> Vec<u32> {
    let k = Kernel::find("tests/kernels/mma.cu", "", "ldmatrix_modes").unwrap();
    let (tb, pb) = (Buffer::from_slice("tile", tile), Buffer::from_slice("perm", perm));
    let out = Buffer::<u32>::poisoned("out", 128);
    k.launch(&LaunchConfig::new(1, 32), &[Arg::buffer(&tb), Arg::buffer(&pb), Arg::value(mode), Arg::buffer(&out)])
        .unwrap();
    out.read()
}
