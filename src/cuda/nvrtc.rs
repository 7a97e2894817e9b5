//! NVRTC, loaded at run time by our own small binding, so that CUDA 12 (`libnvrtc.so.12`) and
//! CUDA 13 (`libnvrtc.so.13`) both work whichever CUDA version the crate's bindings name.
//!
//! Where NVRTC is looked for, in order (the first that loads wins; the search is `dylib`'s):
//! 1. the file (or folder) in `MOLE_NVRTC_PATH` ([`NVRTC_PATH_ENV`]): an error if it does not load;
//! 2. the library search by soname, newest first: `libnvrtc.so.13`, `libnvrtc.so.12`,
//!    `libnvrtc.so` (`LD_LIBRARY_PATH`, the linker cache);
//! 3. a CUDA toolkit: `$CUDA_HOME`, `$CUDA_PATH`, `/usr/local/cuda` (`lib64`, `lib`);
//! 4. the PyPI wheels' layouts (`nvidia/cu13/lib`, `nvidia/cuda_nvrtc/lib`) under the project's
//!    own `.nvrtc/cu13` and `.nvrtc/cu12` (what `scripts/install-nvrtc.sh` installs, found from
//!    the current directory and the executable upwards), `$VIRTUAL_ENV`, `$CONDA_PREFIX`, and
//!    last the `sys.path` of `python3`.

use super::dylib::{dlopen, loaded_path, Search};
use crate::{MoleError, Result};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::PathBuf;
use std::sync::OnceLock;

/// Environment variable naming the NVRTC library to use: a `libnvrtc.so.*` file, or a folder
/// holding one. When set, nothing else is tried.
pub const NVRTC_PATH_ENV: &str = "MOLE_NVRTC_PATH";

/// Where NVRTC is looked for (see the module's documentation); `.nvrtc/` is what
/// `scripts/install-nvrtc.sh` installs: `nvidia-cuda-nvrtc` (CUDA 13) and
/// `nvidia-cuda-nvrtc-cu12`.
const SEARCH: Search = Search {
    env: NVRTC_PATH_ENV,
    sonames: &["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"],
    wheel_layouts: &["nvidia/cu13/lib", "nvidia/cuda_nvrtc/lib"],
    project_dir: Some(".nvrtc"),
};

/// `nvrtcResult`: 0 is success.
pub(crate) type Status = c_int;
/// `nvrtcProgram`.
pub(crate) type Program = *mut c_void;

/// NVRTC's entry points, resolved once from the loaded library.
pub(crate) struct Api {
    pub version: unsafe extern "C" fn(*mut c_int, *mut c_int) -> Status,
    pub create_program: unsafe extern "C" fn(
        *mut Program,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> Status,
    pub compile_program: unsafe extern "C" fn(Program, c_int, *const *const c_char) -> Status,
    pub destroy_program: unsafe extern "C" fn(*mut Program) -> Status,
    pub get_program_log_size: unsafe extern "C" fn(Program, *mut usize) -> Status,
    pub get_program_log: unsafe extern "C" fn(Program, *mut c_char) -> Status,
    pub get_cubin_size: unsafe extern "C" fn(Program, *mut usize) -> Status,
    pub get_cubin: unsafe extern "C" fn(Program, *mut c_char) -> Status,
    pub get_ptx_size: unsafe extern "C" fn(Program, *mut usize) -> Status,
    pub get_ptx: unsafe extern "C" fn(Program, *mut c_char) -> Status,
    get_error_string: unsafe extern "C" fn(Status) -> *const c_char,
}

impl Api {
    /// NVRTC's name for `status`, e.g. `NVRTC_ERROR_COMPILATION`.
    pub fn status_name(&self, status: Status) -> String {
        // SAFETY: nvrtcGetErrorString accepts any value and returns a static string (or null).
        let ptr = unsafe { (self.get_error_string)(status) };
        if ptr.is_null() {
            return format!("nvrtcResult {status}");
        }
        // SAFETY: a non-null result is a NUL-terminated static string owned by NVRTC.
        unsafe { CStr::from_ptr(ptr) }.to_string_lossy().into_owned()
    }

    /// `Ok` when `status` is success, else [`MoleError::Cuda`] naming `call`.
    pub fn check(&self, call: &'static str, status: Status) -> Result<()> {
        if status == 0 {
            Ok(())
        } else {
            Err(MoleError::Cuda { call, message: self.status_name(status) })
        }
    }
}

/// The NVRTC this process uses: which file, which version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NvrtcLibrary {
    /// The file that was loaded (resolved through `/proc/self/maps` where loaded by soname).
    pub path: PathBuf,
    /// `(major, minor)` as `nvrtcVersion` reports it.
    pub version: (i32, i32),
    /// How it was found, e.g. `MOLE_NVRTC_PATH`, `library search`, `wheel under .nvrtc/cu13`.
    pub found_by: String,
}

struct Loaded {
    api: Api,
    info: NvrtcLibrary,
    // Keeps the library mapped for the life of the process (the function pointers point into it).
    _lib: libloading::Library,
}

/// The outcome of looking for NVRTC, decided once per process.
fn loaded() -> &'static std::result::Result<Loaded, String> {
    static LOADED: OnceLock<std::result::Result<Loaded, String>> = OnceLock::new();
    LOADED.get_or_init(|| SEARCH.load(open))
}

/// Loads `name` (a soname or a path) and resolves every entry point.
fn open(name: &str, found_by: &str) -> std::result::Result<Loaded, String> {
    let lib = dlopen(name)?;
    macro_rules! sym {
        ($name:literal) => {
            // SAFETY: the symbol is NVRTC's C entry point of that name, and the field it is
            // stored in has the signature of its C declaration in nvrtc.h (stable since CUDA 11).
            *unsafe { lib.get(concat!($name, "\0").as_bytes()) }.map_err(|e| format!("{name}: {e}"))?
        };
    }
    let api = Api {
        version: sym!("nvrtcVersion"),
        create_program: sym!("nvrtcCreateProgram"),
        compile_program: sym!("nvrtcCompileProgram"),
        destroy_program: sym!("nvrtcDestroyProgram"),
        get_program_log_size: sym!("nvrtcGetProgramLogSize"),
        get_program_log: sym!("nvrtcGetProgramLog"),
        get_cubin_size: sym!("nvrtcGetCUBINSize"),
        get_cubin: sym!("nvrtcGetCUBIN"),
        get_ptx_size: sym!("nvrtcGetPTXSize"),
        get_ptx: sym!("nvrtcGetPTX"),
        get_error_string: sym!("nvrtcGetErrorString"),
    };
    let (mut major, mut minor) = (0, 0);
    // SAFETY: both pointers are valid for writes.
    let status = unsafe { (api.version)(&mut major, &mut minor) };
    api.check("nvrtcVersion", status).map_err(|e| format!("{name}: {e}"))?;
    let path = loaded_path(name);
    Ok(Loaded { api, info: NvrtcLibrary { path, version: (major, minor), found_by: found_by.to_string() }, _lib: lib })
}

/// NVRTC's entry points, or [`MoleError::NvrtcNotFound`] saying what was tried.
pub(crate) fn api() -> Result<&'static Api> {
    match loaded() {
        Ok(l) => Ok(&l.api),
        Err(detail) => Err(MoleError::NvrtcNotFound { detail: detail.clone() }),
    }
}

/// Which NVRTC this process uses, or [`MoleError::NvrtcNotFound`] saying what was tried.
pub fn nvrtc_library() -> Result<NvrtcLibrary> {
    match loaded() {
        Ok(l) => Ok(l.info.clone()),
        Err(detail) => Err(MoleError::NvrtcNotFound { detail: detail.clone() }),
    }
}

/// Whether NVRTC can be loaded.
pub fn nvrtc_present() -> bool {
    loaded().is_ok()
}

/// `Ok` when NVRTC can be used, else [`MoleError::NvrtcNotFound`] saying what was tried.
pub fn nvrtc_status() -> Result<()> {
    api().map(|_| ())
}

/// NVRTC's version `(major, minor)`.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    nvrtc_library().map(|l| l.version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_are_searched_newest_major_first() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(SEARCH.find_in_folder(dir.path()), None);
        std::fs::write(dir.path().join("libnvrtc.so"), b"").unwrap();
        std::fs::write(dir.path().join("libnvrtc.so.12"), b"").unwrap();
        assert_eq!(SEARCH.find_in_folder(dir.path()), Some(dir.path().join("libnvrtc.so.12")));
        std::fs::write(dir.path().join("libnvrtc.so.13"), b"").unwrap();
        assert_eq!(SEARCH.find_in_folder(dir.path()), Some(dir.path().join("libnvrtc.so.13")));
    }

    #[test]
    fn a_file_that_is_not_nvrtc_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("libnvrtc.so.13");
        std::fs::write(&fake, b"not an ELF file").unwrap();
        let err = open(&fake.to_string_lossy(), "test").err().expect("garbage must not load");
        assert!(!err.is_empty());
    }
}
