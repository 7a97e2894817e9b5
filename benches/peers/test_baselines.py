#!/usr/bin/env python3
"""Tests of the PyTorch baselines on a CPU against the crate's reference (`mole eval`).

    python3 benches/peers/test_baselines.py

Needs torch and safetensors (PEFT optional: without it `peft_mixed` must be skipped) and a built
`mole` (`$MOLE`, else target/release/mole, else target/debug/mole). Runs the tiny set through the
command line exactly as the GPU kit does, and checks that a wrong baseline fails its check. The
FFN block's baselines are also compared with a float64 recomputation by plain per-token loops
written here (independent of `check.ffn_reference_f64`).
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

import baselines  # noqa: E402
import check  # noqa: E402
import formulations  # noqa: E402
from methods import FFN_STANDARD, STANDARD, FfnBlock, Layer, ffn_inputs  # noqa: E402

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


def expected_rows(tokens):
    rows = set()
    for m, e, r, k in STANDARD:
        layer = Layer(m, 64, 64, e, r, k)
        for b in formulations.BASELINES:
            if not formulations.unsupported(b, layer):
                rows |= {(m, b, t) for t in tokens}
    for m, _, _, _ in FFN_STANDARD:
        rows |= {(m, b, t) for b in formulations.FFN_BASELINES for t in tokens}
    return rows


class TinySet(unittest.TestCase):
    def check_run(self, dtype, tokens, runs):
        rc, out, log = run_cli("--dtype", dtype, "--tokens", ",".join(map(str, tokens)), "--runs", str(runs))
        self.assertEqual(rc, 0, log)
        self.assertEqual(out["dtype"], dtype)
        self.assertEqual(out["torch"], torch.__version__)
        self.assertGreater(out["copy_gbs"], 0.0)
        rows = out["rows"]
        got = {(r["method"], r["baseline"], r["tokens"]) for r in rows}
        self.assertEqual(got, expected_rows(tokens))
        self.assertEqual(len(got), len(rows), "one row per (method, baseline, tokens)")
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
        status = {(r["method"], r["baseline"]): r["status"] for r in rows}
        for m in REQUIRED:
            for b in ("dense", "loop"):
                self.assertEqual(status[(m, b)], "ok", f"{m} {b}")
        self.assertEqual(status[("adapter-serving", "peft_mixed")] == "ok", peft_available())
        self.assertIn("16-byte", status[("smora", "grouped_mm")])
        return status

    def test_bf16_every_baseline_agrees_with_the_reference(self):
        status = self.check_run("bf16", [1, 16], 2)
        self.assertEqual(status[("mix-lora-per-linear", "grouped_mm")] == "ok",
                         formulations.grouped_mm_unsupported(torch.device("cpu"), torch.bfloat16) is None)

    def test_f32_every_baseline_agrees_with_the_reference(self):
        self.check_run("f32", [1], 1)


def run_in_process(methods, blocks="layer"):
    """baselines.main on the tiny shapes, 4 tokens, one run; returns (exit code, rows)."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out.json"
        argv = ["--mole", mole_binary(), "--device", "cpu", "--dtype", "bf16", "--shapes", "tiny",
                "--tokens", "4", "--runs", "1", "--methods", methods, "--blocks", blocks, "--out", str(out)]
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
