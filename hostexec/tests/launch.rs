//! The launch path: indexing, arguments, shared memory, barriers, atomics, argument checks.

use mole_hostexec::{Arg, Buffer, ErrorKind, Kernel, LaunchConfig, Schedule};

fn kernel(name: &str) -> Kernel {
    Kernel::find("tests/kernels/basic.cu", "", name).unwrap()
}

#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
struct ScaleParams {
    a: f32,
    n: u32,
}

#[test]
fn scale_runs_every_thread_of_every_block() {
    let x: Vec<f32> = (0..256).map(|i| i as f32).collect();
    let xb = Buffer::from_slice("x", &x);
    let y = Buffer::<f32>::poisoned("y", 256);
    for schedule in Schedule::sweep([1, 2]) {
        let cfg = LaunchConfig::new(4, 64).schedule(schedule);
        kernel("scale_f32").launch(&cfg, &[Arg::buffer(&xb), Arg::buffer(&y), Arg::value(0.5f32)]).unwrap();
        assert_eq!(y.read(), x.iter().map(|v| v * 0.5).collect::<Vec<_>>());
    }
}

#[test]
fn thread_and_block_coordinates_follow_cuda_order() {
    let (grid, block) = ((2, 3, 2), (4, 2, 3));
    let n = 2 * 3 * 2 * 4 * 2 * 3;
    let out = Buffer::<u32>::poisoned("out", 6 * n);
    kernel("coords").launch(&LaunchConfig::new(grid, block), &[Arg::buffer(&out)]).unwrap();
    let got = out.read();
    let mut i = 0;
    for bz in 0..2 {
        for by in 0..3 {
            for bx in 0..2 {
                for tz in 0..3 {
                    for ty in 0..2 {
                        for tx in 0..4 {
                            assert_eq!(got[6 * i..6 * i + 6], [tx, ty, tz, bx, by, bz], "entry {i}");
                            i += 1;
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn block_sum_uses_static_shared_memory_and_a_struct_argument() {
    let x: Vec<f32> = (0..3 * 100).map(|i| (i % 7) as f32).collect();
    let xb = Buffer::from_slice("x", &x);
    let out = Buffer::<f32>::poisoned("out", 3);
    let p = ScaleParams { a: 2.0, n: 100 };
    for schedule in Schedule::sweep([7]) {
        let cfg = LaunchConfig::new(3, 128).schedule(schedule);
        kernel("block_sum").launch(&cfg, &[Arg::buffer(&xb), Arg::buffer(&out), Arg::value(p)]).unwrap();
        let want: Vec<f32> = x.chunks(100).map(|c| 2.0 * c.iter().sum::<f32>()).collect();
        assert_eq!(out.read(), want);
    }
}

#[test]
fn dynamic_shared_memory_is_per_launch_sized() {
    let x: Vec<i32> = (0..192).collect();
    let xb = Buffer::from_slice("x", &x);
    let y = Buffer::<i32>::poisoned("y", 192);
    let cfg = LaunchConfig::new(3, 64).shared(64 * 4).schedule(Schedule::Seeded(3));
    kernel("reverse_dynamic").launch(&cfg, &[Arg::buffer(&xb), Arg::buffer(&y)]).unwrap();
    let want: Vec<i32> = x.chunks(64).flat_map(|c| c.iter().rev().copied()).collect();
    assert_eq!(y.read(), want);
    // One element short: the last thread writes past the request, into the page's padding.
    let err = kernel("reverse_dynamic").launch(&cfg.shared(63 * 4), &[Arg::buffer(&xb), Arg::buffer(&y)]).unwrap_err();
    assert_eq!(err.kind, ErrorKind::SharedOverrun, "{err}");
    assert!(err.message.contains("byte offset 252"), "{err}");
    // No dynamic shared memory at all: the first access (thread 0 under Forward) faults.
    let cfg = cfg.shared(0).schedule(Schedule::Forward);
    let err = kernel("reverse_dynamic").launch(&cfg, &[Arg::buffer(&xb), Arg::buffer(&y)]).unwrap_err();
    assert_eq!(err.kind, ErrorKind::SharedOverrun, "{err}");
    assert!(err.message.contains("kernel reverse_dynamic: out-of-bounds write of dynamic shared memory"), "{err}");
    assert!(err.message.contains("byte offset 0") && err.message.contains("thread (0,0,0) of block (0,0,0)"), "{err}");
}

#[test]
fn atomics_and_counting_barrier() {
    let x: Vec<u32> = (0..96).map(|i| i * 5).collect();
    let xb = Buffer::from_slice("x", &x);
    let bins = Buffer::<u32>::zeroed("bins", 8);
    let counted = Buffer::<i32>::poisoned("counted", 1);
    let cfg = LaunchConfig::new(1, 96).schedule(Schedule::Seeded(11));
    kernel("histogram").launch(&cfg, &[Arg::buffer(&xb), Arg::buffer(&bins), Arg::buffer(&counted)]).unwrap();
    let mut want = [0u32; 8];
    x.iter().for_each(|v| want[(v % 8) as usize] += 1);
    assert_eq!(bins.read(), want);
    assert_eq!(counted.read(), [x.iter().filter(|v| *v % 2 == 0).count() as i32]);
}

#[test]
fn atomics_are_read_modify_writes_in_schedule_order() {
    let n = 64u32;
    for (schedule, winner) in [(Schedule::Forward, 1), (Schedule::Reverse, n), (Schedule::Seeded(8), 0)] {
        let extremes = Buffer::from_slice("extremes", &[i32::MIN, i32::MAX]);
        let first = Buffer::<u32>::zeroed("first", 1);
        let sum = Buffer::<f32>::zeroed("sum", 1);
        let args = [Arg::buffer(&extremes), Arg::buffer(&first), Arg::buffer(&sum)];
        kernel("atomics").launch(&LaunchConfig::new(1, n).schedule(schedule), &args).unwrap();
        let values: Vec<i32> = (0..n as i32).map(|t| (t * 7) % 23 - 11).collect();
        assert_eq!(extremes.read(), [*values.iter().max().unwrap(), *values.iter().min().unwrap()]);
        let got = first.read()[0];
        assert!(got >= 1 && got <= n && (winner == 0 || got == winner), "{schedule:?}: thread {got} won");
        assert_eq!(sum.read(), [0.5 * n as f32]);
    }
}

#[test]
fn arguments_are_checked_against_the_signature() {
    let x = Buffer::from_slice("x", &[1.0f32; 64]);
    let y = Buffer::<f32>::poisoned("y", 64);
    let halves = Buffer::from_slice("halves", &[half::f16::ONE; 64]);
    let k = kernel("scale_f32");
    let cfg = LaunchConfig::new(1, 64);
    let cases: Vec<(Vec<Arg>, &str)> = vec![
        (vec![Arg::buffer(&x), Arg::buffer(&y)], "takes 3 arguments, got 2"),
        (vec![Arg::buffer(&x), Arg::buffer(&y), Arg::value(1.0f64)], "argument 2 has 8 bytes, the parameter 4"),
        (vec![Arg::buffer(&x), Arg::buffer(&y), Arg::buffer(&x)], "argument 2 has 8 bytes"),
        (vec![Arg::value(7u64), Arg::buffer(&y), Arg::value(1.0f32)], "argument 0 is a pointer parameter"),
        (vec![Arg::buffer(&halves), Arg::buffer(&y), Arg::value(1.0f32)], "'halves' holds 2-byte elements"),
    ];
    for (args, want) in cases {
        let err = k.launch(&cfg, &args).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Launch);
        assert!(err.message.contains(want), "{err} / {want}");
    }
    for (grid, block) in [((1, 1, 1), (1025, 1, 1)), ((1, 1, 1), (1, 1, 65)), ((0, 1, 1), (32, 1, 1))] {
        let err = k.launch(&LaunchConfig::new(grid, block), &[Arg::buffer(&x), Arg::buffer(&y), Arg::value(1.0f32)]);
        assert_eq!(err.unwrap_err().kind, ErrorKind::Launch);
    }
    assert_eq!(Kernel::get("no_such_kernel").unwrap_err().kind, ErrorKind::NotFound);
}

#[test]
fn blocks_in_flight_together_lose_a_racy_read_modify_write() {
    // Each of 8 blocks adds its sum to out[0], reading it before a barrier and writing after:
    // one block after another, the total is right; interleaved, updates are lost.
    let x: Vec<f32> = (0..8 * 64).map(|i| (i % 5) as f32).collect();
    let total: f32 = x.iter().sum();
    let xb = Buffer::from_slice("x", &x);
    let run = |cfg: LaunchConfig| {
        let out = Buffer::from_slice("out", &[0.0f32]);
        kernel("racy_accumulate").launch(&cfg, &[Arg::buffer(&xb), Arg::buffer(&out)]).unwrap();
        out.read()[0]
    };
    assert_eq!(run(LaunchConfig::new(8, 64)), total, "one block after another hides the race");
    let caught = (0..4).filter(|&s| run(LaunchConfig::new(8, 64).schedule(Schedule::Seeded(s))) != total).count();
    assert!(caught > 0, "no seeded schedule interleaved the blocks");
}

#[test]
fn a_block_reading_another_blocks_output_depends_on_the_block_order() {
    let x: Vec<f32> = (1..=6).map(|i| i as f32).collect();
    let xb = Buffer::from_slice("x", &x);
    let want: Vec<f32> = x.iter().scan(0.0, |s, v| Some(*s + v).inspect(|t| *s = *t)).collect();
    let run = |schedule: Schedule| {
        let out = Buffer::<f32>::poisoned("out", 6);
        let cfg = LaunchConfig::new(6, 32).schedule(schedule);
        kernel("chained_blocks").launch(&cfg, &[Arg::buffer(&xb), Arg::buffer(&out)]).unwrap();
        out.read()
    };
    assert_eq!(run(Schedule::Forward), want, "in index order the chain happens to work");
    assert_ne!(run(Schedule::Reverse), want, "in reverse order block b reads poison from block b-1");
}

#[test]
fn interleaved_blocks_keep_their_own_shared_memory() {
    // block_sum keeps a tree of partial sums in static shared memory across many barriers: with
    // 16 blocks, 1 to 16 in flight, every block's sum must come out right.
    let x: Vec<f32> = (0..16 * 256).map(|i| ((i * 7) % 11) as f32).collect();
    let xb = Buffer::from_slice("x", &x);
    let out = Buffer::<f32>::poisoned("out", 16);
    let want: Vec<f32> = x.chunks(256).map(|c| 2.0 * c.iter().sum::<f32>()).collect();
    for resident in [1, 2, 5, 16] {
        for schedule in Schedule::sweep([3, 4]) {
            let cfg = LaunchConfig::new(16, 256).schedule(schedule).resident_blocks(resident);
            let p = ScaleParams { a: 2.0, n: 256 };
            kernel("block_sum").launch(&cfg, &[Arg::buffer(&xb), Arg::buffer(&out), Arg::value(p)]).unwrap();
            assert_eq!(out.read(), want, "{resident} resident blocks, {schedule:?}");
        }
    }
}
