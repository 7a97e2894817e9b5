//! Run-time compilation of the embedded kernel sources with NVRTC.

use super::arch::Arch;
use super::nvrtc::{api, Api, Program as RawProgram};
use super::ptxas::{parse_ptxas_log, EntryResources, FunctionFrame};
use super::sources;
use crate::{MoleError, Result};
use serde::{Deserialize, Serialize};
use std::ffi::{c_char, c_int, CString};

/// What NVRTC produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Output {
    /// Machine code for exactly one real architecture (`--gpu-architecture=sm_XX`).
    Cubin,
    /// PTX for a virtual architecture (`compute_XX`); the driver JIT-compiles it for any newer GPU.
    Ptx,
}

/// The result of one NVRTC compilation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compiled {
    /// The cubin, or the PTX text (without a trailing NUL).
    pub image: Vec<u8>,
    /// NVRTC's log: warnings, plus the ptxas report when compiled verbose.
    pub log: String,
    /// Per-entry resources from the ptxas report (empty unless a verbose cubin compile).
    pub resources: Vec<EntryResources>,
    /// Non-inlined device functions with their own frames (verbose cubin compiles only).
    pub functions: Vec<FunctionFrame>,
    /// The NVRTC options used.
    pub options: Vec<String>,
}

impl Compiled {
    /// The resources of entry point `entry`, if ptxas reported it.
    pub fn entry(&self, entry: &str) -> Option<&EntryResources> {
        self.resources.iter().find(|r| r.entry == entry)
    }
}

/// One module to compile: an embedded kernel source and its defines, with the text that
/// identifies it. The kernel registry makes one per build (`mole::kernels::KernelBuild::unit`);
/// this layer knows nothing else of builds.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CompileUnit {
    /// The source file, relative to `kernels/`.
    pub file: &'static str,
    /// The `-DNAME[=VALUE]` options, in order.
    pub defines: Vec<String>,
    /// Canonical text of what chose the defines (the build as JSON): part of every cache key.
    pub identity: String,
    /// Short name for file names, e.g. `sgmv_f16`.
    pub stem: String,
    /// Name for messages, e.g. `sgmv f16 [MOLE_BLOCK_THREADS=128, ...]`.
    pub label: String,
}

/// The NVRTC options for `unit` on `arch`: `-std=c++17`, the target, `-default-device`, the
/// unit's defines, and `--ptxas-options=-v` for a verbose cubin.
pub fn compile_options(unit: &CompileUnit, arch: Arch, output: Output, verbose: bool) -> Vec<String> {
    let target = match output {
        Output::Cubin => arch.name(),
        Output::Ptx => arch.virtual_name(),
    };
    let mut options =
        vec!["-std=c++17".to_string(), format!("--gpu-architecture={target}"), "-default-device".to_string()];
    options.extend(unit.defines.iter().cloned());
    if verbose && output == Output::Cubin {
        options.push("--ptxas-options=-v".to_string());
    }
    options
}

/// Compiles `unit` for `arch` from the embedded sources, with the embedded headers available
/// as `#include "common/x.cuh"`. `verbose` adds the ptxas resource report (cubin only) and
/// fills [`Compiled::resources`].
pub fn compile(unit: &CompileUnit, arch: Arch, output: Output, verbose: bool) -> Result<Compiled> {
    let file = unit.file;
    let source = sources::source(file)
        .ok_or_else(|| MoleError::Unsupported(format!("kernels/{file} is not embedded in this build of mole")))?;
    let headers: Vec<(&str, &str)> = sources::headers().collect();
    let options = compile_options(unit, arch, output, verbose);
    compile_source(file, source, &headers, &options, output).map_err(|e| match e {
        MoleError::NvrtcCompile { status, log, .. } => {
            MoleError::NvrtcCompile { what: format!("{} for {}", unit.label, arch_target(arch, output)), status, log }
        }
        other => other,
    })
}

fn arch_target(arch: Arch, output: Output) -> &'static str {
    match output {
        Output::Cubin => arch.name(),
        Output::Ptx => arch.virtual_name(),
    }
}

/// Owns an `nvrtcProgram` and destroys it on drop.
struct Program(RawProgram, &'static Api);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: `self.0` came from a successful nvrtcCreateProgram and is destroyed only here.
        // A failure to free leaks the program; there is nothing better to do in a destructor.
        let _ = unsafe { (self.1.destroy_program)(&mut self.0) };
    }
}

fn c_string(what: &'static str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| MoleError::param(what, s.escape_debug(), "must not contain NUL bytes"))
}

/// Reads an NVRTC output of `size` bytes with `get`.
fn read_output(
    nvrtc: &Api,
    size: usize,
    get: impl FnOnce(*mut c_char) -> c_int,
    call: &'static str,
) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; size];
    nvrtc.check(call, get(buf.as_mut_ptr().cast()))?;
    Ok(buf)
}

/// Drops the NUL terminator of a text output (log, PTX).
fn strip_nul(mut text: Vec<u8>) -> Vec<u8> {
    while text.last() == Some(&0) {
        text.pop();
    }
    text
}

/// Compiles one source string with NVRTC. `name` is the file name used in diagnostics;
/// `headers` are `(include name, contents)`. This is the primitive under [`compile`], exposed
/// for sources that are not part of the registry.
pub fn compile_source(
    name: &str,
    source: &str,
    headers: &[(&str, &str)],
    options: &[String],
    output: Output,
) -> Result<Compiled> {
    let nvrtc = api()?;
    let c_source = c_string("kernel source", source)?;
    let c_name = c_string("kernel file name", name)?;
    let header_text = headers.iter().map(|(_, text)| c_string("header", text)).collect::<Result<Vec<_>>>()?;
    let header_names = headers.iter().map(|(n, _)| c_string("header name", n)).collect::<Result<Vec<_>>>()?;
    let c_options = options.iter().map(|o| c_string("NVRTC option", o)).collect::<Result<Vec<_>>>()?;
    let header_ptrs: Vec<*const c_char> = header_text.iter().map(|s| s.as_ptr()).collect();
    let name_ptrs: Vec<*const c_char> = header_names.iter().map(|s| s.as_ptr()).collect();
    let option_ptrs: Vec<*const c_char> = c_options.iter().map(|s| s.as_ptr()).collect();
    let too_many = |what| MoleError::param(what, headers.len().max(options.len()), "too many");
    let num_headers = c_int::try_from(headers.len()).map_err(|_| too_many("headers"))?;
    let num_options = c_int::try_from(options.len()).map_err(|_| too_many("options"))?;

    let mut raw: RawProgram = std::ptr::null_mut();
    // SAFETY: NVRTC is loaded (api()). Every pointer is to a NUL-terminated string that
    // outlives the program (all CStrings live until the end of this function); the header
    // arrays both hold `num_headers` elements.
    let status = unsafe {
        (nvrtc.create_program)(
            &mut raw,
            c_source.as_ptr(),
            c_name.as_ptr(),
            num_headers,
            header_ptrs.as_ptr(),
            name_ptrs.as_ptr(),
        )
    };
    nvrtc.check("nvrtcCreateProgram", status)?;
    let program = Program(raw, nvrtc);
    // SAFETY: `program.0` is a live program; `option_ptrs` holds `num_options` valid C strings.
    let compiled = unsafe { (nvrtc.compile_program)(program.0, num_options, option_ptrs.as_ptr()) };

    let mut log_size = 0usize;
    // SAFETY: live program; the out-pointer is valid for a write.
    nvrtc.check("nvrtcGetProgramLogSize", unsafe { (nvrtc.get_program_log_size)(program.0, &mut log_size) })?;
    // SAFETY: the buffer holds `log_size` bytes, the size NVRTC just reported.
    let log = read_output(nvrtc, log_size, |p| unsafe { (nvrtc.get_program_log)(program.0, p) }, "nvrtcGetProgramLog")?;
    let log = String::from_utf8_lossy(&strip_nul(log)).into_owned();

    if compiled != 0 {
        return Err(MoleError::NvrtcCompile { what: name.to_string(), status: nvrtc.status_name(compiled), log });
    }

    let mut size = 0usize;
    let image = match output {
        Output::Cubin => {
            // SAFETY: live, successfully compiled program; valid out-pointer.
            nvrtc.check("nvrtcGetCUBINSize", unsafe { (nvrtc.get_cubin_size)(program.0, &mut size) })?;
            // SAFETY: the buffer holds `size` bytes, the size NVRTC just reported.
            let cubin = read_output(nvrtc, size, |p| unsafe { (nvrtc.get_cubin)(program.0, p) }, "nvrtcGetCUBIN")?;
            if cubin.is_empty() {
                return Err(MoleError::Unsupported(format!(
                    "NVRTC produced no cubin for {name}: cubin output needs a real sm_XX target"
                )));
            }
            cubin
        }
        Output::Ptx => {
            // SAFETY: live, successfully compiled program; valid out-pointer.
            nvrtc.check("nvrtcGetPTXSize", unsafe { (nvrtc.get_ptx_size)(program.0, &mut size) })?;
            // SAFETY: the buffer holds `size` bytes, the size NVRTC just reported.
            strip_nul(read_output(nvrtc, size, |p| unsafe { (nvrtc.get_ptx)(program.0, p) }, "nvrtcGetPTX")?)
        }
    };
    let report = parse_ptxas_log(&log);
    Ok(Compiled { image, log, resources: report.entries, functions: report.functions, options: options.to_vec() })
}
