//! What the GPU-only tests share: the device they run on, and how much they run.
//!
//! Every GPU test lives in a `tests/*_gpu.rs` file and is `#[ignore]`d with [`IGNORE`]'s text, so
//! the suite's summary counts it as ignored, not passed, on a machine without a GPU. The GPU kit
//! (`scripts/gpu/run.sh`) runs those binaries with `--ignored` and `MOLE_REQUIRE_GPU=1`.

use mole::cuda::Device;
use mole::MoleError;

/// Set by the GPU kit: a missing GPU fails the test instead of skipping it.
pub const REQUIRE_GPU_ENV: &str = "MOLE_REQUIRE_GPU";
/// Set by the GPU kit's sanitizer steps: the smallest shapes that still reach every kernel.
pub const QUICK_ENV: &str = "MOLE_GPU_QUICK";

/// Device 0, or `None` after printing why `what` is skipped. No GPU must be a typed error,
/// never a panic; with [`REQUIRE_GPU_ENV`] set it fails the test.
pub fn device_or_skip(what: &str) -> Option<Device> {
    match Device::new(0) {
        Ok(d) => Some(d),
        Err(e) => {
            assert!(matches!(
                e,
                MoleError::CudaDriverNotFound { .. } | MoleError::Cuda { .. } | MoleError::Unsupported(_)
            ));
            assert!(std::env::var_os(REQUIRE_GPU_ENV).is_none(), "{what}: {REQUIRE_GPU_ENV} is set but: {e}");
            eprintln!("skipping {what}: {e}");
            None
        }
    }
}

/// Whether the sanitizer-sized run was asked for ([`QUICK_ENV`]).
#[allow(dead_code)] // not every GPU test file scales its work
pub fn quick() -> bool {
    std::env::var_os(QUICK_ENV).is_some()
}
