//! `mole info`: what this machine has. Never fails: each missing piece is reported with advice.

use mole::cuda;

pub fn print() {
    println!("mole {}", env!("CARGO_PKG_VERSION"));
    println!("CPU threads (rayon): {}", rayon::current_num_threads());
    match cuda::list_gpus() {
        Ok(gpus) if gpus.is_empty() => println!("CUDA driver: found, but it reports no GPU"),
        Ok(gpus) => {
            println!("CUDA driver: found, {} GPU(s)", gpus.len());
            for g in gpus {
                println!(
                    "  [{}] {}  sm_{}{}  {} SMs  {:.1} GiB",
                    g.ordinal,
                    g.name,
                    g.compute_capability.0,
                    g.compute_capability.1,
                    g.sm_count,
                    g.total_memory as f64 / (1u64 << 30) as f64
                );
            }
        }
        Err(e) => println!("CUDA driver: not available: {e}"),
    }
    match cuda::nvrtc_library() {
        Ok(lib) => println!(
            "NVRTC: {}.{} from {} (found by {})",
            lib.version.0,
            lib.version.1,
            lib.path.display(),
            lib.found_by
        ),
        Err(e) => println!("NVRTC: not available: {e}"),
    }
    match cuda::cublas_library() {
        Ok(lib) => {
            let (major, minor, patch) = lib.version;
            println!("cuBLAS: {major}.{minor}.{patch} from {} (found by {})", lib.path.display(), lib.found_by)
        }
        Err(e) => println!("cuBLAS: not available (only the FFN block's base products need it): {e}"),
    }
}
