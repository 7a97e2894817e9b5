//! Every `mole_*` function of a device branch (arch.cuh, mma.cuh) has a host twin, so a kernel
//! that compiles with NVRTC also compiles for the CPU: this catches a wrapper added on one side
//! only before any kernel uses it.

use std::collections::BTreeSet;

fn read(path: &str) -> String {
    let full = concat!(env!("CARGO_MANIFEST_DIR"), "/../kernels/").to_string() + path;
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{full}: {e}"))
}

/// Names of the `mole_*` functions defined with `MOLE_DEVICE` or `inline` in `text`.
fn functions(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| l.starts_with("MOLE_DEVICE ") || l.starts_with("inline "))
        .filter_map(|l| {
            let head = &l[..l.find('(')?];
            let name = head.rsplit(|c: char| !(c == '_' || c.is_ascii_alphanumeric())).next()?;
            name.starts_with("mole_").then(|| name.to_string())
        })
        .collect()
}

/// The text between the first line starting with `from` and the next starting with `to`.
fn between<'a>(text: &'a str, from: &str, to: &str) -> &'a str {
    let start = text.find(from).unwrap_or_else(|| panic!("no `{from}`"));
    let end = start + text[start..].find(to).unwrap_or_else(|| panic!("no `{to}` after `{from}`"));
    &text[start..end]
}

#[test]
fn every_device_wrapper_has_a_host_twin() {
    let arch = read("common/arch.cuh");
    let device = functions(between(&arch, "#if defined(__CUDACC__)", "#elif defined(MOLE_HOST_ARCH_HEADER)"));
    let host = functions(&read("common/host/runtime.h"));
    assert!(device.contains("mole_shfl_xor") && device.contains("mole_expf"), "{device:?}");
    let missing: Vec<_> = device.difference(&host).collect();
    assert!(missing.is_empty(), "arch.cuh wrappers without a twin in common/host/runtime.h: {missing:?}");

    let mma = read("common/mma.cuh");
    let mut device = functions(between(&mma, "#if defined(__CUDACC__)", "#else"));
    device.remove("mole_smem_addr"); // a PTX helper of the device branch, not part of the interface
    let host = functions(&read("common/host/mma.h"));
    assert!(device.contains("mole_mma_m16n8k16_bf16") && device.contains("mole_cp_async_wait"), "{device:?}");
    let missing: Vec<_> = device.difference(&host).collect();
    assert!(missing.is_empty(), "mma.cuh functions without a twin in common/host/mma.h: {missing:?}");
}
