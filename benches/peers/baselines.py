#!/usr/bin/env python3
"""PyTorch baselines of the crate's MoLE layers: what a user would run instead, each checked
against the crate's f64 reference (`mole eval`) on the same inputs before it is timed.

    python3 benches/peers/baselines.py --mole PATH --device cuda|cpu --dtype bf16|f16|f32 \\
        --shapes standard|tiny [--tokens 1,16,256,4096] [--runs 20] [--methods LIST] \\
        [--blocks layer,ffn] [--ffn-f 11008,14336] [--ffn-activation silu|gelu] [--backward] \\
        --out FILE.json

`standard`: d_in = d_out = 4096, tokens 1,16,256,4096, the FFN block at d = 4096, f = 11008 and
14336; `tiny`: d = 64, f = 96, tokens 1,16,64, 5 runs (CPU smoke tests). Methods are the crate's
standard set plus adapter serving (`methods.STANDARD`), then MixLoRA's FFN-expert block
(`methods.FFN_STANDARD`: E = 8, r = 16, k = 2, SiLU unless --ffn-activation; its rows carry
`"block": "ffn"`, d, f and the activation, and `tflops`); `--methods` selects by preset name in
both, `--blocks` which of the two to run. Baselines are described in `formulations.py`, the
tolerance and near-tie rules in `check.py`.
Pairs a baseline cannot express get no row (`formulations.unsupported` says why): FlyLoRA in
`loop` and `grouped_mm` (its router reads h of every rank, so the shrink is dense by
construction), CoMoL in `grouped_mm` (shrink and expand are shared by every core; only r x r core
products would be grouped), and `peft_mixed` for every method but adapter serving (PEFT's mixed
batch gives each token one adapter). `grouped_mm` rows are skipped where `torch._grouped_mm`
refuses the device or dtype (probed) or the rank's rows are not 16-byte aligned (SMoRA's rank 1).

Per method: one check set of CHECK_TOKENS tokens goes through `mole eval` and through every
baseline on the device in the storage dtype; a baseline whose relative error exceeds the
tolerance is reported `failed` and not timed. Timing (per token count): warm-up calls, then
`--runs` calls, each on the next of several input sets, so that no call finds its inputs in L2:
L2 is flushed (a read of twice its size) once the sets are made, and a set comes back only after
sets totalling more than twice the L2 (at small T, where that takes more sets than calls, each
set is used once); each call timed with CUDA events (time.perf_counter on a CPU);
routing is inside every call. `time_us` is the median; `gbs` the floor bytes (x read once, y read
and written, A, B, router weight and cores read once) over it; `copy_gbs` a device-to-device copy
(bytes read plus written); `input_sets` how many sets rotated. Exit 0 when every row is ok or
skipped, 1 if any failed.

`--backward` adds, for the layer's methods, the backward of each baseline that autograd
differentiates (rows with `"pass": "backward"`; the forward's rows say `"pass": "forward"`):
`dense`, `loop` and `grouped_mm` where autograd takes `torch._grouped_mm` (probed with its
gradients; skipped with the reason otherwise); `peft_mixed` is skipped (PEFT refuses its mixed
batch in training mode: probed). Its check set is the forward's, with a unit-scale dy that is zero
on the near-tie tokens; each gradient (`Layer.grad_inputs`: x, A unless frozen, B, the router
weight, CoMoL's cores, given weights) is checked against `mole eval`'s `grad.*` when the binary
writes them, else a float64 autograd recomputation on the CPU (`check.grad_reference`; the row's
`check.reference` says which, `check.grads` each gradient's error and tolerance). Timing as the
forward's, each input set a graph built by one forward: only `torch.autograd.grad(y, leaves, dy,
retain_graph=True)` is timed. Floor bytes (`backward.floor_elements`): x and dy read and dx
written; A, B, the router weight and the cores read, and each trained one's gradient written;
given weights read and their gradient written. The FFN block has no backward rows.

The FFN block: its check set has FFN_CHECK_TOKENS tokens (the f64 reference runs three d x f
projections per token and expert); the reference is `mole eval` when the binary takes the block,
else a float64 PyTorch recomputation (`check.ffn_reference`; the row's `check.reference` says
which). Its floor bytes: x read and y written once, the three base weights once, the gate, up and
down LoRA banks of every expert that received a token once, the base gate and up outputs and a_mix
each written and read once (`methods.FfnBlock.floor_elements`); `tflops` counts 2 T (3 d f) for
the base projections plus the routed slots' LoRA products (`useful_flops`); `experts_used` the
mean over the input sets of the experts that received a token.
"""

import argparse
import json
import math
import statistics
import sys
import tempfile
import time

try:
    import torch

    import backward
    import check
    from formulations import (BASELINES, FFN_BASELINES, FFN_PREPARE, PREPARE, Skip, grouped_mm_backward_unsupported,
                              grouped_mm_unsupported, peft_mixed_backward_unsupported, unsupported)
    from methods import FFN_STANDARD, STANDARD, FfnBlock, Layer, ffn_inputs, inputs
except ImportError as e:  # reported as every row skipped: the kit's machine may lack PyTorch
    torch, IMPORT_ERROR = None, e

CHECK_TOKENS = 256
FFN_CHECK_TOKENS = 64
WARMUP = 3
MAX_SETS = 256
BLOCKS = ("layer", "ffn")
# shapes: (d_in = d_out = the block's d, default token counts, default timed runs, the block's f)
SHAPES = {"standard": (4096, [1, 16, 256, 4096], 20, [11008, 14336]), "tiny": (64, [1, 16, 64], 5, [96])}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mole", required=True, help="the mole binary (its `eval` is the reference)")
    p.add_argument("--device", choices=["cuda", "cpu"], required=True)
    p.add_argument("--dtype", choices=["bf16", "f16", "f32"], required=True)
    p.add_argument("--shapes", choices=sorted(SHAPES), required=True)
    p.add_argument("--tokens", help="comma-separated token counts (default: the shapes' own)")
    p.add_argument("--runs", type=int, help="timed calls per row, median reported (20; tiny: 5)")
    p.add_argument("--methods", help="comma-separated subset of the standard methods and block presets")
    p.add_argument("--blocks", default=",".join(BLOCKS), help="comma-separated: layer (the projection "
                   "layer's methods), ffn (the FFN-expert block); default both")
    p.add_argument("--ffn-f", help="comma-separated intermediate widths f of the FFN block (default: the shapes')")
    p.add_argument("--ffn-activation", choices=["silu", "gelu"], default="silu", help="the FFN block's activation")
    p.add_argument("--backward", action="store_true", help="also the layer methods' backward (autograd)")
    p.add_argument("--out", required=True, help="JSON results")
    a = p.parse_args(argv)
    d, tokens, runs, ffn_f = SHAPES[a.shapes]
    a.d, a.runs = d, runs if a.runs is None else a.runs
    a.token_counts = [int(s) for s in a.tokens.split(",")] if a.tokens else tokens
    a.ffn_f = [int(s) for s in a.ffn_f.split(",")] if a.ffn_f else ffn_f
    a.blocks = a.blocks.split(",")
    if a.runs < 1 or any(t < 1 for t in a.token_counts) or any(f < 1 for f in a.ffn_f):
        p.error("--runs, every token count and every --ffn-f must be >= 1")
    if any(b not in BLOCKS for b in a.blocks):
        p.error(f"--blocks takes {', '.join(BLOCKS)}")
    return a


def selected(args, name):
    return not args.methods or name in args.methods.split(",")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if torch is None:
        reason = f"PyTorch is not importable: {IMPORT_ERROR}"
        return finish(args, {"device": args.device, "torch": None}, skipped_rows(args, reason))
    layers = [Layer(m, args.d, args.d, e, r, k) for m, e, r, k in STANDARD
              if "layer" in args.blocks and selected(args, m)]
    blocks = [FfnBlock(m, args.d, f, args.ffn_activation, e, r, k) for f in args.ffn_f for m, e, r, k in FFN_STANDARD
              if "ffn" in args.blocks and selected(args, m)]
    if args.device == "cuda" and not torch.cuda.is_available():
        meta = {"device": "cuda (not available)", "torch": torch.__version__}
        return finish(args, meta, skipped_rows(args, "CUDA is not available to this PyTorch", layers, blocks))
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[args.dtype]
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # f32 baselines compute in f32 (PyTorch's default)
    bench = Bench(args, device, dtype)
    meta = {"device": bench.device_name(), "torch": torch.__version__, "copy_gbs": bench.copy_gbs(),
            "l2_bytes": bench.l2_bytes}
    rows = []
    with tempfile.TemporaryDirectory(prefix="mole-peers-") as work:
        for seed, layer in enumerate(layers):
            rows += bench.method_rows(layer, seed, work)
        for seed, block in enumerate(blocks, start=len(STANDARD)):
            rows += bench.ffn_rows(block, seed, work)
    return finish(args, meta, rows)


class Bench:
    def __init__(self, args, device, dtype):
        self.args, self.device, self.dtype = args, device, dtype
        self.cuda = device.type == "cuda"
        props = torch.cuda.get_device_properties(device) if self.cuda else None
        self.l2_bytes = getattr(props, "L2_cache_size", None) if props else None
        # Rotation target: twice the L2 (128 MiB, more than any current L2, where CUDA does not
        # say; none on a CPU, where two sets alternate).
        self.rotate_bytes = 2 * (self.l2_bytes or 128 << 20) if self.cuda else None
        self.scratch = torch.empty(self.rotate_bytes, dtype=torch.uint8, device=device) if self.cuda else None
        self.probes = {}

    def probe(self, fn):
        """`fn(device, dtype)`'s reason (or None), run once per run."""
        if fn not in self.probes:
            self.probes[fn] = fn(self.device, self.dtype)
        return self.probes[fn]

    def device_name(self):
        if self.cuda:
            cap = torch.cuda.get_device_capability(self.device)
            return f"{torch.cuda.get_device_name(self.device)} (sm_{cap[0]}{cap[1]})"
        return "cpu"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time_us(self, calls, runs):
        """Median µs of `runs` calls after WARMUP; call i runs `calls[i % len(calls)]`."""
        for i in range(WARMUP):
            calls[i % len(calls)]()
        self.sync()
        order = [calls[(WARMUP + i) % len(calls)] for i in range(runs)]
        if self.cuda:
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in order]
            for fn, (start, end) in zip(order, events):
                start.record()
                fn()
                end.record()
            self.sync()
            times = [s.elapsed_time(e) * 1e3 for s, e in events]
        else:
            times = []
            for fn in order:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(times)

    def copy_gbs(self):
        """A device-to-device copy of 256 MiB (64 MiB on a CPU): bytes read plus written over the
        median time."""
        n = (256 if self.cuda else 64) << 20
        src = torch.ones(n, dtype=torch.uint8, device=self.device)
        dst = torch.empty_like(src)
        us = self.time_us([lambda: dst.copy_(src)], 10)
        return 2.0 * n / (us * 1e-6) / 1e9

    def element_size(self):
        return torch.tensor([], dtype=self.dtype).element_size()

    def sets_for(self, per_set):
        """Input sets of `per_set` bytes to rotate (2 on a CPU): enough to exceed the rotation
        target, so that a set comes back only after more than twice the L2 of others, but no more
        than the calls use."""
        if not self.rotate_bytes:
            return 2
        return min(MAX_SETS, WARMUP + self.args.runs, max(2, math.ceil(self.rotate_bytes / per_set) + 1))

    def evict_l2(self):
        """Reads a buffer of twice the L2, so that no set is still in L2 from its preparation."""
        if self.cuda:
            self.scratch.max()

    def method_rows(self, layer, seed, work):
        t = inputs(layer, CHECK_TOKENS, self.dtype, self.device, seed)
        try:
            ref = check.reference(self.args.mole, layer, t, work)
            problems = check.spec_problems(layer, t, ref)
            fail_all = f"failed: spec disagrees with the method: {'; '.join(problems)}" if problems else None
            tie = check.near_ties(layer, t, ref, self.dtype)
        except Exception as e:
            fail_all = f"failed: reference: {type(e).__name__}: {str(e)[:300]}"
        tol = check.tolerance(layer, self.dtype)
        rows = []
        for name in BASELINES:
            if unsupported(name, layer):
                continue
            status, record = fail_all, None
            if status is None and name == "grouped_mm":
                reason = self.probe(grouped_mm_unsupported)
                status = f"skipped: {reason}" if reason else None
            if status is None:
                status, record = self.check_one(PREPARE[name], layer, t, ref["y"], tie, tol)
            for tokens in self.args.token_counts:
                rows.append(self.row(layer, tokens, name, status, record, PREPARE[name], seed))
        if self.args.backward:
            rows += self.backward_rows(layer, t, None if fail_all else (ref, tie), fail_all, seed, work)
        return rows

    def backward_rows(self, layer, t, checked, fail_all, seed, work):
        """The backward's rows of `layer`: each baseline's gradients checked on the check set `t`
        (`checked`: the forward's reference outputs and near-ties, None where they failed), then
        timed per token count."""
        status_all, grad_ref, source = fail_all, None, None
        if checked:
            ref, tie = checked
            dy = backward.random_dy(layer, CHECK_TOKENS, self.dtype, self.device, 7919 + seed)
            dy[tie.to(self.device)] = 0  # near-ties reach no gradient (check.py)
            try:
                grad_ref, source = check.grad_reference(self.args.mole, layer, t, dy, ref, work)
            except Exception as e:
                status_all = f"failed: gradient reference: {type(e).__name__}: {str(e)[:300]}"
        probes = {"grouped_mm": grouped_mm_backward_unsupported, "peft_mixed": peft_mixed_backward_unsupported}
        rows = []
        for name in BASELINES:
            if unsupported(name, layer):
                continue
            status, record = status_all, None
            if status is None and name in probes:
                reason = self.probe(probes[name])
                status = f"skipped: {reason}" if reason else None
            if status is None:
                status, record = self.check_backward(name, layer, t, dy, grad_ref, int(tie.sum()))
                if record is not None:
                    record["reference"] = source
            for tokens in self.args.token_counts:
                rows.append(self.backward_row(layer, tokens, name, status, record, seed))
        return rows

    def check_backward(self, name, layer, t, dy, grad_ref, ties):
        try:
            grads = backward.Graph(name, layer, t, dy).gradients()
            self.sync()
        except Skip as e:
            return f"skipped: {e}", None
        except Exception as e:
            return f"failed: {type(e).__name__}: {str(e)[:300]}", None
        tol = lambda n: check.tolerance_grad(layer, self.dtype, n, CHECK_TOKENS)  # noqa: E731
        record, problems = check.compare_grads(grads, grad_ref, tol, ties)
        return ("ok" if not problems else f"failed: {'; '.join(problems)[:300]}"), record

    def backward_row(self, layer, tokens, name, status, record, seed):
        row = layer_row(layer, tokens, name, status, record, "backward")
        if status != "ok":
            return row
        el = self.element_size()
        floor = el * backward.floor_elements(layer, tokens)
        n = self.sets_for(floor)
        try:
            graphs = [backward.Graph(name, layer, inputs(layer, tokens, self.dtype, self.device, 1000 * seed + i),
                                     backward.random_dy(layer, tokens, self.dtype, self.device, 1000 * seed + 500 + i))
                      for i in range(n)]
            self.evict_l2()
            us = self.time_us([g.backward for g in graphs], self.args.runs)
        except Exception as e:
            row["status"] = f"failed: timing: {type(e).__name__}: {str(e)[:300]}"
            return row
        row.update(time_us=us, gbs=floor / (us * 1e-6) / 1e9, input_sets=n)
        return row

    def check_one(self, prepare, layer, t, ref_y, tie, tol):
        tc = dict(t, y=t["y"].clone()) if "y" in t else dict(t)
        try:
            y = prepare(layer, tc)()
            self.sync()
        except Skip as e:
            return f"skipped: {e}", None
        except Exception as e:
            return f"failed: {type(e).__name__}: {str(e)[:300]}", None
        record = check.compare(y, ref_y, tie, tol)
        ok = record["rel_err"] <= tol
        return ("ok" if ok else f"failed: rel_err {record['rel_err']:.3e} > tol {tol:.3e}"), record

    def row(self, layer, tokens, name, status, record, prepare, seed):
        row = layer_row(layer, tokens, name, status, record, "forward")
        if status != "ok":
            return row
        el = self.element_size()
        n = self.sets_for(el * (tokens * (layer.d_in + layer.d_out) + layer.weight_elements()))
        try:
            calls = [prepare(layer, inputs(layer, tokens, self.dtype, self.device, 1000 * seed + i)) for i in range(n)]
            self.evict_l2()
            us = self.time_us(calls, self.args.runs)
        except Exception as e:
            row["status"] = f"failed: timing: {type(e).__name__}: {str(e)[:300]}"
            return row
        floor = el * (tokens * (layer.d_in + 2 * layer.d_out) + layer.weight_elements())
        row.update(time_us=us, gbs=floor / (us * 1e-6) / 1e9, input_sets=n)
        return row

    def ffn_rows(self, block, seed, work):
        """The FFN block's rows: checked on FFN_CHECK_TOKENS tokens, then timed per token count."""
        t = ffn_inputs(block, FFN_CHECK_TOKENS, self.dtype, self.device, seed)
        fail_all, source = None, None
        try:
            ref, source = check.ffn_reference(self.args.mole, block, t, work)
            problems = check.spec_problems(block, t, ref)
            fail_all = f"failed: spec disagrees with the method: {'; '.join(problems)}" if problems else None
            tie = check.near_ties(block, t, ref, self.dtype)
        except Exception as e:
            fail_all = f"failed: reference: {type(e).__name__}: {str(e)[:300]}"
        tol = check.tolerance_ffn(block, self.dtype)
        rows = []
        for name in FFN_BASELINES:
            status, record = fail_all, None
            if status is None:
                status, record = self.check_one(FFN_PREPARE[name], block, t, ref["y"], tie, tol)
                if record is not None:
                    record["reference"] = source
            for tokens in self.args.token_counts:
                rows.append(self.ffn_row(block, tokens, name, status, record, seed))
        return rows

    def ffn_row(self, block, tokens, name, status, record, seed):
        row = dict(ffn_shape(block), tokens=tokens, baseline=name, status=status, time_us=None, gbs=None,
                   tflops=None, check=record)
        if status != "ok":
            return row
        el = self.element_size()
        n = self.sets_for(el * block.floor_elements(tokens, block.experts))
        try:
            sets = [ffn_inputs(block, tokens, self.dtype, self.device, 1000 * seed + i) for i in range(n)]
            used = statistics.mean(experts_used(block, s) for s in sets)
            calls = [FFN_PREPARE[name](block, s) for s in sets]
            self.evict_l2()
            us = self.time_us(calls, self.args.runs)
        except Exception as e:
            row["status"] = f"failed: timing: {type(e).__name__}: {str(e)[:300]}"
            return row
        floor = el * block.floor_elements(tokens, used)
        row.update(time_us=us, gbs=floor / (us * 1e-6) / 1e9, tflops=block.useful_flops(tokens) / (us * 1e-6) / 1e12,
                   input_sets=n, experts_used=used)
        return row


def layer_row(layer, tokens, name, status, record, pass_):
    """A layer row's fields before timing (`pass`: forward or backward)."""
    return {"method": layer.method, "d_in": layer.d_in, "d_out": layer.d_out, "experts": layer.experts,
            "rank": layer.rank, "k": layer.k, "tokens": tokens, "baseline": name, "pass": pass_, "status": status,
            "time_us": None, "gbs": None, "check": record}


def experts_used(block, t):
    """How many experts receive a token of `t` (top-k of the router's f32 scores)."""
    scores = t["x"].float() @ t["router_weight"].float()
    return int(scores.topk(block.k, dim=-1).indices.unique().numel())


def ffn_shape(block):
    return {"block": "ffn", "method": block.method, "d": block.d, "f": block.f, "activation": block.activation,
            "experts": block.experts, "rank": block.rank, "k": block.k}


def skipped_rows(args, reason, layers=None, blocks=()):
    """Every row the run would have, skipped for `reason` (without torch the layers are unknown)."""
    if layers is None:
        return [{"method": None, "baseline": None, "status": f"skipped: {reason}"}]
    empty = {"status": f"skipped: {reason}", "time_us": None, "gbs": None, "check": None}
    passes = ("forward", "backward") if args.backward else ("forward",)
    return [
        layer_row(ly, tok, b, f"skipped: {reason}", None, p)
        for p in passes for ly in layers for b in BASELINES if not unsupported(b, ly) for tok in args.token_counts
    ] + [dict(ffn_shape(bl), tokens=tok, baseline=b, tflops=None, **empty)
         for bl in blocks for b in FFN_BASELINES for tok in args.token_counts]


def finish(args, meta, rows):
    out = {"device": meta.get("device"), "torch": meta.get("torch"), "dtype": args.dtype,
           "copy_gbs": meta.get("copy_gbs"), "l2_bytes": meta.get("l2_bytes"), "rows": rows}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print_table(out)
    return 1 if any(str(r["status"]).startswith("failed") for r in rows) else 0


def print_table(out):
    copy = out["copy_gbs"]
    print(f"device: {out['device']}  torch {out['torch']}  dtype {out['dtype']}  copy "
          f"{'-' if copy is None else f'{copy:.1f}'} GB/s  L2 {out['l2_bytes']}")
    print(f"{'method':<18} {'T':>5} {'baseline':<11} {'time us':>10} {'GB/s':>8} {'rel_err':>9} {'tol':>9} "
          f"{'ties':>4}  status")
    for r in out["rows"]:
        c = r.get("check") or {}
        num = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        name = f"{r['method']} ffn {r['f']}" if r.get("block") == "ffn" else str(r["method"])
        name += " bwd" if r.get("pass") == "backward" else ""
        print(f"{name:<18} {num(r.get('tokens'), 'd'):>5} {str(r['baseline']):<11} "
              f"{num(r.get('time_us'), '.1f'):>10} {num(r.get('gbs'), '.1f'):>8} {num(c.get('rel_err'), '.2e'):>9} "
              f"{num(c.get('tol'), '.2e'):>9} {num(c.get('near_tie_tokens'), 'd'):>4}  {r['status']}")


if __name__ == "__main__":
    sys.exit(main())
