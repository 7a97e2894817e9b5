//! `mole_plan_sizes` against the Rust planner it wraps: every method preset, every dtype, token
//! counts on both sides of the strategy switches and two GPU sizes, field for field (a swapped
//! or misrouted size fails here, not in a C++ engine's memory pool).

use mole::{mole_last_error_message, mole_plan_sizes, mole_status, MoleLayerSizes};
use mole_core::model::{Method, MethodShape};
use mole_core::runtime::LayerPlanner;
use mole_core::DType;
use std::ffi::{CStr, CString};

#[test]
fn the_sizes_are_the_planners_for_every_preset_dtype_token_count_and_gpu() {
    let shape = MethodShape { d_in: 256, d_out: 192, experts: 8, rank: 8, k: 2, alpha: 16.0 };
    let mut compared = 0;
    for method in Method::ALL {
        let spec = method.spec(shape).or_else(|_| method.spec(MethodShape { rank: 1, experts: 64, ..shape })).unwrap();
        let json = CString::new(serde_json::to_string(&spec).unwrap()).unwrap();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let name = CString::new(dtype.to_string()).unwrap();
            for sm_count in [20, 132] {
                let planner = LayerPlanner::new(&spec, dtype, sm_count, None).unwrap();
                for tokens in [1, 16, 300, 4096] {
                    let mut got = MoleLayerSizes { workspace_bytes: 1, saved_bytes: 2, backward_workspace_bytes: 3 };
                    // SAFETY: NUL-terminated strings and a live output.
                    let status = unsafe { mole_plan_sizes(json.as_ptr(), name.as_ptr(), sm_count, tokens, &mut got) };
                    // SAFETY: the message is valid until the next call on this thread.
                    let message = unsafe { CStr::from_ptr(mole_last_error_message()) }.to_string_lossy();
                    assert_eq!(status, mole_status::MOLE_OK, "{} {dtype} T={tokens}: {message}", method.name());
                    let want = MoleLayerSizes {
                        workspace_bytes: planner.workspace_bytes(tokens).unwrap(),
                        saved_bytes: planner.plan_training(tokens).unwrap().saved_bytes,
                        backward_workspace_bytes: planner.plan_backward(tokens).unwrap().workspace_bytes,
                    };
                    assert_eq!(got, want, "{} {dtype} on {sm_count} SMs, T={tokens}", method.name());
                    compared += 1;
                }
            }
        }
    }
    assert_eq!(compared, Method::ALL.len() * 3 * 2 * 4);
}
