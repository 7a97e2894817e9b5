//! `mole eval` end to end: a spec file and a safetensors file in, the hand-computed layer out.

use mole::tensors::{load, save, HostTensor, TensorMap, Values};
use std::process::Command;

fn floats(m: &TensorMap, name: &str) -> Vec<f64> {
    match &m[name].values {
        Values::Float(v) => v.clone(),
        Values::Int(_) => panic!("{name} is not float"),
    }
}

#[test]
fn eval_reproduces_the_hand_computed_layer() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("layer.json");
    std::fs::write(
        &spec,
        r#"{
            "d_in": 2, "d_out": 2, "ranks": {"experts": 2, "rank": 1}, "scale": 0.5,
            "gating": {"type": "routed", "router": {"type": "logits"},
                       "rule": {"type": "softmax_topk", "k": 2, "weights": "renormalized"}}
        }"#,
    )
    .unwrap();
    // Two tokens: the hand case [2, 4] with z = [0, ln 3] (y = [5.75, 7.5]) and a token with
    // x = [1, 0], z = [ln 3, 0]: weights [0.75, 0.25], h' = [0.75, 0], y = 1 + 0.5·[0.75, 1.5].
    let mut inputs = TensorMap::new();
    inputs.insert("x".into(), HostTensor::float(vec![2, 2], vec![2.0, 4.0, 1.0, 0.0]));
    inputs.insert("A".into(), HostTensor::float(vec![2, 2], vec![1.0, 0.0, 0.0, 1.0]));
    inputs.insert("B".into(), HostTensor::float(vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]));
    inputs.insert("y".into(), HostTensor::float(vec![2, 2], vec![1.0; 4]));
    inputs.insert("logits".into(), HostTensor::float(vec![2, 2], vec![0.0, 3f64.ln(), 3f64.ln(), 0.0]));
    let in_path = dir.path().join("in.safetensors");
    save(&in_path, &inputs).unwrap();
    let out_path = dir.path().join("out.safetensors");

    let status = Command::new(env!("CARGO_BIN_EXE_mole"))
        .args(["eval", "--spec"])
        .arg(&spec)
        .arg("--inputs")
        .arg(&in_path)
        .arg("--out")
        .arg(&out_path)
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));

    let out = load(&out_path).unwrap();
    let y = floats(&out, "y");
    let want = [5.75, 7.5, 1.375, 1.75];
    assert!(y.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-12), "{y:?}");
    assert_eq!(out["ids"].values, Values::Int(vec![1, 0, 0, 1]));
    assert_eq!(out["ids"].shape, vec![2, 2]);
    let w = floats(&out, "weights");
    assert!(w.iter().zip([0.75, 0.25, 0.75, 0.25]).all(|(g, e)| (g - e).abs() < 1e-12), "{w:?}");
    assert_eq!(floats(&out, "h"), vec![2.0, 4.0, 1.0, 0.0]);
    assert_eq!(floats(&out, "selected_fraction"), vec![1.0, 1.0]);
    assert_eq!(floats(&out, "top1_fraction"), vec![0.5, 0.5]);
    // Both experts are selected by every token: the masked mean is the mean.
    assert_eq!(floats(&out, "masked_mean_prob"), floats(&out, "mean_prob"));
    assert!(out.contains_key("z_loss") && out.contains_key("entropy") && out.contains_key("mean_prob"));
}

#[test]
fn eval_reports_bad_inputs_without_panicking() {
    let spec = r#"{"d_in": 2, "d_out": 2, "ranks": [0, 1, 2], "scale": 1.0, "gating": {"type": "adapter_ids"}}"#;
    let mut inputs = TensorMap::new();
    inputs.insert("x".into(), HostTensor::float(vec![1, 2], vec![1.0, 2.0]));
    inputs.insert("A".into(), HostTensor::float(vec![2, 2], vec![1.0; 4]));
    inputs.insert("B".into(), HostTensor::float(vec![2, 3], vec![1.0; 6]));
    inputs.insert("adapter_ids".into(), HostTensor::int(vec![1], vec![0]));
    let (ok, err) = eval_with(spec, &inputs);
    assert!(!ok);
    assert!(err.contains("tensor `B`: expected shape [2, 2], got [2, 3]"), "{err}");
}

fn eval_with(spec_text: &str, inputs: &TensorMap) -> (bool, String) {
    let (ok, err, _) = eval_outputs(spec_text, inputs);
    (ok, err)
}

/// `mole eval` on `spec_text` and `inputs`: success, stderr and the outputs it wrote.
fn eval_outputs(spec_text: &str, inputs: &TensorMap) -> (bool, String, Option<TensorMap>) {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("layer.json");
    std::fs::write(&spec, spec_text).unwrap();
    let in_path = dir.path().join("in.safetensors");
    save(&in_path, inputs).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mole"))
        .args(["eval", "--spec"])
        .arg(&spec)
        .arg("--inputs")
        .arg(&in_path)
        .arg("--out")
        .arg(dir.path().join("out.safetensors"))
        .output()
        .unwrap();
    let outputs = out.status.success().then(|| load(&dir.path().join("out.safetensors")).unwrap());
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned(), outputs)
}

#[test]
fn eval_applies_per_expert_scales() {
    // The hand case of `eval_reproduces_the_hand_computed_layer` with expert_scales [-2, 0.5]:
    // token 0 h' = [0.25·2, 0.75·4] = [0.5, 3] scaled to [-1, 1.5], h'·B = [3.5, 4],
    // y = 1 + 0.5·[3.5, 4] = [2.75, 3]; token 1 h' = [0.75, 0] scaled to [-1.5, 0],
    // y = 1 + 0.5·[-1.5, -3] = [0.25, -0.5].
    let spec = r#"{
        "d_in": 2, "d_out": 2, "ranks": {"experts": 2, "rank": 1}, "scale": 0.5,
        "gating": {"type": "routed", "router": {"type": "logits"},
                   "rule": {"type": "softmax_topk", "k": 2, "weights": "renormalized"}},
        "expert_scales": [-2.0, 0.5]
    }"#;
    let mut inputs = TensorMap::new();
    inputs.insert("x".into(), HostTensor::float(vec![2, 2], vec![2.0, 4.0, 1.0, 0.0]));
    inputs.insert("A".into(), HostTensor::float(vec![2, 2], vec![1.0, 0.0, 0.0, 1.0]));
    inputs.insert("B".into(), HostTensor::float(vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]));
    inputs.insert("y".into(), HostTensor::float(vec![2, 2], vec![1.0; 4]));
    inputs.insert("logits".into(), HostTensor::float(vec![2, 2], vec![0.0, 3f64.ln(), 3f64.ln(), 0.0]));
    let (ok, err, out) = eval_outputs(spec, &inputs);
    assert!(ok, "{err}");
    let out = out.unwrap();
    let close = |got: Vec<f64>, want: [f64; 4]| got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-12);
    let y = floats(&out, "y");
    assert!(close(y.clone(), [2.75, 3.0, 0.25, -0.5]), "{y:?}");
    let h_mixed = floats(&out, "h_mixed");
    assert!(close(h_mixed.clone(), [-1.0, 1.5, -1.5, 0.0]), "{h_mixed:?}");
    // Routing is untouched by the scales.
    assert_eq!(out["ids"].values, Values::Int(vec![1, 0, 0, 1]));

    // One scale per bank expert, finite: named when wrong.
    let (ok, err) = eval_with(&spec.replace("[-2.0, 0.5]", "[-2.0, 0.5, 1.0]"), &inputs);
    assert!(!ok && err.contains("expert_scales (one per bank expert): expected shape [2]"), "{err}");
    let (ok, err) = eval_with(&spec.replace("[-2.0, 0.5]", "[-2.0, null]"), &inputs);
    assert!(!ok && err.contains("expert_scales[1]: expected a number, got null"), "{err}");
}

#[test]
fn eval_names_the_spec_field_and_the_real_id() {
    let mut inputs = TensorMap::new();
    inputs.insert("x".into(), HostTensor::float(vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]));
    inputs.insert("A".into(), HostTensor::float(vec![2, 2], vec![1.0; 4]));
    inputs.insert("B".into(), HostTensor::float(vec![2, 2], vec![1.0; 4]));
    inputs.insert("adapter_ids".into(), HostTensor::int(vec![2], vec![0, 1 << 33]));
    let spec = r#"{"d_in": 2, "d_out": 2, "ranks": [0, 1, 2], "scale": 1.0, "gating": {"type": "adapter_ids"}}"#;
    let (ok, err) = eval_with(spec, &inputs);
    assert!(!ok && err.contains("expert id 8589934592 at token 1"), "{err}");

    let typo = r#"{"d_in": 2, "d_out": 2, "ranks": [0, 1, 2], "scale": 1.0,
        "gating": {"type": "routed", "router": {"type": "logits"}, "rule": {"type": "dense_softmax", "temprature": 0.01}}}"#;
    let (ok, err) = eval_with(typo, &inputs);
    assert!(
        !ok && err.contains("gating.rule.temprature: unknown field `temprature` (did you mean `temperature`?)"),
        "{err}"
    );
    let (ok, err) = eval_with(r#"[2, 2, [0, 1, 2], 1.0, {"type": "adapter_ids"}]"#, &inputs);
    assert!(!ok && err.contains("layer spec: expected an object, got an array"), "{err}");
    let ranks = r#"{"d_in": 2, "d_out": 2, "ranks": {"experts": 2}, "scale": 1.0, "gating": {"type": "adapter_ids"}}"#;
    let (ok, err) = eval_with(ranks, &inputs);
    assert!(!ok && err.contains("ranks.rank: missing") && !err.contains("untagged"), "{err}");
}

/// `mole eval --inputs /dev/stdin` reading `bytes` through a pipe, or `/dev/zero` when `None`.
fn eval_stream(spec_text: &str, bytes: Option<Vec<u8>>) -> (bool, String, Option<TensorMap>) {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("layer.json");
    std::fs::write(&spec, spec_text).unwrap();
    let out_path = dir.path().join("out.safetensors");
    let stdin = match &bytes {
        Some(_) => std::process::Stdio::piped(),
        None => std::fs::File::open("/dev/zero").unwrap().into(),
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_mole"))
        .args(["eval", "--inputs", "/dev/stdin", "--spec"])
        .arg(&spec)
        .arg("--out")
        .arg(&out_path)
        .stdin(stdin)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(bytes) = bytes {
        let mut pipe = child.stdin.take().unwrap();
        // The reader may stop early (a refused header): a broken pipe is then expected.
        let _ = pipe.write_all(&bytes);
    }
    let out = child.wait_with_output().unwrap();
    let outputs = out.status.success().then(|| load(&out_path).unwrap());
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned(), outputs)
}

#[test]
fn a_stream_is_read_as_far_as_its_header_says() {
    let spec = r#"{"d_in": 2, "d_out": 2, "ranks": [0, 1, 2], "scale": 1.0, "gating": {"type": "adapter_ids"}}"#;
    let mut inputs = TensorMap::new();
    inputs.insert("x".into(), HostTensor::float(vec![1, 2], vec![1.0, 2.0]));
    inputs.insert("A".into(), HostTensor::float(vec![2, 2], vec![1.0, 0.5, -1.0, 2.0]));
    inputs.insert("B".into(), HostTensor::float(vec![2, 2], vec![3.0, 1.0, 0.25, -2.0]));
    inputs.insert("adapter_ids".into(), HostTensor::int(vec![1], vec![1]));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("in.safetensors");
    save(&file, &inputs).unwrap();
    // Through a pipe: the layer as from the file (adapter 1: h = 0.5 + 4, y = h · B[1]).
    let (ok, err, out) = eval_stream(spec, Some(std::fs::read(&file).unwrap()));
    assert!(ok, "{err}");
    assert_eq!(floats(&out.unwrap(), "y"), vec![4.5 * 0.25, 4.5 * -2.0]);
    // An endless stream of zeros is a header of length 0, refused at once, not read to the end.
    let (ok, err, _) = eval_stream(spec, None);
    assert!(!ok && err.contains("header"), "{err}");
}
