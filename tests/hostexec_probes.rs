//! The comparison the GPU probe test (`hostexec_probes_gpu.rs`) makes, exercised on the CPU:
//! both mma accumulation modes agree with each other and with f64 under it, a wrong operand is
//! rejected by it, and the ldmatrix emulation matches the PTX formulas it is compared against.

mod probes;

use mole_hostexec::MmaAccumulation;
use probes::*;

#[test]
fn both_accumulation_modes_pass_the_gpu_comparison() {
    for case in mma_cases() {
        let (t, e) = (emulate_mma(&case, MmaAccumulation::Truncating), emulate_mma(&case, MmaAccumulation::Exact));
        compare_mma(&case, &t, &e).unwrap();
        compare_mma(&case, &e, &t).unwrap();
    }
}

#[test]
fn the_gpu_comparison_rejects_swapped_b_registers() {
    // What swapping b0 and b1 in the device's mma does: k rows 0-7 and 8-15 of B trade places.
    for mut case in mma_cases() {
        let want = emulate_mma(&case, MmaAccumulation::Truncating);
        let b = case.b.clone();
        for k in 0..8 {
            for j in 0..8 {
                case.b[k * 8 + j] = b[(k + 8) * 8 + j];
                case.b[(k + 8) * 8 + j] = b[k * 8 + j];
            }
        }
        let swapped = emulate_mma(&case, MmaAccumulation::Truncating);
        assert!(compare_mma(&case, &swapped, &want).is_err(), "{}: a swap must not pass", case.entry);
    }
}

#[test]
fn ldmatrix_emulation_matches_the_formulas_the_gpu_is_held_to() {
    let (tile, perm) = ldmatrix_input();
    for mode in LDMATRIX_MODES {
        assert_eq!(emulate_ldmatrix(&tile, &perm, mode), ldmatrix_expected(&tile, &perm, mode), "mode {mode}");
    }
}
