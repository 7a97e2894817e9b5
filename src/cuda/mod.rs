//! The CUDA side: finding the driver and NVRTC at run time (dynamic loading, so the crate builds
//! and runs its CPU path with no CUDA installed) and describing the GPUs.

mod probe;

pub use probe::{driver_present, list_gpus, nvrtc_present, nvrtc_version, GpuInfo};
