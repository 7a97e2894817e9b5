//! The GPU the GPU-only tests run on, or a note and `None` without one.

use mole::cuda::Device;
use mole::MoleError;

/// Device 0, or `None` after printing why `what` is skipped. No GPU must be a typed error,
/// never a panic.
pub fn device_or_skip(what: &str) -> Option<Device> {
    match Device::new(0) {
        Ok(d) => Some(d),
        Err(e) => {
            assert!(matches!(
                e,
                MoleError::CudaDriverNotFound { .. } | MoleError::Cuda { .. } | MoleError::Unsupported(_)
            ));
            eprintln!("skipping {what}: {e}");
            None
        }
    }
}
