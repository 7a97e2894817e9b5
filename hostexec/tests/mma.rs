//! Tensor-core emulation: mma against a plain matrix product (bf16 and f16, f32 accumulate),
//! ldmatrix in every form against direct indexing, cp.async group semantics, and a GEMM tile
//! that chains cp.async, ldmatrix and mma.

use half::{bf16, f16};
use mole_hostexec::{Arg, Buffer, ErrorKind, Kernel, LaunchConfig, Schedule};

fn kernel(name: &str) -> Kernel {
    Kernel::find("tests/kernels/mma.cu", "", name).unwrap()
}

/// A deterministic stream of small integers.
fn stream(seed: u64) -> impl FnMut() -> i64 {
    let mut s = seed;
    move || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((s >> 33) % 17) as i64 - 8
    }
}

/// `len` multiples of 1/8 in [-1, 1]: exact in bf16 and f16, and every product sum below is
/// exact in f32, so results compare bit for bit.
fn dyadic(seed: u64, len: usize) -> Vec<f32> {
    let mut next = stream(seed);
    (0..len).map(|_| next() as f32 / 8.0).collect()
}

/// D = A B + C, row-major, `m x k` times `k x n`.
fn matmul(a: &[f32], b: &[f32], c: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut d = c.to_vec();
    for i in 0..m {
        for j in 0..n {
            d[i * n + j] += (0..k).map(|x| a[i * k + x] as f64 * b[x * n + j] as f64).sum::<f64>() as f32;
        }
    }
    d
}

#[test]
fn mma_matches_the_matrix_product_for_bf16_and_f16() {
    let (a, b, c) = (dyadic(1, 256), dyadic(2, 128), dyadic(3, 128));
    let want = matmul(&a, &b, &c, 16, 16, 8);
    let cb = Buffer::from_slice("c", &c);
    for (name, bits) in [
        ("mma_bf16_direct", (|v: f32| bf16::from_f32(v).to_bits()) as fn(f32) -> u16),
        ("mma_f16_direct", |v: f32| f16::from_f32(v).to_bits()),
    ] {
        let ab = Buffer::from_slice("a", &a.iter().map(|&v| bits(v)).collect::<Vec<_>>());
        let bb = Buffer::from_slice("b", &b.iter().map(|&v| bits(v)).collect::<Vec<_>>());
        let d = Buffer::<f32>::poisoned("d", 128);
        for schedule in Schedule::sweep([9]) {
            let args = [Arg::buffer(&ab), Arg::buffer(&bb), Arg::buffer(&cb), Arg::buffer(&d)];
            kernel(name).launch(&LaunchConfig::new(1, 32).schedule(schedule), &args).unwrap();
            assert_eq!(d.read(), want, "{name} under {schedule:?}");
        }
    }
}

#[test]
fn mma_rounds_once_from_the_exact_sum() {
    // 1 + 2^-24 + 2^-24 is 1 + 2^-23 exactly; summing in f32 step by step would give 1.
    let mut a = vec![0.0f32; 256];
    let mut b = vec![0.0f32; 128];
    a[0] = 2f32.powi(-12);
    a[1] = 2f32.powi(-12);
    b[0] = 2f32.powi(-12);
    b[8] = 2f32.powi(-12);
    let mut c = vec![0.0f32; 128];
    c[0] = 1.0;
    let to_bits = |v: &Vec<f32>| v.iter().map(|&x| bf16::from_f32(x).to_bits()).collect::<Vec<u16>>();
    let (ab, bb, cb) =
        (Buffer::from_slice("a", &to_bits(&a)), Buffer::from_slice("b", &to_bits(&b)), Buffer::from_slice("c", &c));
    let d = Buffer::<f32>::poisoned("d", 128);
    let args = [Arg::buffer(&ab), Arg::buffer(&bb), Arg::buffer(&cb), Arg::buffer(&d)];
    kernel("mma_bf16_direct").launch(&LaunchConfig::new(1, 32), &args).unwrap();
    assert_eq!(d.read()[0], 1.0 + 2f32.powi(-23));
}

#[test]
fn mma_needs_a_full_warp() {
    let h = Buffer::from_slice("h", &[0u16; 256]);
    let c = Buffer::from_slice("c", &[0.0f32; 128]);
    let d = Buffer::<f32>::poisoned("d", 128);
    let args = [Arg::buffer(&h), Arg::buffer(&h), Arg::buffer(&c), Arg::buffer(&d)];
    let err = kernel("mma_bf16_direct").launch(&LaunchConfig::new(1, 16), &args).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Misuse, "{err}");
    assert!(err.message.contains("mma.sync needs all 32 lanes of warp 0 (threads 0-15), a partial warp"), "{err}");
}

#[test]
fn ldmatrix_matches_direct_indexing_in_every_form() {
    // 32 rows of 8 distinct values; lane i hands in row perm[i] (rows need not be contiguous).
    let tile: Vec<u16> = (0..256).map(|i| i as u16 * 3 + 1).collect();
    let mut next = stream(4);
    let mut perm: Vec<i32> = (0..32).collect();
    for i in (1..32).rev() {
        perm.swap(i, next().unsigned_abs() as usize % (i + 1));
    }
    let (tb, pb) = (Buffer::from_slice("tile", &tile), Buffer::from_slice("perm", &perm));
    let out = Buffer::<u32>::poisoned("out", 128);
    for num in [1usize, 2, 4] {
        for trans in [false, true] {
            let mode = num as i32 + if trans { 8 } else { 0 };
            let args = [Arg::buffer(&tb), Arg::buffer(&pb), Arg::value(mode), Arg::buffer(&out)];
            kernel("ldmatrix_modes").launch(&LaunchConfig::new(1, 32).schedule(Schedule::Seeded(3)), &args).unwrap();
            let got = out.read();
            // Element (r, c) of matrix m: column c of the row lane 8m + r pointed at.
            let at = |m: usize, r: usize, c: usize| tile[perm[8 * m + r] as usize * 8 + c] as u32;
            for lane in 0..32 {
                for m in 0..4 {
                    let want = if m >= num {
                        0
                    } else if !trans {
                        at(m, lane / 4, 2 * (lane % 4)) | at(m, lane / 4, 2 * (lane % 4) + 1) << 16
                    } else {
                        at(m, 2 * (lane % 4), lane / 4) | at(m, 2 * (lane % 4) + 1, lane / 4) << 16
                    };
                    assert_eq!(got[4 * lane + m], want, "x{num} trans={trans} lane {lane} register {m}");
                }
            }
        }
    }
}

#[test]
fn cp_async_data_lands_only_at_the_covering_wait() {
    let src: Vec<f32> = (1..=40).map(|i| i as f32).collect();
    let sb = Buffer::from_slice("src", &src);
    let out = Buffer::<f32>::poisoned("out", 39);
    kernel("cp_async_groups").launch(&LaunchConfig::new(1, 32), &[Arg::buffer(&sb), Arg::buffer(&out)]).unwrap();
    let got: Vec<u32> = out.read().iter().map(|v| v.to_bits()).collect();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    assert_eq!(got[..8], bits(&src[..8]), "groups 0 and 1 landed at wait_group 2");
    assert_eq!(got[8..16], [u32::MAX; 8], "groups 2 and 3 still pending: shared memory holds poison");
    assert_eq!(got[16..32], bits(&src[..16]), "all four after wait_group 0");
    assert_eq!(got[32..36], bits(&[src[16], src[17], 0.0, 0.0]), "zero fill past the source size");
    assert_eq!(got[36..], bits(&[src[20], src[22], src[23]]), "4- and 8-byte copies");
}

#[test]
fn cp_async_into_global_memory_is_reported() {
    let src = Buffer::from_slice("src", &[1.0f32; 128]);
    let dst = Buffer::<f32>::poisoned("dst", 128);
    let err = kernel("cp_async_to_global")
        .launch(&LaunchConfig::new(1, 32), &[Arg::buffer(&src), Arg::buffer(&dst)])
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Misuse, "{err}");
    assert!(err.message.contains("cp.async at mma.cu:") && err.message.contains("is not in shared memory"), "{err}");
    assert!(err.message.ends_with("(thread (0,0,0) of block (0,0,0))"), "{err}");
}

fn gemm(name: &str, schedule: Schedule) -> (Vec<f32>, Vec<f32>) {
    let (a, b, c) = (dyadic(5, 32 * 32), dyadic(6, 32 * 8), dyadic(7, 32 * 8));
    let to_bits = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x).to_bits()).collect::<Vec<u16>>();
    let (ab, bb, cb) =
        (Buffer::from_slice("a", &to_bits(&a)), Buffer::from_slice("b", &to_bits(&b)), Buffer::from_slice("c", &c));
    let d = Buffer::<f32>::poisoned("d", 32 * 8);
    let args = [Arg::buffer(&ab), Arg::buffer(&bb), Arg::buffer(&cb), Arg::buffer(&d)];
    kernel(name).launch(&LaunchConfig::new(1, 64).schedule(schedule), &args).unwrap();
    (d.read(), matmul(&a, &b, &c, 32, 32, 8))
}

#[test]
fn gemm_tile_through_cp_async_ldmatrix_and_mma() {
    for schedule in Schedule::sweep([1, 2, 3]) {
        let (got, want) = gemm("gemm_cp_async", schedule);
        assert_eq!(got, want, "{schedule:?}");
    }
}

#[test]
fn a_missing_cp_async_wait_reads_poison() {
    let (got, _) = gemm("gemm_cp_async_missing_wait", Schedule::Forward);
    assert!(got.iter().all(|v| v.is_nan()), "the un-awaited half of K must poison every output: {got:?}");
}
