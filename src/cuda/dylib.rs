//! Finding a CUDA library (NVRTC, cuBLAS) at run time, whichever CUDA major installed it: by our
//! own search rather than the bindings' fixed sonames, so that CUDA 12 and 13, toolkits and PyPI
//! wheels all work, and a missing library is an error rather than a panic.
//!
//! The order, for a [`Search`] (the first that loads wins):
//! 1. the file (or folder) in the search's environment variable: an error if it does not load;
//! 2. the library search by soname, newest first (`LD_LIBRARY_PATH`, the linker cache);
//! 3. a CUDA toolkit: `$CUDA_HOME`, `$CUDA_PATH`, `/usr/local/cuda` (`lib64`, `lib`);
//! 4. the PyPI wheels' layouts under the project's own install folder where the search has one
//!    (found from the current directory and the executable upwards), `$VIRTUAL_ENV`,
//!    `$CONDA_PREFIX`, and last the `sys.path` of `python3`.

use std::path::{Path, PathBuf};

/// Where one library is looked for.
pub(crate) struct Search {
    /// Environment variable naming the library file or its folder; when set nothing else is tried.
    pub env: &'static str,
    /// Sonames, newest major first (`libnvrtc.so.13`, `libnvrtc.so.12`, `libnvrtc.so`).
    pub sonames: &'static [&'static str],
    /// The wheels' library folders under a site-packages root, newest first.
    pub wheel_layouts: &'static [&'static str],
    /// The project's own install folder (`.nvrtc`, holding `cu13/` and `cu12/`), if any.
    pub project_dir: Option<&'static str>,
}

impl Search {
    /// Runs the search: `open(name, found_by)` loads a soname or a path; the first success wins.
    /// The error says what was tried (and what was found but failed to load).
    pub fn load<T>(&self, open: impl Fn(&str, &str) -> Result<T, String>) -> Result<T, String> {
        self.load_with(std::env::var_os(self.env), open)
    }

    /// [`Search::load`] with `env_value` standing for the environment variable's value.
    pub fn load_with<T>(
        &self,
        env_value: Option<std::ffi::OsString>,
        open: impl Fn(&str, &str) -> Result<T, String>,
    ) -> Result<T, String> {
        let env = self.env;
        if let Some(value) = env_value.filter(|v| !v.is_empty()) {
            let path = PathBuf::from(value);
            if !path.is_absolute() {
                return Err(format!("{env}={} is not an absolute path", path.display()));
            }
            let file = if path.is_dir() { self.find_in_folder(&path) } else { Some(path.clone()) };
            let file = file.ok_or_else(|| {
                format!("{env}={} is a folder with none of {} in it", path.display(), self.sonames.join(", "))
            })?;
            return open(&file.to_string_lossy(), env).map_err(|e| format!("{env}={}: {e}", file.display()));
        }
        // A soname that is not installed is the expected case: only files that exist but fail
        // to load are worth reporting.
        if let Some(l) = self.sonames.iter().find_map(|name| open(name, "library search").ok()) {
            return Ok(l);
        }
        let mut tried = Vec::new();
        for (root, how) in self.candidate_folders() {
            if let Some(file) = self.find_in_folder(&root) {
                match open(&file.to_string_lossy(), &how) {
                    Ok(l) => return Ok(l),
                    Err(e) => tried.push(format!("{}: {e}", file.display())),
                }
            }
        }
        let mut detail = format!(
            "tried {} through the library search, the CUDA toolkit folders and the PyPI wheel folders",
            self.sonames.join(", ")
        );
        if !tried.is_empty() {
            detail.push_str(&format!("; found but could not load: {}", tried.join("; ")));
        }
        Err(detail)
    }

    /// The first of the library's files directly in `folder`, newest first.
    pub fn find_in_folder(&self, folder: &Path) -> Option<PathBuf> {
        self.sonames.iter().map(|name| folder.join(name)).find(|p| p.is_file())
    }

    /// Folders that may hold the library, in search order, each with how it was found.
    fn candidate_folders(&self) -> Vec<(PathBuf, String)> {
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
        let mut roots: Vec<(PathBuf, String)> = self.project_dir.map(project_installs).unwrap_or_default();
        for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
            if let Some(prefix) = std::env::var_os(var).filter(|v| !v.is_empty()) {
                roots.extend(site_packages_under(Path::new(&prefix)).into_iter().map(|p| (p, format!("${var}"))));
            }
        }
        self.push_wheel_layouts(&mut folders, &roots);
        if folders.iter().all(|(f, _)| self.find_in_folder(f).is_none()) {
            // Last resort, and only then: asking python3 costs a process start.
            let roots: Vec<_> = python_sys_path().into_iter().map(|p| (p, "python3 sys.path".to_string())).collect();
            self.push_wheel_layouts(&mut folders, &roots);
        }
        folders
    }

    fn push_wheel_layouts(&self, folders: &mut Vec<(PathBuf, String)>, roots: &[(PathBuf, String)]) {
        for layout in self.wheel_layouts {
            for (root, how) in roots {
                folders.push((root.join(layout), format!("wheel under {how}")));
            }
        }
    }
}

/// The project's own installs (`DIR/cu13`, `DIR/cu12`), from the current directory and the
/// executable's folder upwards.
fn project_installs(project_dir: &str) -> Vec<(PathBuf, String)> {
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
                let root = dir.join(project_dir).join(major);
                if root.is_dir() && !roots.iter().any(|(r, _)| r == &root) {
                    roots.push((root, format!("{project_dir}/{major} in {}", dir.display())));
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

/// Loads a CUDA library (a soname or a path); the error carries the loader's own reason
/// (`libcublasLt.so.13: cannot open shared object file`), not only that loading failed.
pub(crate) fn dlopen(name: &str) -> Result<libloading::Library, String> {
    // SAFETY: loading a CUDA library runs only its own initialisers, which have no preconditions.
    unsafe { libloading::Library::new(name) }.map_err(|e| match std::error::Error::source(&e) {
        Some(reason) => format!("{e}: {reason}"),
        None => e.to_string(),
    })
}

/// The file a library was loaded from: `name` itself when it is a path, else the mapped file
/// whose name starts with the soname `name` (from `/proc/self/maps`). Another copy (a
/// framework's) may be mapped too, so only a file whose name starts with the soname is taken
/// (`libnvrtc-builtins.so.13` and `libcublasLt.so.13` do not start with `libnvrtc.so` or
/// `libcublas.so`).
pub(crate) fn loaded_path(name: &str) -> PathBuf {
    let mapped = || -> Option<PathBuf> {
        let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
        maps.lines()
            .filter_map(|l| l.split_whitespace().nth(5))
            .map(PathBuf::from)
            .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(name)))
    };
    if name.contains('/') { None } else { mapped() }.unwrap_or_else(|| PathBuf::from(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEST: Search = Search {
        env: "MOLE_DYLIB_TEST_PATH_UNSET",
        sonames: &["libmoletest.so.13", "libmoletest.so.12", "libmoletest.so"],
        wheel_layouts: &["nvidia/cu13/lib"],
        project_dir: None,
    };

    #[test]
    fn folders_are_searched_newest_major_first() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(TEST.find_in_folder(dir.path()), None);
        std::fs::write(dir.path().join("libmoletest.so"), b"").unwrap();
        std::fs::write(dir.path().join("libmoletest.so.12"), b"").unwrap();
        assert_eq!(TEST.find_in_folder(dir.path()), Some(dir.path().join("libmoletest.so.12")));
        std::fs::write(dir.path().join("libmoletest.so.13"), b"").unwrap();
        assert_eq!(TEST.find_in_folder(dir.path()), Some(dir.path().join("libmoletest.so.13")));
    }

    fn never_opens(name: &str, _: &str) -> Result<(), String> {
        Err(format!("{name}: cannot open shared object file"))
    }

    #[test]
    fn a_library_found_nowhere_says_what_was_tried() {
        let err = TEST.load_with(None, never_opens).unwrap_err();
        assert!(err.contains("libmoletest.so.13, libmoletest.so.12, libmoletest.so"), "{err}");
    }

    #[test]
    fn the_environment_variable_is_the_only_place_tried_when_set() {
        let dir = tempfile::tempdir().unwrap();
        // A relative path, a folder without the library, a file that does not load: each an
        // error naming the variable, with nothing else tried.
        let err = TEST.load_with(Some("lib/libmoletest.so".into()), never_opens).unwrap_err();
        assert!(err.contains("is not an absolute path"), "{err}");
        let err = TEST.load_with(Some(dir.path().into()), never_opens).unwrap_err();
        assert!(err.starts_with(TEST.env) && err.contains("is a folder with none of libmoletest.so.13"), "{err}");
        let file = dir.path().join("libmoletest.so.12");
        std::fs::write(&file, b"").unwrap();
        let opened = std::cell::RefCell::new(Vec::new());
        let err = TEST
            .load_with(Some(dir.path().into()), |name, how| {
                opened.borrow_mut().push((name.to_string(), how.to_string()));
                never_opens(name, how)
            })
            .unwrap_err();
        assert!(err.starts_with(&format!("{}={}: ", TEST.env, file.display())), "{err}");
        assert_eq!(opened.into_inner(), vec![(file.to_string_lossy().into_owned(), TEST.env.to_string())]);
    }
}
