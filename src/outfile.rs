//! Writing output files safely: atomically, without replacing what is not ours to replace.
//!
//! [`write_atomic`] writes the bytes to a temporary file in the destination's folder and renames
//! it over the destination, so a reader sees the old file or the new one, never half of one.
//! The rules:
//! - a new file gets the mode the umask gives; an existing regular file keeps its mode;
//! - a symbolic link is followed: its target is written, the link stays a link (a link to
//!   nothing is refused);
//! - anything that is not a regular file (a folder, a device, a FIFO, a socket) and a read-only
//!   file are refused before anything is written;
//! - on any failure the destination is untouched and the temporary file is removed.

use crate::{MoleError, Result};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Distinguishes temporary files of concurrent writes within one process.
static COUNTER: AtomicU64 = AtomicU64::new(0);

fn refuse(path: &Path, reason: impl Into<String>) -> MoleError {
    MoleError::UnsafeOutput { path: path.display().to_string(), reason: reason.into() }
}

/// What kind of thing a path names, in words, for errors.
fn kind_of(meta: &fs::Metadata) -> &'static str {
    let ft = meta.file_type();
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_char_device() {
            return "a character device";
        }
        if ft.is_block_device() {
            return "a block device";
        }
        if ft.is_fifo() {
            return "a FIFO";
        }
        if ft.is_socket() {
            return "a socket";
        }
    }
    if ft.is_dir() {
        "a folder"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else {
        "not a regular file"
    }
}

/// The file to write: `path` itself, or the target of the symbolic link `path` names; with its
/// metadata when it exists. Refuses anything but a regular file or a missing one.
fn destination(path: &Path) -> Result<(PathBuf, Option<fs::Metadata>)> {
    let io = |e: std::io::Error| MoleError::io(format!("writing {}", path.display()), e);
    let target = match fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((path.to_path_buf(), None)),
        Err(e) => return Err(io(e)),
        Ok(m) if m.file_type().is_symlink() => fs::canonicalize(path).map_err(|e| {
            refuse(path, format!("it is a symbolic link whose target cannot be resolved ({e}); give the target path"))
        })?,
        Ok(_) => path.to_path_buf(),
    };
    let meta = fs::metadata(&target).map_err(io)?;
    if !meta.is_file() {
        return Err(refuse(path, format!("it is {}, not a regular file", kind_of(&meta))));
    }
    // Permission bits first (root may open anything), then the check the kernel makes.
    if meta.permissions().readonly() || OpenOptions::new().write(true).open(&target).is_err() {
        return Err(refuse(path, "it is read-only; refusing to replace it"));
    }
    Ok((target, Some(meta)))
}

/// Removes the temporary file unless the rename consumed it.
struct TempFile(Option<PathBuf>);

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

/// Writes `bytes` to `path` atomically (see the [module](self) for the rules).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let (target, existing) = destination(path)?;
    let io = |e: std::io::Error| MoleError::io(format!("writing {}", path.display()), e);
    target.file_name().ok_or_else(|| refuse(path, "it names no file"))?;
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // Not derived from the target's name, which may already be as long as a name can be.
    let tmp_path = dir.join(format!(".mole-{}-{n}.tmp", std::process::id()));
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // What a plain create gets: 0666 less the umask; an existing file's own mode from the
        // start, so its new contents are never more readable than its old ones.
        options.mode(
            existing.as_ref().map_or(0o666, |m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777),
        );
    }
    let mut file = options.open(&tmp_path).map_err(io)?;
    let mut tmp = TempFile(Some(tmp_path.clone()));
    file.write_all(bytes).map_err(io)?;
    if let Some(meta) = &existing {
        file.set_permissions(meta.permissions()).map_err(io)?;
    }
    file.sync_all().map_err(io)?;
    drop(file);
    fs::rename(&tmp_path, &target).map_err(io)?;
    tmp.0 = None;
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect()
    }

    #[test]
    fn a_name_as_long_as_names_go_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("o".repeat(250));
        write_atomic(&file, b"long").unwrap();
        assert_eq!(fs::read(&file).unwrap(), b"long");
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn existing_file_keeps_its_mode_and_a_link_stays_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("out.bin");
        fs::write(&file, b"old").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o640)).unwrap();
        write_atomic(&file, b"new").unwrap();
        assert_eq!(fs::read(&file).unwrap(), b"new");
        assert_eq!(mode(&file), 0o640);

        let link = dir.path().join("link.bin");
        symlink(&file, &link).unwrap();
        write_atomic(&link, b"through the link").unwrap();
        assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert_eq!(fs::read(&file).unwrap(), b"through the link");
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn refusals_leave_everything_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let ro = dir.path().join("ro.bin");
        fs::write(&ro, b"keep").unwrap();
        fs::set_permissions(&ro, fs::Permissions::from_mode(0o444)).unwrap();
        let e = write_atomic(&ro, b"x").unwrap_err();
        assert!(e.to_string().contains("read-only"), "{e}");
        assert_eq!(fs::read(&ro).unwrap(), b"keep");
        assert_eq!(mode(&ro), 0o444);

        let e = write_atomic(dir.path(), b"x").unwrap_err();
        assert!(e.to_string().contains("a folder, not a regular file"), "{e}");
        let e = write_atomic(Path::new("/dev/null"), b"x").unwrap_err();
        assert!(e.to_string().contains("a character device"), "{e}");

        let dangling = dir.path().join("dangling");
        symlink(dir.path().join("nowhere"), &dangling).unwrap();
        assert!(write_atomic(&dangling, b"x").is_err());
        assert!(fs::symlink_metadata(&dangling).unwrap().file_type().is_symlink());
        assert!(!dir.path().join("nowhere").exists());
        assert!(leftovers(dir.path()).is_empty());
    }
}
