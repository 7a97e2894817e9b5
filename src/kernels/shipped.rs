//! The PTX shipped in `ptx/` for machines without NVRTC: one file per default build
//! ([`crate::kernels::default_builds`]) for a baseline virtual architecture, which the driver
//! JIT-compiles for any newer GPU, plus `manifest.json` saying what each file was built from.
//! `mole gen-ptx` writes them; `mole gen-ptx --check` fails when they are stale.

use super::KernelBuild;
use crate::cuda::{compile, nvrtc_version, sources, Arch, Output};
use crate::{MoleError, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::OnceLock;

/// The NVRTC `(major, minor)` the shipped PTX is generated with: the pinned
/// `scripts/install-nvrtc.sh 12`. PTX from a newer NVRTC carries a newer PTX ISA version, which
/// older drivers refuse to JIT.
pub const SHIPPED_NVRTC: (i32, i32) = (12, 4);

/// The architecture whose virtual target (`compute_80`) the shipped PTX is compiled for: the
/// oldest one supported, so the driver can JIT it for all of them.
pub const PTX_BASELINE: Arch = Arch::Sm80;

/// The manifest's file name inside `ptx/`.
pub const MANIFEST_FILE: &str = "manifest.json";

/// `ptx/manifest.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtxManifest {
    /// One record per shipped PTX file.
    pub entries: Vec<PtxManifestEntry>,
}

/// What one shipped PTX file was built from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtxManifestEntry {
    /// File name inside `ptx/`, e.g. `gating_f16.ptx`.
    pub file: String,
    /// The virtual architecture, e.g. `compute_80`.
    pub target: String,
    /// [`sources::unit_hash`] of the family's source file, as 16 hex digits.
    pub source_hash: String,
    /// The NVRTC that produced it, `major.minor`.
    pub nvrtc_version: String,
    /// The configuration compiled.
    pub build: KernelBuild,
}

/// `<family>_<dtype>.ptx`.
pub fn ptx_file_name(build: &KernelBuild) -> String {
    format!("{}_{}.ptx", build.family(), build.dtype)
}

fn unit_hash_hex(build: &KernelBuild) -> Result<String> {
    let file = build.family().source_file();
    sources::unit_hash(file)
        .map(|h| format!("{h:016x}"))
        .ok_or_else(|| MoleError::Unsupported(format!("kernels/{file} is not embedded in this build of mole")))
}

/// Compiles `builds` to baseline PTX and returns every file of `ptx/` as `(name, contents)`:
/// the PTX files in order, then `manifest.json`. Needs NVRTC.
pub fn generate(builds: &[KernelBuild]) -> Result<Vec<(String, String)>> {
    let (major, minor) = nvrtc_version()?;
    let mut files = Vec::with_capacity(builds.len() + 1);
    let mut entries = Vec::with_capacity(builds.len());
    for build in builds {
        let file = ptx_file_name(build);
        if entries.iter().any(|e: &PtxManifestEntry| e.file == file) {
            return Err(MoleError::Unsupported(format!(
                "two default builds of {} {} would both be shipped as ptx/{file}",
                build.family(),
                build.dtype
            )));
        }
        let compiled = compile(&build.unit()?, PTX_BASELINE, Output::Ptx, false)?;
        let text = String::from_utf8(compiled.image)
            .map_err(|_| MoleError::Unsupported(format!("NVRTC returned PTX for {build} that is not UTF-8")))?;
        entries.push(PtxManifestEntry {
            file: file.clone(),
            target: PTX_BASELINE.virtual_name().to_string(),
            source_hash: unit_hash_hex(build)?,
            nvrtc_version: format!("{major}.{minor}"),
            build: build.clone(),
        });
        files.push((file, text));
    }
    let manifest = serde_json::to_string_pretty(&PtxManifest { entries })
        .map_err(|e| MoleError::io("serialising the PTX manifest", e))?;
    files.push((MANIFEST_FILE.to_string(), manifest + "\n"));
    Ok(files)
}

/// One way a `ptx/` folder differs from what the sources produce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StaleFile {
    /// The file exists with other contents.
    Differs(String),
    /// The file does not exist.
    Missing(String),
    /// A `.ptx` file that is not one of the default builds.
    Unexpected(String),
}

impl std::fmt::Display for StaleFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StaleFile::Differs(n) => write!(f, "{n} differs"),
            StaleFile::Missing(n) => write!(f, "{n} is missing"),
            StaleFile::Unexpected(n) => write!(f, "{n} is not a default build any more"),
        }
    }
}

/// How the files in `dir` differ from `expected` (as returned by [`generate`]): missing,
/// different or unexpected `.ptx` files and manifest. Empty when `dir` is up to date.
pub fn stale_files(dir: &Path, expected: &[(String, String)]) -> Result<Vec<StaleFile>> {
    let mut problems = Vec::new();
    for (name, text) in expected {
        match std::fs::read_to_string(dir.join(name)) {
            Ok(on_disk) if on_disk == *text => {}
            Ok(_) => problems.push(StaleFile::Differs(name.clone())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => problems.push(StaleFile::Missing(name.clone())),
            Err(e) => return Err(MoleError::io(format!("reading {}", dir.join(name).display()), e)),
        }
    }
    let wanted: BTreeSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    if let Ok(entries) = std::fs::read_dir(dir) {
        let mut extra: Vec<String> = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.ends_with(".ptx") && !wanted.contains(n.as_str()))
            .collect();
        extra.sort();
        problems.extend(extra.into_iter().map(StaleFile::Unexpected));
    }
    Ok(problems)
}

/// The manifest embedded in this binary (`None` when `ptx/` held none at build time).
pub fn embedded_manifest() -> Result<Option<&'static PtxManifest>> {
    static MANIFEST: OnceLock<std::result::Result<Option<PtxManifest>, String>> = OnceLock::new();
    let parsed = MANIFEST.get_or_init(|| {
        sources::shipped_ptx_file(MANIFEST_FILE).map(serde_json::from_str).transpose().map_err(|e| e.to_string())
    });
    match parsed {
        Ok(m) => Ok(m.as_ref()),
        Err(e) => Err(MoleError::io("parsing the embedded ptx/manifest.json", e)),
    }
}

/// The shipped PTX of `build`, for use without NVRTC. Errors (as [`MoleError::NvrtcNotFound`],
/// since NVRTC is what would make it unnecessary) when `build` is not a shipped default build or
/// its PTX was generated from other sources than the embedded ones.
pub fn shipped_ptx(build: &KernelBuild) -> Result<&'static str> {
    let manifest = embedded_manifest()?.ok_or_else(|| MoleError::NvrtcNotFound {
        detail: "this build of mole ships no PTX (ptx/manifest.json was absent when it was built)".into(),
    })?;
    find_shipped(manifest, build, &unit_hash_hex(build)?, sources::shipped_ptx_file)
}

/// The PTX of `build` in `manifest`, if its recorded source hash is `current_hash`; `file`
/// reads a shipped file by name.
fn find_shipped<'a>(
    manifest: &'a PtxManifest,
    build: &KernelBuild,
    current_hash: &str,
    file: impl Fn(&str) -> Option<&'a str>,
) -> Result<&'a str> {
    let missing = |why: String| MoleError::NvrtcNotFound { detail: why };
    let entry = manifest
        .entries
        .iter()
        .find(|e| e.build == *build)
        .ok_or_else(|| missing(format!("no PTX is shipped for {build}; only the default builds are")))?;
    if entry.source_hash != current_hash {
        return Err(missing(format!(
            "the shipped ptx/{} is stale (built from other sources than kernels/{}); run `mole gen-ptx`",
            entry.file,
            build.family().source_file()
        )));
    }
    file(&entry.file)
        .ok_or_else(|| missing(format!("ptx/{} is listed in the manifest but was not embedded", entry.file)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{gating, sgmv, SgmvConfig};
    use crate::DType;

    #[test]
    fn file_names() {
        assert_eq!(ptx_file_name(&gating::build(DType::BF16, 64)), "gating_bf16.ptx");
        assert_eq!(ptx_file_name(&sgmv::build(DType::F16, SgmvConfig::DEFAULT)), "sgmv_f16.ptx");
    }

    #[test]
    fn embedded_manifest_parses_and_its_files_are_embedded() {
        // Whether ptx/ matches the current sources is `mole gen-ptx --check`'s job; this checks
        // that what was embedded is complete and well-formed.
        let Some(m) = embedded_manifest().unwrap() else { return };
        for e in &m.entries {
            assert_eq!(e.target, "compute_80");
            assert_eq!(e.file, ptx_file_name(&e.build));
            let text = sources::shipped_ptx_file(&e.file).unwrap_or_else(|| panic!("{} not embedded", e.file));
            assert!(text.contains(".target sm_80"));
            for entry in &e.build.entry_points() {
                assert!(text.contains(&format!(".entry {entry}(")), "{entry} missing from {}", e.file);
            }
        }
    }

    #[test]
    fn lookup_checks_the_build_and_the_source_hash() {
        let build = gating::build(DType::F16, 64);
        let manifest = PtxManifest {
            entries: vec![PtxManifestEntry {
                file: "gating_f16.ptx".into(),
                target: "compute_80".into(),
                source_hash: "00000000000000aa".into(),
                nvrtc_version: "12.4".into(),
                build: build.clone(),
            }],
        };
        let files = |name: &str| (name == "gating_f16.ptx").then_some("PTX TEXT");
        assert_eq!(find_shipped(&manifest, &build, "00000000000000aa", files).unwrap(), "PTX TEXT");
        let stale = find_shipped(&manifest, &build, "00000000000000bb", files).unwrap_err();
        assert!(matches!(&stale, MoleError::NvrtcNotFound { detail } if detail.contains("stale")), "{stale}");
        let other = gating::build(DType::F16, 128);
        assert!(matches!(
            find_shipped(&manifest, &other, "00000000000000aa", files),
            Err(MoleError::NvrtcNotFound { .. })
        ));
        let none = |_: &str| None;
        assert!(matches!(
            find_shipped(&manifest, &build, "00000000000000aa", none),
            Err(MoleError::NvrtcNotFound { .. })
        ));
    }

    #[test]
    fn unknown_builds_have_no_shipped_ptx() {
        let b = gating::build(DType::F32, 1024);
        assert!(matches!(shipped_ptx(&b), Err(MoleError::NvrtcNotFound { .. }) | Err(MoleError::Unsupported(_))));
    }

    #[test]
    fn stale_files_reports_each_difference() {
        let dir = tempfile::tempdir().unwrap();
        let expected =
            vec![("a_f32.ptx".to_string(), "A".to_string()), (MANIFEST_FILE.to_string(), "{}\n".to_string())];
        std::fs::write(dir.path().join("a_f32.ptx"), "A").unwrap();
        std::fs::write(dir.path().join(MANIFEST_FILE), "{}\n").unwrap();
        assert!(stale_files(dir.path(), &expected).unwrap().is_empty());
        std::fs::write(dir.path().join("a_f32.ptx"), "B").unwrap();
        std::fs::write(dir.path().join("old_f16.ptx"), "X").unwrap();
        std::fs::remove_file(dir.path().join(MANIFEST_FILE)).unwrap();
        let stale = stale_files(dir.path(), &expected).unwrap();
        assert_eq!(
            stale,
            [
                StaleFile::Differs("a_f32.ptx".into()),
                StaleFile::Missing(MANIFEST_FILE.into()),
                StaleFile::Unexpected("old_f16.ptx".into())
            ]
        );
        assert_eq!(stale[2].to_string(), "old_f16.ptx is not a default build any more");
    }
}
