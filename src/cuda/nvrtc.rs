//! NVRTC, loaded at run time by our own small binding, so that CUDA 12 (`libnvrtc.so.12`) and
//! CUDA 13 (`libnvrtc.so.13`) both work whichever CUDA version the crate's bindings name.
//!
//! Where NVRTC is looked for, in order (the first that loads wins):
//! 1. the file (or folder) in `MOLE_NVRTC_PATH` ([`NVRTC_PATH_ENV`]): an error if it does not load;
//! 2. the library search by soname, newest first: `libnvrtc.so.13`, `libnvrtc.so.12`,
//!    `libnvrtc.so` (`LD_LIBRARY_PATH`, the linker cache);
//! 3. a CUDA toolkit: `$CUDA_HOME`, `$CUDA_PATH`, `/usr/local/cuda` (`lib64`, `lib`);
//! 4. the PyPI wheels' layouts (`nvidia/cu13/lib`, `nvidia/cuda_nvrtc/lib`) under the project's
//!    own `.nvrtc/cu13` and `.nvrtc/cu12` (what `scripts/install-nvrtc.sh` installs, found from
//!    the current directory and the executable upwards), `$VIRTUAL_ENV`, `$CONDA_PREFIX`, and
//!    last the `sys.path` of `python3`.

use crate::{MoleError, Result};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Environment variable naming the NVRTC library to use: a `libnvrtc.so.*` file, or a folder
/// holding one. When set, nothing else is tried.
pub const NVRTC_PATH_ENV: &str = "MOLE_NVRTC_PATH";

/// Sonames tried through the system's library search, newest major first.
const SONAMES: [&str; 3] = ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"];

/// The wheels' library folders under a site-packages root, newest first: `nvidia-cuda-nvrtc`
/// (CUDA 13) and `nvidia-cuda-nvrtc-cu12`.
const WHEEL_LAYOUTS: [&str; 2] = ["nvidia/cu13/lib", "nvidia/cuda_nvrtc/lib"];

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
    LOADED.get_or_init(|| {
        let mut tried = Vec::new();
        if let Some(value) = std::env::var_os(NVRTC_PATH_ENV).filter(|v| !v.is_empty()) {
            let path = PathBuf::from(value);
            if !path.is_absolute() {
                return Err(format!("{NVRTC_PATH_ENV}={} is not an absolute path", path.display()));
            }
            let file = if path.is_dir() { find_in_folder(&path) } else { Some(path.clone()) };
            let file = file.ok_or_else(|| {
                format!("{NVRTC_PATH_ENV}={} is a folder with no libnvrtc.so.13 / .so.12 / .so in it", path.display())
            })?;
            return open(&file.to_string_lossy(), NVRTC_PATH_ENV)
                .map_err(|e| format!("{NVRTC_PATH_ENV}={}: {e}", file.display()));
        }
        // A soname that is not installed is the expected case: only files that exist but fail
        // to load are worth reporting.
        if let Some(l) = SONAMES.iter().find_map(|name| open(name, "library search").ok()) {
            return Ok(l);
        }
        for (root, how) in candidate_folders() {
            if let Some(file) = find_in_folder(&root) {
                match open(&file.to_string_lossy(), &how) {
                    Ok(l) => return Ok(l),
                    Err(e) => tried.push(format!("{}: {e}", file.display())),
                }
            }
        }
        let mut detail = format!(
            "tried {} through the library search, the CUDA toolkit folders and the PyPI wheel folders",
            SONAMES.join(", ")
        );
        if !tried.is_empty() {
            detail.push_str(&format!("; found but could not load: {}", tried.join("; ")));
        }
        Err(detail)
    })
}

/// The first NVRTC library directly in `folder`, newest first.
fn find_in_folder(folder: &Path) -> Option<PathBuf> {
    SONAMES.iter().map(|name| folder.join(name)).find(|p| p.is_file())
}

/// Folders that may hold NVRTC, in search order, each with how it was found.
fn candidate_folders() -> Vec<(PathBuf, String)> {
    let mut folders = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            for sub in ["lib64", "lib"] {
                folders.push((PathBuf::from(&home).join(sub), format!("${var}/{sub}")));
            }
        }
    }
    for sub in ["lib64", "lib"] {
        folders.push((PathBuf::from("/usr/local/cuda").join(sub), format!("/usr/local/cuda/{sub}")));
    }
    let mut roots: Vec<(PathBuf, String)> = project_installs();
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(prefix) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            roots.extend(site_packages_under(Path::new(&prefix)).into_iter().map(|p| (p, format!("${var}"))));
        }
    }
    push_wheel_layouts(&mut folders, &roots);
    if folders.iter().all(|(f, _)| find_in_folder(f).is_none()) {
        // Last resort, and only then: asking python3 costs a process start.
        let roots: Vec<_> = python_sys_path().into_iter().map(|p| (p, "python3 sys.path".to_string())).collect();
        push_wheel_layouts(&mut folders, &roots);
    }
    folders
}

fn push_wheel_layouts(folders: &mut Vec<(PathBuf, String)>, roots: &[(PathBuf, String)]) {
    for layout in WHEEL_LAYOUTS {
        for (root, how) in roots {
            folders.push((root.join(layout), format!("wheel under {how}")));
        }
    }
}

/// The project's own NVRTC installs (`.nvrtc/cu13`, `.nvrtc/cu12`), from the current directory
/// and the executable's folder upwards.
fn project_installs() -> Vec<(PathBuf, String)> {
    let mut starts = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        starts.push(cwd);
    }
    if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        starts.push(dir);
    }
    let mut roots = Vec::new();
    for start in starts {
        for dir in start.ancestors() {
            for major in ["cu13", "cu12"] {
                let root = dir.join(".nvrtc").join(major);
                if root.is_dir() && !roots.iter().any(|(r, _)| r == &root) {
                    roots.push((root, format!(".nvrtc/{major} in {}", dir.display())));
                }
            }
        }
    }
    roots
}

fn site_packages_under(prefix: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(prefix.join("lib")) else { return Vec::new() };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("python"))
        .map(|e| e.path().join("site-packages"))
        .collect()
}

fn python_sys_path() -> Vec<PathBuf> {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let child = Command::new("python3")
        .args(["-c", "import sys; print('\\n'.join(p for p in sys.path if p))"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else { return Vec::new() };
    // A broken interpreter must not hang library code: five seconds, then nothing.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => break,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Vec::new();
            }
        }
    }
    let mut out = String::new();
    match child.stdout.take().map(|mut o| o.read_to_string(&mut out)) {
        Some(Ok(_)) => out.lines().map(PathBuf::from).collect(),
        _ => Vec::new(),
    }
}

/// Loads `name` (a soname or a path) and resolves every entry point.
fn open(name: &str, found_by: &str) -> std::result::Result<Loaded, String> {
    // SAFETY: loading libnvrtc runs only its own initialisers, which have no preconditions.
    let lib = unsafe { libloading::Library::new(name) }.map_err(|e| e.to_string())?;
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
    // A soname resolves to a file the dynamic loader chose; another libnvrtc (a framework's) may
    // be mapped too, so only a file whose name starts with the soname is taken.
    let path = if name.contains('/') { None } else { mapped_path(name) }.unwrap_or_else(|| PathBuf::from(name));
    Ok(Loaded { api, info: NvrtcLibrary { path, version: (major, minor), found_by: found_by.to_string() }, _lib: lib })
}

/// The file of a mapped library whose name starts with `prefix` (a soname), from `/proc/self/maps`.
fn mapped_path(prefix: &str) -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().filter_map(|l| l.split_whitespace().nth(5)).map(PathBuf::from).find(|p| {
        p.file_name().is_some_and(|n| {
            let n = n.to_string_lossy();
            n.starts_with(prefix) && !n.contains("builtins")
        })
    })
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
        assert_eq!(find_in_folder(dir.path()), None);
        std::fs::write(dir.path().join("libnvrtc.so"), b"").unwrap();
        std::fs::write(dir.path().join("libnvrtc.so.12"), b"").unwrap();
        assert_eq!(find_in_folder(dir.path()), Some(dir.path().join("libnvrtc.so.12")));
        std::fs::write(dir.path().join("libnvrtc.so.13"), b"").unwrap();
        assert_eq!(find_in_folder(dir.path()), Some(dir.path().join("libnvrtc.so.13")));
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
