#!/usr/bin/env python3
"""Tests of the PyTorch baselines on a CPU against the crate's reference (`mole eval`).

    python3 benches/peers/test_baselines.py

Needs torch and safetensors (PEFT optional: without it `peft_mixed` must be skipped) and a built
`mole` (`$MOLE`, else target/release/mole, else target/debug/mole). Runs the tiny set through the
command line exactly as the GPU kit does (with the backward), and checks that a wrong baseline
fails its check. The FFN block's baselines are also compared with a float64 recomputation by plain
per-token loops written here (independent of `check.ffn_reference_f64`); the backward's float64
recomputation (`check.layer_grads_f64`) is checked against `mole eval`'s y and finite differences.
"""

import json
import math
import os
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

sys.dont_write_bytecode = True
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import backward  # noqa: E402
import baselines  # noqa: E402
import check  # noqa: E402
import formulations  # noqa: E402
from methods import FFN_STANDARD, STANDARD, FfnBlock, Layer, ffn_inputs, inputs  # noqa: E402

REQUIRED = ("mix-lora-per-linear", "dyn-mole", "x-lora", "smora", "comol", "adapter-serving")


def mole_binary():
    for candidate in (os.environ.get("MOLE"), ROOT / "target/release/mole", ROOT / "target/debug/mole"):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    raise RuntimeError("no mole binary: run `cargo build --release --features cli` or set MOLE=/path/to/mole")


def peft_available():
    try:
        import peft  # noqa: F401
    except Exception:
        return False
    return True


def run_cli(*args):
    """Runs baselines.py as the kit does; returns (exit code, parsed JSON, stdout)."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out.json"
        cmd = [sys.executable, str(HERE / "baselines.py"), "--mole", mole_binary(), "--device", "cpu",
               "--shapes", "tiny", "--out", str(out), *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert out.is_file(), f"no JSON written:\n{done.stdout}\n{done.stderr}"
        return done.returncode, json.loads(out.read_text()), done.stdout + done.stderr


def expected_rows(tokens, passes=("forward",)):
    rows = set()
    for m, e, r, k in STANDARD:
        layer = Layer(m, 64, 64, e, r, k)
        for b in formulations.BASELINES:
            if not formulations.unsupported(b, layer):
                rows |= {(m, b, t, p) for t in tokens for p in passes}
    for m, _, _, _ in FFN_STANDARD:
        rows |= {(m, b, t, None) for b in formulations.FFN_BASELINES for t in tokens}
    return rows


class TinySet(unittest.TestCase):
    def check_run(self, dtype, tokens, runs, passes=("forward",)):
        more = ["--backward"] if "backward" in passes else []
        rc, out, log = run_cli("--dtype", dtype, "--tokens", ",".join(map(str, tokens)), "--runs", str(runs), *more)
        self.assertEqual(rc, 0, log)
        self.assertEqual(out["dtype"], dtype)
        self.assertEqual(out["torch"], torch.__version__)
        self.assertGreater(out["copy_gbs"], 0.0)
        rows = out["rows"]
        got = {(r["method"], r["baseline"], r["tokens"], r.get("pass")) for r in rows}
        self.assertEqual(got, expected_rows(tokens, passes))
        self.assertEqual(len(got), len(rows), "one row per (method, baseline, tokens, pass)")
        for r in rows:
            where = f"{r['method']} {r['baseline']} T={r['tokens']}: {r['status']}"
            if r["status"] == "ok":
                c = r["check"]
                self.assertLessEqual(c["rel_err"], c["tol"], where)
                self.assertGreater(c["rel_err"], 0.0, where + " (an exact match in a rounded dtype is suspicious)")
                self.assertLess(c["near_tie_tokens"], baselines.CHECK_TOKENS // 2, where)
                self.assertGreater(r["time_us"], 0.0, where)
                self.assertGreater(r["gbs"], 0.0, where)
            else:
                self.assertTrue(r["status"].startswith("skipped: "), where)
                self.assertIsNone(r["time_us"], where)
        for r in rows:
            if r["baseline"] in formulations.FFN_BASELINES:
                self.assertEqual((r["block"], r["d"], r["f"], r["activation"]), ("ffn", 64, 96, "silu"), r)
                self.assertEqual(r["status"], "ok", r)
                self.assertGreater(r["tflops"], 0.0, r)
                self.assertTrue(r["check"]["reference"].startswith(("mole eval", "float64 PyTorch")), r)
                storage = {"bf16": torch.bfloat16, "f32": torch.float32}[dtype]
                block = FfnBlock("mix-lora", 64, 96, "silu", 8, 16, 2)
                self.assertEqual(r["check"]["tol"], check.tolerance_ffn(block, storage), r)
            else:
                self.assertNotIn("block", r)
        for r in rows:
            if r.get("pass") == "backward" and r["status"] == "ok":
                layer = Layer(r["method"], 64, 64, r["experts"], r["rank"], r["k"])
                c = r["check"]
                self.assertEqual(set(c["grads"]), set(layer.grad_inputs()), r)
                storage = {"bf16": torch.bfloat16, "f32": torch.float32}[dtype]
                for name, g in c["grads"].items():
                    self.assertEqual(g["tol"], check.tolerance_grad(layer, storage, name, baselines.CHECK_TOKENS), r)
                self.assertTrue(c["reference"].startswith(("mole eval", "float64 PyTorch")), r)
                self.assertGreater(r["gbs"], 0.0, r)
        status = {(r["method"], r["baseline"], r.get("pass")): r["status"] for r in rows}
        for p in passes:
            for m in REQUIRED:
                for b in ("dense", "loop"):
                    self.assertEqual(status[(m, b, p)], "ok", f"{m} {b} {p}")
            self.assertIn("16-byte", status[("smora", "grouped_mm", p)])
        self.assertEqual(status[("adapter-serving", "peft_mixed", "forward")] == "ok", peft_available())
        if "backward" in passes:
            refusal = "PEFT refuses a mixed batch in training mode" if peft_available() else "peft is not importable"
            self.assertIn(refusal, status[("adapter-serving", "peft_mixed", "backward")])
        return status

    def test_bf16_every_baseline_and_its_backward_agree_with_the_reference(self):
        status = self.check_run("bf16", [1, 16], 2, passes=("forward", "backward"))
        cpu = torch.device("cpu")
        self.assertEqual(status[("mix-lora-per-linear", "grouped_mm", "forward")] == "ok",
                         formulations.grouped_mm_unsupported(cpu, torch.bfloat16) is None)
        self.assertEqual(status[("mix-lora-per-linear", "grouped_mm", "backward")] == "ok",
                         formulations.grouped_mm_backward_unsupported(cpu, torch.bfloat16) is None)

    def test_f32_every_baseline_agrees_with_the_reference(self):
        self.check_run("f32", [1], 1)


def run_in_process(methods, blocks="layer", more=()):
    """baselines.main on the tiny shapes, 4 tokens, one run; returns (exit code, rows)."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out.json"
        argv = ["--mole", mole_binary(), "--device", "cpu", "--dtype", "bf16", "--shapes", "tiny",
                "--tokens", "4", "--runs", "1", "--methods", methods, "--blocks", blocks, "--out", str(out), *more]
        rc = baselines.main(argv)
        return rc, json.loads(out.read_text())["rows"]


class SpecDrift(unittest.TestCase):
    def test_a_spec_that_departs_from_the_method_fails(self):
        """MixLoRA's spec with softmax instead of renormalised weights: the baselines follow the
        spec and would agree with the reference, so the documented invariants must catch it."""
        original = Layer.spec

        def drifted(layer):
            spec = original(layer)
            if layer.method == "mix-lora-per-linear":
                spec["gating"]["rule"]["weights"] = "softmax"
            return spec

        Layer.spec = drifted
        try:
            rc, rows = run_in_process("mix-lora-per-linear,flex-olmo")
        finally:
            Layer.spec = original
        self.assertEqual(rc, 1)
        for r in rows:
            if r["method"] == "mix-lora-per-linear":
                self.assertIn("spec disagrees with the method: top-k weights renormalised", r["status"])
            else:
                self.assertEqual(r["status"], "ok", r)


class WrongBaselines(unittest.TestCase):
    """A baseline with a wrong gate must fail its check and go untimed (exit code 1)."""

    def run_mutant(self, mutate, methods):
        original = formulations.route

        def wrong_route(layer, t, h=None):
            return mutate(*original(layer, t, h))

        formulations.route = wrong_route
        try:
            rc, rows = run_in_process(methods)
        finally:
            formulations.route = original
        self.assertEqual(rc, 1)
        # PEFT routes by adapter name, not through `route`: its rows are not mutated.
        checked = [r for r in rows if r["check"] is not None and r["baseline"] != "peft_mixed"]
        self.assertTrue(checked)
        for r in checked:
            self.assertTrue(r["status"].startswith("failed: rel_err"), r)
            self.assertGreater(r["check"]["rel_err"], r["check"]["tol"], r)
            self.assertIsNone(r["time_us"], r)

    def test_gates_ten_percent_low(self):
        self.run_mutant(lambda ids, w: (ids, w * 0.9), "mix-lora-per-linear,smora,comol")

    def test_tokens_sent_to_the_next_expert(self):
        self.run_mutant(lambda ids, w: (torch.where(ids >= 0, (ids + 1) % 8, ids), w), "mix-lora-per-linear,adapter-serving")

    def test_ffn_block_with_the_wrong_activation(self):
        """Every FFN baseline computing GELU where the block says SiLU fails its check, untimed."""
        original = dict(formulations.ACTIVATIONS)
        formulations.ACTIVATIONS["silu"] = torch.nn.functional.gelu
        try:
            rc, rows = run_in_process("mix-lora", blocks="ffn")
        finally:
            formulations.ACTIVATIONS.update(original)
        self.assertEqual(rc, 1)
        self.assertEqual({r["baseline"] for r in rows}, set(formulations.FFN_BASELINES))
        for r in rows:
            self.assertTrue(r["status"].startswith("failed: rel_err"), r)
            self.assertIsNone(r["time_us"], r)


class WrongBackward(unittest.TestCase):
    def test_the_renormalisation_without_its_gradient_fails_the_backward_only(self):
        """MixLoRA's top-k weights renormalised by a detached sum: the same values, so the forward
        passes, but the router's gradient (and x's, through the router) lose the
        renormalisation's Jacobian; FlexOlmo's weights are not renormalised and stay right."""
        original = formulations._renormalize
        formulations._renormalize = lambda w: w / w.sum(dim=-1, keepdim=True).detach()
        try:
            rc, rows = run_in_process("mix-lora-per-linear,flex-olmo", more=["--backward"])
        finally:
            formulations._renormalize = original
        self.assertEqual(rc, 1)
        self.assertEqual({(r["pass"], r["baseline"]) for r in rows},
                         {(p, b) for p in ("forward", "backward") for b in ("dense", "loop", "grouped_mm")})
        for r in rows:
            if r["method"] == "flex-olmo" or r["pass"] == "forward":
                self.assertEqual(r["status"], "ok", r)
                continue
            self.assertTrue(r["status"].startswith("failed: grad router_weight rel_err"), r)
            self.assertIsNone(r["time_us"], r)
            grads = r["check"]["grads"]
            wrong = {n for n, g in grads.items() if g["rel_err"] > g["tol"]}
            self.assertEqual(wrong, {"router_weight", "x"}, r)


class BackwardBaselines(unittest.TestCase):
    """Every backward baseline's gradients against the float64 recomputation, called directly on
    shapes of their own (d_in != d_out, so that a transposed gradient shows)."""

    def check_method(self, method, e, r, k, dtype, tokens=64):
        layer = Layer(method, 48, 40, e, r, k)
        cpu = torch.device("cpu")
        t = inputs(layer, tokens, dtype, cpu, seed=11)
        with tempfile.TemporaryDirectory() as d:
            ref = check.reference(mole_binary(), layer, t, d)
        tie = check.near_ties(layer, t, ref, dtype)
        self.assertLess(int(tie.sum()), tokens // 2)
        dy = backward.random_dy(layer, tokens, dtype, cpu, seed=12)
        dy[tie] = 0
        want, _ = check.layer_grads_f64(layer, t, dy, ref["ids"])
        self.assertEqual(list(want), layer.grad_inputs())
        for name, g in want.items():
            # LLaVA-MoLE's sparse top-1 weighs its expert 1: the loss does not reach the router.
            zero = method == "llava-mole-sparse" and name == "router_weight"
            self.assertEqual(float(g.norm()) == 0.0, zero, f"{method} grad {name}")
        tol = lambda n: check.tolerance_grad(layer, dtype, n, tokens)  # noqa: E731
        checked = 0
        for name in formulations.BASELINES:
            if formulations.unsupported(name, layer) or name == "peft_mixed":
                continue
            if name == "grouped_mm" and (formulations.grouped_mm_backward_unsupported(cpu, dtype)
                                         or (r * t["x"].element_size()) % 16):
                continue
            checked += 1
            with self.subTest(method=method, baseline=name, dtype=dtype):
                grads = backward.Graph(name, layer, t, dy).gradients()
                record, problems = check.compare_grads(grads, want, tol, int(tie.sum()))
                self.assertEqual(problems, [], record)
                for n, g in record["grads"].items():
                    self.assertGreater(g["rel_err"], 0.0 if float(want[n].norm()) > 0 else -1.0, (n, record))
        self.assertGreaterEqual(checked, 1)

    def test_every_method_f32(self):
        for m, e, r, k in STANDARD:
            self.check_method(m, e, r, k, torch.float32)

    def test_every_method_bf16(self):
        for m, e, r, k in STANDARD:
            self.check_method(m, e, r, k, torch.bfloat16)

    def test_gradients_come_back_in_the_banks_layouts(self):
        """The per-expert and stacked leaves' gradients mapped back to A [d_in, R] and B [R, d_out]
        equal the banks' own (dense), column for column, in f64 (exact up to rounding order)."""
        layer = Layer("mix-lora-per-linear", 48, 40, 8, 16, 2)
        t = {k: v.double() for k, v in inputs(layer, 32, torch.float32, torch.device("cpu"), seed=4).items()}
        dy = backward.random_dy(layer, 32, torch.float64, torch.device("cpu"), seed=5)
        dense = backward.Graph("dense", layer, t, dy).gradients()
        names = ["loop"] + ([] if formulations.grouped_mm_backward_unsupported(torch.device("cpu"), torch.float64)
                            else ["grouped_mm"])
        for name in names:
            grads = backward.Graph(name, layer, t, dy).gradients()
            for n in ("A", "B"):
                self.assertEqual(grads[n].shape, dense[n].shape, (name, n))
                self.assertLess(float((grads[n] - dense[n]).norm() / dense[n].norm()), 1e-12, (name, n))


class GradReference(unittest.TestCase):
    def test_the_f64_recomputation_is_the_layer_mole_eval_computes(self):
        for seed, (m, e, r, k) in enumerate(STANDARD):
            layer = Layer(m, 48, 40, e, r, k)
            t = inputs(layer, 32, torch.float32, torch.device("cpu"), seed)
            with tempfile.TemporaryDirectory() as d:
                ref = check.reference(mole_binary(), layer, t, d)
            dy = torch.ones(32, 40)
            _, y = check.layer_grads_f64(layer, t, dy, ref["ids"])
            self.assertLess(float((y - ref["y"]).norm() / ref["y"].norm()), 1e-12, m)

    def test_its_gradients_are_the_finite_differences_of_its_forward(self):
        """Central differences of L = sum dy . y of `layer_f64` (the selection held) at random
        entries of every gradient input, for every method."""
        gen = torch.Generator().manual_seed(0)
        for seed, (m, e, r, k) in enumerate(STANDARD):
            layer = Layer(m, 12, 10, e, r, k)
            t = {n: v.double() if v.is_floating_point() else v
                 for n, v in inputs(layer, 6, torch.float32, torch.device("cpu"), seed).items()}
            with tempfile.TemporaryDirectory() as d:
                ids = check.reference(mole_binary(), layer, t, d)["ids"].long()
            dy = torch.randn(6, 10, generator=gen, dtype=torch.float64)
            grads, _ = check.layer_grads_f64(layer, t, dy, ids)

            def loss(v):
                return float((dy * check.layer_f64(layer, v, ids)).sum())

            def nudged(name, i, step):
                v = t[name].clone()
                v.view(-1)[i] += step
                return dict(t, **{name: v})

            for name in layer.grad_inputs():
                for i in torch.randint(0, t[name].numel(), (3,), generator=gen).tolist():
                    step = 1e-6
                    fd = (loss(nudged(name, i, step)) - loss(nudged(name, i, -step))) / (2 * step)
                    got = float(grads[name].reshape(-1)[i])
                    self.assertLess(abs(fd - got), 1e-6 * max(1.0, abs(got)), f"{m} grad {name}[{i}]")

    def test_mole_eval_gradients_agree_with_the_f64_recomputation_when_it_writes_them(self):
        for seed, (m, e, r, k) in enumerate(STANDARD):
            layer = Layer(m, 48, 40, e, r, k)
            t = inputs(layer, 16, torch.float32, torch.device("cpu"), seed)
            dy = backward.random_dy(layer, 16, torch.float32, torch.device("cpu"), seed + 100)
            with tempfile.TemporaryDirectory() as d:
                ref = check.reference(mole_binary(), layer, t, d)
                grads, source = check.grad_reference(mole_binary(), layer, t, dy, ref, d)
            if source != "mole eval":
                self.skipTest(source)
            mine, _ = check.layer_grads_f64(layer, t, dy, ref["ids"])
            record, problems = check.compare_grads(grads, mine, lambda n: 1e-10, 0)
            self.assertEqual(problems, [], f"{m}: {record}")

    def test_only_an_unknown_dy_falls_back_and_grads_are_taken_by_name(self):
        layer = Layer("mix-lora-per-linear", 8, 8, 2, 2, 1)
        t = inputs(layer, 4, torch.float32, torch.device("cpu"), seed=1)
        dy = torch.ones(4, 8)
        ref = {"ids": torch.tensor([[0], [1], [0], [1]])}
        with tempfile.TemporaryDirectory() as d:
            fake = Path(d) / "mole"
            say = "#!/bin/sh\necho 'error: {}' >&2\nexit 1\n"
            fake.write_text(say.format("reading in.safetensors: tensor `dy`: unknown input name; expected one of"))
            fake.chmod(0o755)
            grads, source = check.grad_reference(str(fake), layer, t, dy, ref, d)
            self.assertEqual(source, "float64 PyTorch (mole eval does not take dy)")
            self.assertEqual(set(grads), {"x", "A", "B", "router_weight"})
            fake.write_text(say.format("tensor dy has shape [4, 9]"))
            with self.assertRaisesRegex(RuntimeError, "shape"):
                check.grad_reference(str(fake), layer, t, dy, ref, d)
        original = check.reference
        written = {"y": torch.zeros(4, 8), "grad.x": torch.full((4, 8), 3.0), "grad.B": torch.ones(2, 8)}
        check.reference = lambda *a: dict(written)
        try:
            grads, source = check.grad_reference("mole", layer, t, dy, ref, "/nonexistent")
            self.assertEqual((source, set(grads)), ("mole eval", {"x", "B"}))
            self.assertEqual(float(grads["x"][0, 0]), 3.0)
            del written["grad.x"]
            _, source = check.grad_reference("mole", layer, t, dy, ref, "/nonexistent")
            self.assertEqual(source, "float64 PyTorch (mole eval writes no grad.x)")
        finally:
            check.reference = original

    def test_a_gradient_only_one_side_has_or_a_nan_fails(self):
        ref = {"x": torch.ones(2, 3, dtype=torch.float64), "A": torch.ones(3, 2, dtype=torch.float64)}
        _, problems = check.compare_grads({"x": torch.ones(2, 3)}, ref, lambda n: 1e-3, 0)
        self.assertEqual(problems, ["grad A: only the reference has it"])
        _, problems = check.compare_grads({"x": torch.full((2, 3), math.nan), "A": torch.ones(3, 2)}, ref,
                                          lambda n: 1e-3, 0)
        self.assertEqual(len(problems), 1)
        self.assertIn("grad x rel_err nan", problems[0])


# ---------------------------------------------------------------------------------------------
# The FFN block against plain per-token loops in float64.


def act_f64(name, g):
    """SiLU or exact GELU of each element, from math's exp and erf."""
    if name == "silu":
        return torch.tensor([v / (1.0 + math.exp(-v)) for v in g.tolist()], dtype=torch.float64)
    return torch.tensor([0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in g.tolist()], dtype=torch.float64)


def per_token_block(block, t):
    """y [T, d] and ids [T, k] of the block, one token and one selected expert at a time, in f64:
    softmax over the router's scores, the k largest, weights renormalised to 1; each selected
    expert's whole FFN (base + its LoRA on gate, up and down)."""
    v = {k: x.double() for k, x in t.items()}
    s_g, s_u, s_d = (block.spec()[p]["scale"] for p in ("gate", "up", "down"))
    ys, chosen = [], []
    for x in v["x"]:
        z = (x @ v["router_weight"]).tolist()
        top = max(z)
        p = [math.exp(zi - top) for zi in z]
        order = sorted(range(block.experts), key=lambda e: -p[e])[:block.k]
        total = sum(p[e] for e in order)
        y = torch.zeros(block.d, dtype=torch.float64)
        for e in order:
            c = slice(e * block.rank, (e + 1) * block.rank)
            g = x @ v["base.gate"] + s_g * ((x @ v["gate.A"][:, c]) @ v["gate.B"][c])
            u = x @ v["base.up"] + s_u * ((x @ v["up.A"][:, c]) @ v["up.B"][c])
            a = act_f64(block.activation, g) * u
            y += (p[e] / total) * (a @ v["base.down"] + s_d * ((a @ v["down.A"][:, c]) @ v["down.B"][c]))
        ys.append(y)
        chosen.append(order)
    scores = v["x"] @ v["router_weight"]
    return torch.stack(ys), torch.tensor(chosen), scores


class FfnBlockBaselines(unittest.TestCase):
    def check_block(self, activation, k, dtype, tokens=48):
        block = FfnBlock("mix-lora", 24, 40, activation, 4, 3, k)
        t = ffn_inputs(block, tokens, dtype, torch.device("cpu"), seed=7)
        ref_y, ids, scores = per_token_block(block, t)
        tie = check.near_ties(block, t, {"ids": ids, "scores": scores}, dtype)
        self.assertLess(int(tie.sum()), tokens // 4)
        tol = check.tolerance_ffn(block, dtype)
        for name, prepare in formulations.FFN_PREPARE.items():
            with self.subTest(baseline=name, activation=activation, k=k, dtype=dtype):
                y = prepare(block, dict(t))()
                self.assertEqual(y.dtype, dtype)
                rec = check.compare(y, ref_y, tie, tol)
                self.assertLessEqual(rec["rel_err"], tol, rec)
                self.assertGreater(rec["rel_err"], 0.0)

    def test_silu_and_gelu_k1_and_k2_f32(self):
        for activation in ("silu", "gelu"):
            for k in (1, 2):
                self.check_block(activation, k, torch.float32)

    def test_silu_and_gelu_k1_and_k2_bf16(self):
        for activation in ("silu", "gelu"):
            for k in (1, 2):
                self.check_block(activation, k, torch.bfloat16)

    def test_the_f64_fallback_reference_is_the_per_token_definition(self):
        block = FfnBlock("mix-lora", 24, 40, "gelu", 4, 3, 2)
        t = ffn_inputs(block, 16, torch.float32, torch.device("cpu"), seed=3)
        ref = check.ffn_reference_f64(block, t)
        y, ids, _ = per_token_block(block, t)
        self.assertLess(float((ref["y"] - y).norm() / y.norm()), 1e-12)
        self.assertTrue(torch.equal(ref["ids"].long(), ids))
        self.assertTrue(torch.allclose(ref["weights"].sum(1), torch.ones(16, dtype=torch.float64)))

    def test_mole_eval_agrees_with_the_f64_definition_when_it_takes_the_block(self):
        block = FfnBlock("mix-lora", 24, 40, "silu", 4, 3, 2)
        t = ffn_inputs(block, 16, torch.float32, torch.device("cpu"), seed=5)
        with tempfile.TemporaryDirectory() as d:
            ref, source = check.ffn_reference(mole_binary(), block, t, d)
        if source != "mole eval":
            self.skipTest(source)
        mine = check.ffn_reference_f64(block, t)
        for name in ("y", "a_mix", "weights"):
            self.assertLess(float((ref[name] - mine[name]).norm() / mine[name].norm()), 1e-12, name)
        self.assertTrue(torch.equal(ref["ids"].long(), mine["ids"].long()))

    def test_only_a_layer_spec_parse_error_falls_back_to_the_f64_reference(self):
        block = FfnBlock("mix-lora", 8, 12, "silu", 2, 2, 1)
        t = ffn_inputs(block, 4, torch.float32, torch.device("cpu"), seed=1)
        with tempfile.TemporaryDirectory() as d:
            fake = Path(d) / "mole"
            say = "#!/bin/sh\necho \"error: {}\" >&2\nexit 1\n"
            fake.write_text(say.format("layer spec: activation: unknown field `activation`"))
            fake.chmod(0o755)
            ref, source = check.ffn_reference(str(fake), block, t, d)
            self.assertTrue(source.startswith("float64 PyTorch (mole eval does not take the FFN block"), source)
            self.assertIn("y", ref)
            fake.write_text(say.format("tensor gate.A has shape [8, 3]"))
            with self.assertRaisesRegex(RuntimeError, "gate.A"):
                check.ffn_reference(str(fake), block, t, d)


if __name__ == "__main__":
    unittest.main(verbosity=2)
