//! Warp collectives against a model of their CUDA semantics, and the misuses the layer reports.

use mole_hostexec::{Arg, Buffer, ErrorKind, Kernel, LaunchConfig, Schedule};

fn kernel(name: &str) -> Kernel {
    Kernel::find("tests/kernels/warp.cu", "", name).unwrap()
}

const POISON: i32 = -1; // what a shuffle from an exited or absent lane returns

/// The CUDA semantics of `warp_ops` for thread `t` of a block of `n` threads.
fn expected_warp_ops(x: &[i32], t: usize) -> [i32; 12] {
    let n = x.len();
    let (warp, lane) = (t / 32 * 32, t % 32);
    let lanes: Vec<usize> = (warp..(warp + 32).min(n)).collect();
    let read = |src: usize| if warp + src < n { x[warp + src] } else { POISON };
    let v = x[t];
    let shfl = |src: usize, width: usize| read(lane / width * width + src % width);
    let up = |d: usize, width: usize| if lane % width >= d { read(lane - d) } else { v };
    let down = |d: usize, width: usize| if lane % width + d < width { read(lane + d) } else { v };
    let xor = |m: usize, width: usize| {
        let src = lane ^ m;
        if src >= 32 || src / width > lane / width {
            v
        } else {
            read(src)
        }
    };
    let ballot = lanes.iter().filter(|&&i| x[i] % 3 == 0).fold(0u32, |b, &i| b | 1 << (i - warp));
    let matching = lanes.iter().filter(|&&i| x[i] % 4 == v % 4).fold(0u32, |b, &i| b | 1 << (i - warp));
    [
        shfl(lane * 7 % 32, 32),
        up(3, 32),
        down(5, 32),
        xor(6, 32),
        shfl(3, 8),
        up(2, 16),
        down(2, 16),
        xor(9, 8),
        ballot as i32,
        lanes.iter().all(|&i| x[i] >= 0) as i32,
        lanes.iter().any(|&i| x[i] == 5) as i32,
        matching as i32,
    ]
}

#[test]
fn shuffles_and_votes_match_cuda_semantics_including_a_partial_warp() {
    // 48 threads: warp 1 has 16 lanes; reading lanes 16-31 of it yields poison.
    let x: Vec<i32> = (0..48).map(|i| (i * 37 + 11) % 23).collect();
    let xb = Buffer::from_slice("x", &x);
    let out = Buffer::<i32>::poisoned("out", 48 * 12);
    for schedule in Schedule::sweep([5, 6]) {
        kernel("warp_ops")
            .launch(&LaunchConfig::new(1, 48).schedule(schedule), &[Arg::buffer(&xb), Arg::buffer(&out)])
            .unwrap();
        let got = out.read();
        for t in 0..48 {
            assert_eq!(got[12 * t..12 * t + 12], expected_warp_ops(&x, t), "thread {t} under {schedule:?}");
        }
    }
}

#[test]
fn warp_helpers_reduce_and_scan() {
    let x: Vec<f32> = (0..32).map(|i| ((i * 13) % 7) as f32 - 2.5).collect();
    let u: Vec<u32> = (0..32).map(|i| i * 3 + 1).collect();
    let (xb, ub) = (Buffer::from_slice("x", &x), Buffer::from_slice("u", &u));
    let out = Buffer::<f32>::poisoned("out", 4);
    let scan = Buffer::<u32>::poisoned("scan", 32);
    let args = [Arg::buffer(&xb), Arg::buffer(&ub), Arg::buffer(&out), Arg::buffer(&scan)];
    kernel("warp_helpers").launch(&LaunchConfig::new(1, 32).schedule(Schedule::Reverse), &args).unwrap();
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let first_max = x.iter().position(|&v| v == max).unwrap();
    let got = out.read();
    assert_eq!(got[0], x.iter().sum::<f32>());
    assert_eq!(got[1..], [max, max, first_max as f32], "argmax ties go to the lower lane");
    let want: Vec<u32> = u.iter().scan(0, |s, &v| Some(*s + v).inspect(|&n| *s = n)).collect();
    assert_eq!(scan.read(), want);
}

#[test]
fn shuffle_from_an_exited_lane_reads_poison() {
    let x: Vec<i32> = (0..32).collect();
    let xb = Buffer::from_slice("x", &x);
    let out = Buffer::<i32>::zeroed("out", 16);
    kernel("shfl_from_exited").launch(&LaunchConfig::new(1, 32), &[Arg::buffer(&xb), Arg::buffer(&out)]).unwrap();
    assert_eq!(out.read(), vec![POISON; 16]);
}

#[test]
fn a_shuffle_half_the_warp_skips_is_a_deadlock_naming_both_sites() {
    let x = Buffer::from_slice("x", &[1.0f32; 64]);
    let out = Buffer::<f32>::poisoned("out", 64);
    let err =
        kernel("shfl_divergent").launch(&LaunchConfig::new(1, 64), &[Arg::buffer(&x), Arg::buffer(&out)]).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Deadlock, "{err}");
    assert!(err.message.starts_with("kernel shfl_divergent: deadlock in block (0,0,0): "), "{err}");
    for part in [
        "threads 0-15 wait in __shfl_xor_sync (warp.cu:",
        "threads 16-31 wait at __syncthreads (warp.cu:",
        "threads 32-47 wait in __shfl_xor_sync (warp.cu:",
        "threads 48-63 wait at __syncthreads (warp.cu:",
    ] {
        assert!(err.message.contains(part), "{err}");
    }
}

#[test]
fn lanes_in_different_collectives_are_reported() {
    let out = Buffer::<i32>::poisoned("out", 32);
    let err = kernel("vote_mismatch").launch(&LaunchConfig::new(1, 32), &[Arg::buffer(&out)]).unwrap_err();
    assert_eq!(err.kind, ErrorKind::DivergentWarp, "{err}");
    assert!(err.message.contains("divergent warp collective in warp 0 (threads 0-31)"), "{err}");
    assert!(err.message.contains("threads 0-15 wait in __ballot_sync (warp.cu:"), "{err}");
    assert!(err.message.contains("threads 16-31 wait in __any_sync (warp.cu:"), "{err}");
}

#[test]
fn threads_at_different_barriers_are_reported() {
    let out = Buffer::<i32>::poisoned("out", 64);
    let err = kernel("barrier_divergent").launch(&LaunchConfig::new(1, 64), &[Arg::buffer(&out)]).unwrap_err();
    assert_eq!(err.kind, ErrorKind::DivergentBarrier, "{err}");
    assert!(err.message.contains("threads 0-31 wait at __syncthreads (warp.cu:"), "{err}");
    assert!(err.message.contains("threads 32-63 wait at __syncthreads (warp.cu:"), "{err}");
}

#[test]
fn shuffle_operands_count_only_their_low_five_bits() {
    // shfl.sync reads bits 0-4 of the lane or delta: 33 moves by 1, -1 is lane 31, 0xffffffff
    // is a delta of 31. Expected values: the ordinary shuffles with those operands.
    let x: Vec<i32> = (0..32).map(|i| (i * 29 + 5) % 31).collect();
    let xb = Buffer::from_slice("x", &x);
    let out = Buffer::<i32>::poisoned("out", 32 * 8);
    for schedule in Schedule::sweep([7]) {
        kernel("shfl_wide_operands")
            .launch(&LaunchConfig::new(1, 32).schedule(schedule), &[Arg::buffer(&xb), Arg::buffer(&out)])
            .unwrap();
        let got = out.read();
        for (lane, &v) in x.iter().enumerate() {
            let down = |d: usize, w: usize| if lane % w + d < w { x[lane + d] } else { v };
            let up = |d: usize, w: usize| if lane % w >= d { x[lane - d] } else { v };
            let want = [
                down(1, 32),
                up(2, 32),
                x[lane ^ 3],
                x[31],
                x[lane / 8 * 8 + 5],
                down(31, 32),
                up(31, 16),
                x[lane ^ 8],
            ];
            assert_eq!(got[8 * lane..8 * lane + 8], want, "lane {lane} under {schedule:?}");
        }
    }
}
