#!/usr/bin/env python3
"""The Python package on a GPU with the machine's own PyTorch (a step of the GPU kit):

1. forward and backward of ``mole.torch.MoleFunction`` (MixLoRA, f32 and bf16) against PyTorch
   autograd of a dense formulation in f64 (top-k selection held constant, as the layer does);
2. a CUDA-graph capture of the forward, replayed on new inputs, against the eager forward;
3. the calls leave the thread's current CUDA context as they found it, and the sizes planned
   without a GPU (``mole.plan_sizes``) are the layer's;
4. a short training loop of ``MoleLinear`` toward a fixed teacher: the loss must decrease.

Writes JSON results (``--json``); exits 1 when a check fails. The package comes from the wheel
in ``--wheel-dir`` (unzipped into a temporary folder: no pip, no network) or the environment."""

import argparse
import glob
import json
import os
import sys
import tempfile
import time
import traceback
import zipfile


def load_mole(wheel_dir):
    wheels = sorted(glob.glob(os.path.join(wheel_dir or "", "*.whl"))) if wheel_dir else []
    if wheels:
        dest = tempfile.mkdtemp(prefix="mole-wheel-")
        zipfile.ZipFile(wheels[-1]).extractall(dest)
        sys.path.insert(0, dest)
    import mole  # noqa: F401

    return wheels[-1] if wheels else "environment"


def dense(torch, spec, x, a, b, y, wg, bias, k, rank):
    """MixLoRA in plain PyTorch: softmax router, top-k renormalised, expert columns scaled."""
    z = x @ wg + (bias if bias is not None else 0)
    p = torch.softmax(z, dim=-1)
    top = torch.topk(p.detach(), k, dim=-1).indices
    w = torch.gather(p, 1, top)
    w = w / w.sum(dim=-1, keepdim=True)
    experts = wg.shape[1]
    gate = torch.zeros(x.shape[0], experts, dtype=x.dtype, device=x.device).scatter(1, top, w)
    h = x @ a
    mixed = h * gate.repeat_interleave(rank, dim=1)
    return y + spec["scale"] * mixed @ b


def rel_err(got, want):
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30))


def check_forward_backward(torch, mole_torch, mole, dtype, tol):
    d_in, d_out, e, r, k, t = 64, 48, 4, 8, 2, 37
    spec = mole.spec("mix-lora-per-linear", d_in=d_in, d_out=d_out, experts=e, rank=r, k=k, alpha=16.0)
    layer = mole.Layer(spec, {torch.float32: "f32", torch.bfloat16: "bf16"}[dtype])
    g = torch.Generator(device="cpu").manual_seed(1)
    mk = lambda *s, sc=1.0: (torch.randn(*s, generator=g) * sc).to("cuda", dtype)  # noqa: E731
    x, a, b, y = mk(t, d_in), mk(d_in, e * r, sc=0.2), mk(e * r, d_out, sc=0.2), mk(t, d_out)
    wg = mk(d_in, e, sc=0.3)
    leaves = [v.clone().requires_grad_(True) for v in (x, a, b, wg)]
    out = mole_torch.MoleFunction.apply(layer, leaves[0], leaves[1], leaves[2], y, leaves[3], None, None)
    dy = mk(t, d_out)
    out.backward(dy)
    ref_leaves = [v.double().clone().requires_grad_(True) for v in (x, a, b, wg)]
    want = dense(torch, spec, ref_leaves[0], ref_leaves[1], ref_leaves[2], y.double(), ref_leaves[3], None, k, r)
    want.backward(dy.double())
    errs = {"y": rel_err(out.detach(), want.detach())}
    for name, got, ref in zip(("x", "a", "b", "router_weight"), leaves, ref_leaves):
        errs["d" + name] = rel_err(got.grad, ref.grad)
    ok = all(v <= tol for v in errs.values())
    return {"dtype": str(dtype), "tolerance": tol, "relative_errors": errs, "pass": ok}


def check_graph(torch, mole_torch, mole):
    spec = mole.spec("mix-lora-per-linear", d_in=128, d_out=96, experts=8, rank=4, k=2)
    layer = mole.Layer(spec, "bf16")
    t = 64
    layer.prepare(t)
    g = torch.Generator(device="cpu").manual_seed(2)
    mk = lambda *s: torch.randn(*s, generator=g).to("cuda", torch.bfloat16)  # noqa: E731
    x, a, b, wg = mk(t, 128), mk(128, 32) * 0.1, mk(32, 96) * 0.1, mk(128, 8)
    y = torch.zeros(t, 96, device="cuda", dtype=torch.bfloat16)
    ws = torch.empty(max(layer.workspace_bytes(t), 1), dtype=torch.uint8, device="cuda")
    arr = mole_torch.device_array

    def run():
        layer.forward(arr(x, "x"), arr(a, "a"), arr(b, "b"), arr(y, "y"), arr(ws, "workspace"),
                      router_weight=arr(wg, "router_weight"), stream=torch.cuda.current_stream())

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    # One eager call on the capture's stream and buffers first, as PyTorch recommends before a capture.
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        run()
    results = []
    for _ in range(2):
        x.copy_(mk(t, 128))
        y.zero_()
        graph.replay()
        torch.cuda.synchronize()
        replayed = y.clone()
        y.zero_()
        mole_torch.forward(layer, x, a, b, y, router_weight=wg)
        torch.cuda.synchronize()
        results.append(bool(torch.equal(replayed, y)) and float(y.float().abs().max()) > 0)
    return {"replays_bit_identical_to_eager": results, "pass": all(results)}


def check_context(torch, mole):
    """Calls leave the thread's current CUDA context as they found it (PyTorch's current device
    follows it): none current before a layer's creation and first forward, none after."""
    import ctypes

    cuda = ctypes.CDLL("libcuda.so.1")
    before, seen = ctypes.c_void_p(), ctypes.c_void_p()
    torch.cuda.synchronize()
    cuda.cuCtxGetCurrent(ctypes.byref(before))
    spec = mole.spec("mix-lora-per-linear", d_in=64, d_out=48, experts=4, rank=4, k=2)
    x, a, b, y, wg = (torch.randn(*s, device="cuda") for s in ((8, 64), (64, 16), (16, 48), (8, 48), (64, 4)))
    # Sized by the planner without a GPU (no allocation may run between the calls checked).
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    planned = mole.plan_sizes(spec, 8, sm_count=sms, dtype="f32")
    ws = torch.empty(max(planned["workspace_bytes"], 1), dtype=torch.uint8, device="cuda")
    arrays = [mole.torch.device_array(t, n) for t, n in ((x, "x"), (a, "a"), (b, "b"), (y, "y"), (ws, "workspace"))]
    torch.cuda.synchronize()
    cuda.cuCtxSetCurrent(None)
    try:
        layer = mole.Layer(spec, "f32")
        layer.forward(*arrays, router_weight=mole.torch.device_array(wg, "router_weight"), stream=0)
        cuda.cuCtxGetCurrent(ctypes.byref(seen))
    finally:
        cuda.cuCtxSetCurrent(before)
    torch.cuda.synchronize()
    sizes = {"workspace_bytes": layer.workspace_bytes(8), "saved_bytes": layer.saved_bytes(8),
             "backward_workspace_bytes": layer.backward_workspace_bytes(8)}
    return {"current_context_after_calls": seen.value, "planned_sizes": planned, "layer_sizes": sizes,
            "pass": seen.value is None and planned == sizes}


def check_training(torch, mole_torch):
    torch.manual_seed(3)
    d, t = 96, 256
    base = torch.nn.Linear(d, d).cuda()
    # The teacher is the base plus a rank-4 change: what a LoRA bank can learn.
    teacher = torch.nn.Linear(d, d).cuda()
    with torch.no_grad():
        teacher.weight.copy_(base.weight + 0.3 * torch.randn(d, 4, device="cuda") @ torch.randn(4, d, device="cuda") / d**0.5)
        teacher.bias.copy_(base.bias)
    model = mole_torch.MoleLinear.from_linear(base, method="mix-lora-per-linear", experts=4, rank=8, k=2)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(t, d, device="cuda")
    with torch.no_grad():
        target = teacher(x)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return {"first_loss": losses[0], "last_loss": losses[-1], "steps": len(losses),
            "pass": losses[-1] < 0.5 * losses[0]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--wheel-dir")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    report = {"checks": {}}
    try:
        import torch
    except ImportError as e:
        report.update(status="skipped", reason=f"no PyTorch here: {e}")
        json.dump(report, open(args.json, "w"), indent=2)
        return 0
    if not torch.cuda.is_available():
        report.update(status="skipped", reason="torch.cuda.is_available() is false")
        json.dump(report, open(args.json, "w"), indent=2)
        return 0
    report["package"] = load_mole(args.wheel_dir)
    report["torch"] = torch.__version__
    import mole
    import mole.torch as mole_torch

    checks = {
        "forward_backward_f32": lambda: check_forward_backward(torch, mole_torch, mole, torch.float32, 1e-4),
        "forward_backward_bf16": lambda: check_forward_backward(torch, mole_torch, mole, torch.bfloat16, 3e-2),
        "cuda_graph": lambda: check_graph(torch, mole_torch, mole),
        "current_context_kept": lambda: check_context(torch, mole),
        "training": lambda: check_training(torch, mole_torch),
    }
    for name, fn in checks.items():
        start = time.monotonic()
        try:
            r = fn()
        except Exception as e:  # a failing check is reported, the others still run
            r = {"pass": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        r["seconds"] = round(time.monotonic() - start, 2)
        report["checks"][name] = r
        print(f"{name}: {'pass' if r['pass'] else 'FAIL'} {json.dumps({k: v for k, v in r.items() if k != 'traceback'})}")
    ok = all(r["pass"] for r in report["checks"].values())
    report["status"] = "pass" if ok else "fail"
    json.dump(report, open(args.json, "w"), indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
