//! Tensor-core emulation: mma against a plain matrix product (bf16 and f16, f32 accumulate),
//! ldmatrix in every form against direct indexing, cp.async group semantics, and a GEMM tile
//! that chains cp.async, ldmatrix and mma.

use half::{bf16, f16};
use mole_hostexec::{Arg, Buffer, ErrorKind, Kernel, LaunchConfig, MmaAccumulation, Schedule};

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
        for (schedule, mode) in Schedule::sweep([9]).into_iter().zip(MODES.into_iter().cycle()) {
            let args = [Arg::buffer(&ab), Arg::buffer(&bb), Arg::buffer(&cb), Arg::buffer(&d)];
            kernel(name).launch(&LaunchConfig::new(1, 32).schedule(schedule).mma(mode), &args).unwrap();
            assert_eq!(d.read(), want, "{name} under {schedule:?}, {mode:?}");
        }
    }
}

/// Both accumulation modes: every exact-data result must hold under each.
const MODES: [MmaAccumulation; 2] = [MmaAccumulation::Truncating, MmaAccumulation::Exact];

/// D[0][0] of a bf16 mma with C[0][0] = `c`, A[0][k] = `a[k]`, B[k][0] = `b[k]`, all else 0.
fn mma_corner(c: f32, a: &[f32], b: &[f32], mode: MmaAccumulation) -> f32 {
    let (mut am, mut bm, mut cm) = (vec![0.0f32; 256], vec![0.0f32; 128], vec![0.0f32; 128]);
    am[..a.len()].copy_from_slice(a);
    for (k, &v) in b.iter().enumerate() {
        bm[8 * k] = v;
    }
    cm[0] = c;
    let to_bits = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x).to_bits()).collect::<Vec<u16>>();
    let (ab, bb, cb) =
        (Buffer::from_slice("a", &to_bits(&am)), Buffer::from_slice("b", &to_bits(&bm)), Buffer::from_slice("c", &cm));
    let d = Buffer::<f32>::poisoned("d", 128);
    let args = [Arg::buffer(&ab), Arg::buffer(&bb), Arg::buffer(&cb), Arg::buffer(&d)];
    kernel("mma_bf16_direct").launch(&LaunchConfig::new(1, 32).mma(mode), &args).unwrap();
    d.read()[0]
}

#[test]
fn mma_keeps_bits_below_the_f32_sum_in_both_modes() {
    // 1 + 2^-24 + 2^-24 is 1 + 2^-23 exactly; summing in f32 step by step would give 1. The
    // tensor cores keep 3 bits below the significand of the largest term, so they agree.
    let p = 2f32.powi(-12);
    for mode in MODES {
        assert_eq!(mma_corner(1.0, &[p, p], &[p, p], mode), 1.0 + 2f32.powi(-23), "{mode:?}");
    }
}

#[test]
fn mma_truncates_like_tensor_cores_unless_asked_to_be_exact() {
    // 1 - 2^-26: rounded to nearest it is 1, truncated (as the tensor cores do) 1 - 2^-24. A
    // test that expects the exact emulator's 1 does not hold on hardware.
    let p = 2f32.powi(-13);
    assert_eq!(mma_corner(1.0, &[p], &[-p], MmaAccumulation::Exact), 1.0);
    assert_eq!(mma_corner(1.0, &[p], &[-p], MmaAccumulation::Truncating), 1.0 - 2f32.powi(-24));
    // A term 4 bits below the last kept one is dropped: 1 + 2^-28 truncates to 1, and so does
    // 1 - 2^-28 plus 0 (truncation, toward zero, of the aligned term).
    let q = 2f32.powi(-14);
    assert_eq!(mma_corner(1.0, &[q], &[q], MmaAccumulation::Truncating), 1.0);
    assert_eq!(mma_corner(1.0, &[q], &[-q], MmaAccumulation::Truncating), 1.0);
    // Products beyond the first 8 join in a second step: the truncated first block carries.
    let mut a = vec![0.0f32; 16];
    let mut b = vec![0.0f32; 16];
    a[0] = p;
    b[0] = -p;
    a[8] = 1.0;
    b[8] = 2f32.powi(-24);
    assert_eq!(mma_corner(1.0, &a, &b, MmaAccumulation::Truncating), 1.0);
    assert_eq!(mma_corner(1.0, &a, &b, MmaAccumulation::Exact), 1.0);
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

fn gemm(name: &str, schedule: Schedule, mode: MmaAccumulation) -> (Vec<f32>, Vec<f32>) {
    let (a, b, c) = (dyadic(5, 32 * 32), dyadic(6, 32 * 8), dyadic(7, 32 * 8));
    let to_bits = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x).to_bits()).collect::<Vec<u16>>();
    let (ab, bb, cb) =
        (Buffer::from_slice("a", &to_bits(&a)), Buffer::from_slice("b", &to_bits(&b)), Buffer::from_slice("c", &c));
    let d = Buffer::<f32>::poisoned("d", 32 * 8);
    let args = [Arg::buffer(&ab), Arg::buffer(&bb), Arg::buffer(&cb), Arg::buffer(&d)];
    kernel(name).launch(&LaunchConfig::new(1, 64).schedule(schedule).mma(mode), &args).unwrap();
    (d.read(), matmul(&a, &b, &c, 32, 32, 8))
}

#[test]
fn gemm_tile_through_cp_async_ldmatrix_and_mma() {
    for schedule in Schedule::sweep([1, 2, 3]) {
        for mode in MODES {
            let (got, want) = gemm("gemm_cp_async", schedule, mode);
            assert_eq!(got, want, "{schedule:?}, {mode:?}");
        }
    }
}

#[test]
fn a_missing_cp_async_wait_reads_poison() {
    let (got, _) = gemm("gemm_cp_async_missing_wait", Schedule::Forward, MmaAccumulation::Exact);
    assert!(got.iter().all(|v| v.is_nan()), "the un-awaited half of K must poison every output: {got:?}");
}

fn pipelined(name: &str, schedule: Schedule) -> (Vec<f32>, Vec<f32>) {
    let chunks = 5;
    let src: Vec<f32> = (0..64 * chunks).map(|i| (i % 13) as f32 - 6.0).collect();
    let sb = Buffer::from_slice("src", &src);
    let out = Buffer::<f32>::poisoned("out", 64);
    let args = [Arg::buffer(&sb), Arg::value(chunks as i32), Arg::buffer(&out)];
    kernel(name).launch(&LaunchConfig::new(1, 64).schedule(schedule), &args).unwrap();
    let want = (0..64).map(|t| (0..chunks).map(|c| src[64 * c + (t + 7 * c) % 64]).sum()).collect();
    (out.read(), want)
}

#[test]
fn a_double_buffered_cp_async_pipeline_is_right_under_every_schedule() {
    for schedule in Schedule::sweep([1, 2, 3]) {
        let (got, want) = pipelined("pipelined_sum_ok", schedule);
        assert_eq!(got, want, "{schedule:?}");
    }
}

#[test]
fn a_copy_into_a_buffer_other_threads_still_read_shows() {
    // The copy is issued before the barrier that says every thread is done with its buffer; it
    // lands one step later, after that barrier, so only poisoning the destination at issue
    // makes the early reader see it.
    let caught = Schedule::sweep([1, 2, 3]).into_iter().filter(|&s| {
        let (got, want) = pipelined("pipelined_sum_missing_barrier", s);
        got != want
    });
    assert!(caught.count() > 0, "a missing barrier before a cp.async went unnoticed under every schedule");
}
