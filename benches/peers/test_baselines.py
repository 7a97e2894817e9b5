#!/usr/bin/env python3
"""Tests of the PyTorch baselines on a CPU against the crate's reference (`mole eval`).

    python3 benches/peers/test_baselines.py

Needs torch and safetensors (PEFT optional: without it `peft_mixed` must be skipped) and a built
`mole` (`$MOLE`, else target/release/mole, else target/debug/mole). Runs the tiny set through the
command line exactly as the GPU kit does, and checks that a wrong baseline fails its check.
"""

import json
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
import formulations  # noqa: E402
from methods import STANDARD, Layer  # noqa: E402

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


def run_in_process(methods):
    """baselines.main on the tiny shapes, 4 tokens, one run; returns (exit code, rows)."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out.json"
        argv = ["--mole", mole_binary(), "--device", "cpu", "--dtype", "bf16", "--shapes", "tiny",
                "--tokens", "4", "--runs", "1", "--methods", methods, "--out", str(out)]
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


if __name__ == "__main__":
    unittest.main(verbosity=2)
