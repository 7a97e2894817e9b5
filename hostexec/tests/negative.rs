//! One planted bug per kernel (tests/kernels/negative.cu), each caught; every fixed twin passes.

use mole_hostexec::{Arg, Buffer, ErrorKind, Guard, Kernel, LaunchConfig, Schedule};

fn kernel(name: &str) -> Kernel {
    Kernel::find("tests/kernels/negative.cu", "", name).unwrap()
}

/// Runs a rounds kernel under `schedule`; true when every output matches the barrier-correct sum.
fn rounds_correct(name: &str, schedule: Schedule) -> bool {
    let n = 96;
    let x: Vec<f32> = (0..n).map(|i| (i * 10) as f32).collect();
    let xb = Buffer::from_slice("x", &x);
    let out = Buffer::<f32>::poisoned("out", n);
    kernel(name)
        .launch(&LaunchConfig::new(1, n as u32).schedule(schedule), &[Arg::buffer(&xb), Arg::buffer(&out)])
        .unwrap();
    let want: Vec<f32> = (0..n).map(|t| (0..4).map(|r| x[(t + 1) % n] + r as f32).sum()).collect();
    out.read() == want
}

#[test]
fn a_missing_syncthreads_gives_a_wrong_answer_under_some_schedule() {
    let schedules = Schedule::sweep(1..=8);
    let wrong: Vec<Schedule> =
        schedules.iter().copied().filter(|&s| !rounds_correct("rounds_missing_sync", s)).collect();
    assert!(!wrong.is_empty(), "the race went unnoticed under every schedule");
    for s in schedules {
        assert!(rounds_correct("rounds_fixed", s), "the fixed kernel failed under {s:?}");
    }
}

#[test]
fn an_out_of_bounds_write_names_kernel_buffer_and_index() {
    let x = Buffer::from_slice("x", &[1.0f32; 128]);
    let y = Buffer::<f32>::poisoned("y", 100);
    let args = [Arg::buffer(&x), Arg::buffer(&y), Arg::value(100u32)];
    let cfg = LaunchConfig::new(2, 64);
    let err = kernel("copy_unguarded").launch(&cfg, &args).unwrap_err();
    assert_eq!(err.kind, ErrorKind::OutOfBounds);
    assert_eq!(
        err.message,
        "kernel copy_unguarded: out-of-bounds write of buffer 'y' (argument 1) at element 100 (byte offset 400; \
         it holds 100 elements of 4 bytes), by thread (36,0,0) of block (1,0,0)"
    );
    kernel("copy_guarded").launch(&cfg, &args).unwrap();
    assert_eq!(y.read(), vec![1.0f32; 100]);
}

#[test]
fn an_underrun_hits_the_leading_guard() {
    let x = Buffer::from_slice("x", &[2.0f32; 64]);
    let y = Buffer::<f32>::poisoned_with_guard("y", 63, Guard::Before);
    let err =
        kernel("shift_unguarded").launch(&LaunchConfig::new(1, 64), &[Arg::buffer(&x), Arg::buffer(&y)]).unwrap_err();
    assert_eq!(err.kind, ErrorKind::OutOfBounds);
    assert!(
        err.message.starts_with("kernel shift_unguarded: out-of-bounds write of buffer 'y' (argument 1) at element -1"),
        "{err}"
    );
    assert!(err.message.ends_with("by thread (0,0,0) of block (0,0,0)"), "{err}");
    kernel("shift_guarded").launch(&LaunchConfig::new(1, 64), &[Arg::buffer(&x), Arg::buffer(&y)]).unwrap();
    assert_eq!(y.read(), vec![2.0f32; 63]);
}

#[test]
fn a_write_into_the_alignment_padding_is_found_after_the_launch() {
    // 99 floats end 4 bytes before the guard page (buffers start 16-byte aligned).
    let x = Buffer::from_slice("x", &[1.0f32; 100]);
    let y = Buffer::<f32>::poisoned("y", 99);
    let err = kernel("copy_unguarded")
        .launch(&LaunchConfig::new(1, 100), &[Arg::buffer(&x), Arg::buffer(&y), Arg::value(99u32)])
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::OutOfBounds);
    assert!(err.message.contains("out-of-bounds write of buffer 'y' (argument 1) at element 99"), "{err}");
    assert!(err.message.contains("found after the launch"), "{err}");
}

#[test]
fn an_uninitialised_shared_read_shows_as_nan() {
    let x: Vec<f32> = (0..64).map(|i| i as f32).collect();
    let xb = Buffer::from_slice("x", &x);
    let y = Buffer::<f32>::poisoned("y", 64);
    for schedule in Schedule::sweep([4]) {
        let cfg = LaunchConfig::new(1, 64).schedule(schedule);
        kernel("stage_partial").launch(&cfg, &[Arg::buffer(&xb), Arg::buffer(&y)]).unwrap();
        let got = y.read();
        assert!(got[..16].iter().all(|v| v.to_bits() == u32::MAX), "slots 48-63 were never written: {got:?}");
        assert_eq!(got[16..], x[..48].iter().rev().copied().collect::<Vec<_>>()[..]);
        kernel("stage_full").launch(&cfg, &[Arg::buffer(&xb), Arg::buffer(&y)]).unwrap();
        let got = y.read();
        assert!(
            got[..16].iter().all(|&v| v == 0.0) && got[16..] == x[..48].iter().rev().copied().collect::<Vec<_>>()[..]
        );
    }
    // Shared memory is poisoned again before every block, not just once.
    kernel("stage_partial").launch(&LaunchConfig::new(1, 64), &[Arg::buffer(&xb), Arg::buffer(&y)]).unwrap();
    assert!(y.read()[..16].iter().all(|v| v.is_nan()));
}

#[test]
fn unwritten_dynamic_shared_memory_reads_as_nan() {
    let y = Buffer::<f32>::zeroed("y", 32);
    kernel("dynamic_unwritten").launch(&LaunchConfig::new(2, 32).shared(128), &[Arg::buffer(&y)]).unwrap();
    assert!(y.read().iter().all(|v| v.to_bits() == u32::MAX));
}

#[test]
fn a_write_through_a_const_parameter_is_caught() {
    let x = Buffer::from_slice("weights", &[1.0f32; 32]);
    let err = kernel("write_through_const").launch(&LaunchConfig::new(1, 32), &[Arg::buffer(&x)]).unwrap_err();
    assert_eq!(err.kind, ErrorKind::ReadOnlyWrite, "{err}");
    assert!(err.message.contains("write to buffer 'weights' (argument 0) at element 0"), "{err}");
    assert!(err.message.contains("which the kernel takes through a const pointer"), "{err}");
    assert_eq!(x.read(), vec![1.0f32; 32], "the buffer is writable again, and untouched");
}

#[test]
fn a_fiber_stack_overflow_is_reported() {
    let y = Buffer::<f32>::poisoned("y", 32);
    let k = kernel("recurse");
    k.launch(&LaunchConfig::new(1, 32), &[Arg::buffer(&y), Arg::value(8i32)]).unwrap();
    assert_eq!(y.read()[0], 36.0, "deep(8, 0) = 8 + 7 + ... + 0");
    let err = k.launch(&LaunchConfig::new(1, 32), &[Arg::buffer(&y), Arg::value(1000i32)]).unwrap_err();
    assert_eq!(err.kind, ErrorKind::StackOverflow, "{err}");
    assert!(err.message.contains("by thread (0,0,0)"), "{err}");
    // The layer stays usable after a fault.
    k.launch(&LaunchConfig::new(1, 32), &[Arg::buffer(&y), Arg::value(1i32)]).unwrap();
}
