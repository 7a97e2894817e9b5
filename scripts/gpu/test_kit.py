#!/usr/bin/env python3
"""Tests of the GPU kit's results and report (stdlib only; no GPU, no packed binaries needed)."""

import json
import os
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kit  # noqa: E402


def layer_row(method, tokens, time_us, ok=True):
    return {"method": method, "d_in": 4096, "d_out": 4096, "experts": 8, "rank": 16, "k": 2, "tokens": tokens,
            "dtype": "bf16", "strategy": "fused", "source": "heuristic", "time_us": time_us, "gbs": 2000.0,
            "fraction_of_copy": 0.6, "grouped_time_us": None,
            "check": {"error": 1e-3, "tolerance": 1e-2, "ok": ok}, "error": None}


def peer_row(method, tokens, baseline, status, time_us):
    return {"method": method, "d_in": 4096, "d_out": 4096, "experts": 8, "rank": 16, "k": 2, "tokens": tokens,
            "baseline": baseline, "status": status, "time_us": time_us, "gbs": None, "check": None}


class ResultsTest(unittest.TestCase):
    def make(self, layer_rows, peer_rows):
        work = tempfile.mkdtemp()
        json.dump({"copy_gbs": 3000.0, "rows": layer_rows}, open(os.path.join(work, "bench_layer.json"), "w"))
        json.dump({"rows": peer_rows}, open(os.path.join(work, "peers.json"), "w"))
        k = kit.Kit("default", work, dry_run=False)
        passed = kit.Step("a step", [], 0)
        passed.status = "pass"
        failed = kit.Step("another step", [], 0)
        failed.status, failed.detail = "fail", "exit code 1 | a | b"
        k.steps = [passed, failed]
        return kit.results(k, {"GPU": "test"})

    def test_speedup_is_against_the_fastest_checked_baseline(self):
        res = self.make(
            [layer_row("mix-lora-per-linear", 256, 10.0), layer_row("mix-lora-per-linear", 4096, 50.0)],
            [peer_row("mix-lora-per-linear", 256, "dense", "ok", 40.0), peer_row("mix-lora-per-linear", 256, "loop", "ok", 25.0),
             # A failed baseline is never the fastest, however fast it was.
             peer_row("mix-lora-per-linear", 256, "grouped_mm", "failed: check", 1.0),
             peer_row("mix-lora-per-linear", 4096, "dense", "skipped: no", None)])
        first, second = res["layers"]
        self.assertEqual(first["fastest_baseline_us"], 25.0)
        self.assertAlmostEqual(first["speedup_vs_fastest"], 2.5)
        self.assertAlmostEqual(first["baselines"]["dense"]["ratio"], 4.0)
        self.assertIsNone(second["fastest_baseline_us"])
        self.assertIsNone(second["speedup_vs_fastest"])

    def test_report_counts_steps_and_shows_the_table(self):
        res = self.make([layer_row("smora", 16, 8.0, ok=False)], [peer_row("smora", 16, "dense", "ok", 20.0)])
        text = kit.report(res)
        self.assertIn("1 passed, 1 failed, 0 skipped", text)
        self.assertIn("| another step | FAIL |", text)
        self.assertIn("| smora | 16 | fused | 8.0 |", text)
        self.assertIn("| FAIL | 20.0 | 2.50x |", text)

    def test_baselines_of_methods_without_a_crate_row_are_listed(self):
        res = self.make([], [peer_row("adapter-serving", 16, "peft_mixed", "ok", 30.0)])
        self.assertEqual(len(res["peers_unmatched"]), 1)
        self.assertIn("## Baselines without a crate row", kit.report(res))

    def test_rows_of_a_baseline_run_without_torch_do_not_break_the_report(self):
        # baselines.py writes only these fields when torch cannot be imported.
        res = self.make([layer_row("mix-lora-per-linear", 16, 5.0)],
                        [{"method": "mix-lora-per-linear", "baseline": "dense", "status": "skipped: no torch"},
                         {"method": "comol", "baseline": "loop", "status": "skipped: no torch"}])
        self.assertIsNone(res["layers"][0]["fastest_baseline_us"])
        self.assertIn("| comol | - | loop | skipped: no torch |", kit.report(res))

    def test_a_step_without_its_json_fails_and_a_budget_cut_is_not_a_failure(self):
        work = tempfile.mkdtemp()
        k = kit.Kit("quick", work, dry_run=False)
        no_json = k.run(kit.Step("bench", ["true"], 10, gpu=False, json_out="bench.json"))
        self.assertEqual(no_json.status, "fail")
        self.assertIn("no bench.json", no_json.detail)
        said = k.run(kit.Step("info", ["echo", "NVRTC: not available"], 10, gpu=False, must_not_say="not available"))
        self.assertEqual(said.status, "fail")
        k.deadline = kit.time.monotonic() + 6
        cut = k.run(kit.Step("slow", ["sleep", "30"], 60, gpu=False))
        self.assertEqual(cut.status, "cut")

    def test_methods_are_parsed_from_short_help(self):
        text = ("      --method <METHOD>    Method preset [default: mix-lora-per-linear] [possible values: mix-lora-per-linear, "
                "dyn-mole, smora]\n      --tokens <TOKENS>    Tokens [default: 2048]\n")
        self.assertEqual(kit.parse_methods(text), ["mix-lora-per-linear", "dyn-mole", "smora"])
        self.assertEqual(kit.parse_methods("no such option"), [])


if __name__ == "__main__":
    unittest.main()
