//! Fuzzing where outputs go: `mole::tensors::save` (and `mole eval --out`) onto every kind of
//! path — missing, regular with any mode, read-only, a link to a file, to nothing or to a
//! folder, a folder, a FIFO, a device, a path in a missing folder — with writes that succeed and
//! writes that fail. A success leaves a regular file with the new contents and the old mode (or
//! the umask's), links still links; a refusal or failure leaves everything exactly as it was;
//! no temporary file is ever left behind.

#![cfg(unix)]

mod fuzz;

use mole::tensors::{load, save, HostTensor, TensorMap};
use proptest::prelude::*;
use std::fs;
use std::os::unix::fs::{symlink, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

#[global_allocator]
static ALLOC: fuzz::Bounded = fuzz::Bounded;

/// What is at a path, as far as a write could change it.
#[derive(Debug, PartialEq)]
enum Snapshot {
    Missing,
    Link(PathBuf, Box<Snapshot>),
    File { mode: u32, bytes: Vec<u8> },
    Other { kind: String, mode: u32 },
}

fn snapshot(p: &Path) -> Snapshot {
    let Ok(meta) = fs::symlink_metadata(p) else { return Snapshot::Missing };
    let ft = meta.file_type();
    let mode = meta.permissions().mode() & 0o7777;
    if ft.is_symlink() {
        let target = fs::read_link(p).unwrap();
        let resolved = p.parent().unwrap().join(&target);
        return Snapshot::Link(target, Box::new(snapshot(&resolved)));
    }
    if ft.is_file() {
        return Snapshot::File { mode, bytes: fs::read(p).unwrap() };
    }
    let kind = if ft.is_dir() {
        "dir"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_char_device() {
        "char"
    } else {
        "other"
    };
    Snapshot::Other { kind: kind.into(), mode }
}

fn temporaries(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect()
}

const KINDS: usize = 10;

/// Puts kind `kind` at `dir/out.safetensors` and returns the path to write.
fn prepare(dir: &Path, kind: usize, mode: u32) -> PathBuf {
    let out = dir.join("out.safetensors");
    let target = dir.join("target.safetensors");
    match kind {
        0 => {}
        1 | 2 => {
            fs::write(&out, b"previous contents").unwrap();
            fs::set_permissions(&out, fs::Permissions::from_mode(if kind == 2 { 0o444 } else { mode })).unwrap();
        }
        3 => {
            fs::write(&target, b"previous target").unwrap();
            fs::set_permissions(&target, fs::Permissions::from_mode(mode)).unwrap();
            symlink("target.safetensors", &out).unwrap();
        }
        4 => symlink("nowhere.safetensors", &out).unwrap(),
        5 => {
            fs::create_dir(dir.join("sub")).unwrap();
            symlink("sub", &out).unwrap();
        }
        6 => fs::create_dir(&out).unwrap(),
        7 => assert!(Command::new("mkfifo").arg(&out).status().unwrap().success()),
        8 => return PathBuf::from("/dev/null"),
        _ => return dir.join("missing-folder").join("out.safetensors"),
    }
    out
}

fn outputs(valid: bool) -> TensorMap {
    let mut m = TensorMap::new();
    m.insert("y".into(), HostTensor::float(vec![2, 3], vec![1.5, -2.0, 0.25, 8.0, -0.5, 3.0]));
    m.insert("ids".into(), HostTensor::int(vec![2, 1], vec![1, -1]));
    if !valid {
        // Three elements declared, two given: encoding fails before anything is written.
        m.insert("weights".into(), HostTensor::float(vec![3], vec![1.0, 2.0]));
    }
    m
}

fn eval_cli(dir: &Path, out: &Path, spec_ok: bool) -> bool {
    let spec = dir.join("layer.json");
    let rule = if spec_ok { "temperature" } else { "temprature" };
    fs::write(
        &spec,
        format!(
            r#"{{"d_in": 2, "d_out": 3, "ranks": {{"experts": 2, "rank": 1}}, "scale": 0.5,
                "gating": {{"type": "routed", "router": {{"type": "logits"}},
                           "rule": {{"type": "softmax_topk", "k": 1, "{rule}": 2.0}}}}}}"#
        ),
    )
    .unwrap();
    let mut inputs = TensorMap::new();
    inputs.insert("x".into(), HostTensor::float(vec![2, 2], vec![1.0, 2.0, -1.0, 0.5]));
    inputs.insert("A".into(), HostTensor::float(vec![2, 2], vec![1.0, 0.0, 0.5, 1.0]));
    inputs.insert("B".into(), HostTensor::float(vec![2, 3], vec![1.0, 2.0, 3.0, -1.0, 0.0, 1.0]));
    inputs.insert("logits".into(), HostTensor::float(vec![2, 2], vec![0.0, 1.0, 2.0, -1.0]));
    let in_path = dir.join("in.bin");
    save(&in_path, &inputs).unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_mole"))
        .args(["eval", "--spec"])
        .arg(&spec)
        .arg("--inputs")
        .arg(&in_path)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stderr);
    assert!(!text.contains("panicked"), "{text}");
    status.status.success()
}

proptest! {
    #![proptest_config(fuzz::config(96))]

    #[test]
    fn outputs_are_written_whole_or_not_at_all(
        kind in 0..KINDS,
        mode in prop::sample::select(vec![0o600u32, 0o640, 0o644, 0o660, 0o664, 0o604]),
        valid in prop::bool::weighted(0.8),
        via_cli in prop::bool::weighted(0.2),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let out = prepare(dir.path(), kind, mode);
        let before = snapshot(&out);
        let ok = if via_cli { eval_cli(dir.path(), &out, valid) } else { save(&out, &outputs(valid)).is_ok() };
        let writable = matches!(kind, 0 | 1 | 3);
        prop_assert_eq!(ok, writable && valid, "kind {} valid {} cli {}", kind, valid, via_cli);
        prop_assert!(temporaries(dir.path()).is_empty(), "{:?}", temporaries(dir.path()));
        if !ok {
            prop_assert_eq!(snapshot(&out), before, "kind {} was changed by a failed write", kind);
            return Ok(());
        }
        // The new contents, at the right place, with the right mode.
        let written = if kind == 3 { dir.path().join("target.safetensors") } else { out.clone() };
        let meta = fs::symlink_metadata(&written).unwrap();
        prop_assert!(meta.file_type().is_file());
        let want_mode = if kind == 0 { fuzz::umask().map(|u| 0o666 & !u) } else { Some(mode) };
        if let Some(m) = want_mode {
            prop_assert_eq!(meta.permissions().mode() & 0o7777, m, "kind {}", kind);
        }
        if kind == 3 {
            prop_assert!(fs::symlink_metadata(&out).unwrap().file_type().is_symlink());
        }
        let back = load(&out).unwrap();
        if via_cli {
            prop_assert!(back.contains_key("y") && back.contains_key("ids"));
        } else {
            prop_assert_eq!(back, outputs(true));
        }
    }
}
