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


def peer_row(method, tokens, baseline, status, time_us, pass_=None):
    row = {"method": method, "d_in": 4096, "d_out": 4096, "experts": 8, "rank": 16, "k": 2, "tokens": tokens,
           "baseline": baseline, "status": status, "time_us": time_us, "gbs": None, "check": None}
    return row if pass_ is None else dict(row, **{"pass": pass_})


def backward_row(method, tokens, time_us):
    """A row of `mole bench layer --backward --json`: `bench layer`'s fields and the pass."""
    return dict(layer_row(method, tokens, time_us), strategy="backward", **{"pass": "backward"})


def ffn_row(tokens, f, time_us, time_field="time_us"):
    """A row of `mole bench ffn --json` (the fields of `bench layer`'s rows, with d, f, activation)."""
    return {"method": "mix-lora", "tokens": tokens, "d": 4096, "f": f, "activation": "silu", "experts": 8,
            "rank": 16, "k": 2, "dtype": "bf16", time_field: time_us, "gbs": 1500.0, "fraction_of_copy": 0.5,
            "check": {"error": 1e-3, "tolerance": 1e-2, "ok": True}, "error": None}


def ffn_peer_row(tokens, f, baseline, status, time_us):
    """A row of baselines.py for the FFN block."""
    return {"block": "ffn", "method": "mix-lora", "d": 4096, "f": f, "activation": "silu", "experts": 8, "rank": 16,
            "k": 2, "tokens": tokens, "baseline": baseline, "status": status, "time_us": time_us, "gbs": 900.0,
            "tflops": 80.0, "check": {"rel_err": 5e-3, "tol": 2.7e-2, "near_tie_tokens": 0,
                                      "reference": "float64 PyTorch (mole eval does not take the FFN block: x)"}}


class ResultsTest(unittest.TestCase):
    def make(self, layer_rows, peer_rows, ffn_rows=None, backward_rows=None):
        work = tempfile.mkdtemp()
        json.dump({"copy_gbs": 3000.0, "rows": layer_rows}, open(os.path.join(work, "bench_layer.json"), "w"))
        json.dump({"rows": peer_rows}, open(os.path.join(work, "peers.json"), "w"))
        if ffn_rows is not None:
            json.dump({"copy_gbs": 3000.0, "rows": ffn_rows}, open(os.path.join(work, "ffn.json"), "w"))
        if backward_rows is not None:
            json.dump({"copy_gbs": 2900.0, "rows": backward_rows}, open(os.path.join(work, "layer_backward.json"), "w"))
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

    def test_ffn_rows_take_the_block_baselines_of_the_same_method_tokens_d_and_f(self):
        res = self.make(
            [layer_row("mix-lora", 256, 10.0)],
            # The layer's baseline of the same method and tokens is not the block's, and vice versa.
            [peer_row("mix-lora", 256, "loop", "ok", 30.0),
             ffn_peer_row(256, 11008, "ffn_loop", "ok", 900.0), ffn_peer_row(256, 11008, "ffn_trick", "ok", 600.0),
             ffn_peer_row(256, 11008, "ffn_dense", "failed: rel_err", 1.0),
             ffn_peer_row(256, 14336, "ffn_trick", "ok", 700.0), ffn_peer_row(16, 11008, "ffn_trick", "ok", 50.0)],
            [ffn_row(256, 11008, 300.0), ffn_row(256, 14336, 350.0, time_field="us")])
        self.assertEqual(res["layers"][0]["fastest_baseline_us"], 30.0)
        self.assertEqual(set(res["layers"][0]["baselines"]), {"loop"})
        first, second = res["ffn"]
        self.assertEqual(set(first["baselines"]), {"ffn_loop", "ffn_trick", "ffn_dense"})
        self.assertEqual(first["fastest_baseline_us"], 600.0)
        self.assertAlmostEqual(first["speedup_vs_fastest"], 2.0)
        self.assertAlmostEqual(first["baselines"]["ffn_loop"]["ratio"], 3.0)
        self.assertEqual(set(second["baselines"]), {"ffn_trick"})
        self.assertEqual(second["time_us"], 350.0)
        self.assertAlmostEqual(second["speedup_vs_fastest"], 2.0)
        self.assertEqual(len(res["ffn_baselines"]), 5)
        self.assertEqual(res["peers_unmatched"], [])
        text = kit.report(res)
        self.assertIn("| mix-lora | 4096 | 11008 | silu | 256 | 300.0 | 1500 | 50 | ok | 600.0 | 2.00x |", text)
        self.assertIn("| mix-lora | 11008 | silu | 256 | ffn_trick | ok | 600.0 | 900 | 80.0 | float64 PyTorch |", text)

    def test_block_baselines_without_a_bench_ffn_still_reach_the_report(self):
        res = self.make([layer_row("mix-lora", 16, 5.0)], [ffn_peer_row(16, 11008, "ffn_loop", "ok", 40.0)])
        self.assertEqual(res["ffn"], [])
        self.assertIsNone(res["layers"][0]["fastest_baseline_us"])
        self.assertEqual(res["peers_unmatched"], [])
        text = kit.report(res)
        self.assertIn("## FFN block baselines (PyTorch)", text)
        self.assertIn("| mix-lora | 11008 | silu | 16 | ffn_loop | ok | 40.0 |", text)
        self.assertNotIn("## FFN block (MixLoRA", text)

    def test_bench_ffn_is_skipped_in_a_dry_run_and_where_mole_lacks_it(self):
        original = kit.bench_kinds
        try:
            kit.bench_kinds = lambda: ["grouped", "layer", "help"]
            dry = kit.Kit("default", tempfile.mkdtemp(), dry_run=True)
            dry.no_gpu_reason = "dry run: no GPU"
            names = [s.name for s in kit.steps_for(dry)[1]]
            self.assertIn("bench ffn", names)
            self.assertLess(names.index("bench ffn"), names.index("PyTorch baselines"))
            step = dry.run(kit.bench_ffn_step(dry.work))
            self.assertEqual((step.status, step.detail), ("skipped", "dry run: no GPU"))
            gpu = kit.Kit("default", tempfile.mkdtemp(), dry_run=False)
            step = gpu.run(kit.bench_ffn_step(gpu.work))
            self.assertEqual(step.status, "skipped")
            self.assertIn("no `bench ffn`", step.detail)
            kit.bench_kinds = lambda: ["grouped", "layer", "ffn"]
            step = kit.bench_ffn_step("/w")
            self.assertEqual(step.argv[1:], ["bench", "ffn", "--json", "/w/ffn.json"])
            self.assertEqual(step.json_out, "ffn.json")
        finally:
            kit.bench_kinds = original

    def test_backward_rows_take_the_backward_baselines_of_the_same_key_only(self):
        res = self.make(
            [layer_row("mix-lora-per-linear", 256, 10.0)],
            [peer_row("mix-lora-per-linear", 256, "loop", "ok", 90.0, "backward"),
             peer_row("mix-lora-per-linear", 256, "dense", "ok", 60.0, "backward"),
             peer_row("mix-lora-per-linear", 16, "dense", "ok", 5.0, "backward"),
             # A method the crate's backward has no row of is listed, as the forward's are.
             peer_row("adapter-serving", 256, "peft_mixed", "skipped: PEFT refuses", None, "backward"),
             # The forward's rows of the same key: the backward takes none of them (grouped_mm has
             # a forward row only, as where the backward ran with other baselines).
             peer_row("mix-lora-per-linear", 256, "loop", "ok", 30.0, "forward"),
             peer_row("mix-lora-per-linear", 256, "dense", "ok", 20.0),  # no pass: a forward row
             peer_row("mix-lora-per-linear", 256, "grouped_mm", "ok", 8.0, "forward")],
            backward_rows=[backward_row("mix-lora-per-linear", 256, 20.0)])
        fwd, = res["layers"]
        self.assertEqual(fwd["fastest_baseline_us"], 8.0)
        self.assertAlmostEqual(fwd["baselines"]["loop"]["ratio"], 3.0)
        bwd, = res["layers_backward"]
        self.assertEqual(set(bwd["baselines"]), {"loop", "dense"})
        self.assertEqual(bwd["fastest_baseline_us"], 60.0)
        self.assertAlmostEqual(bwd["speedup_vs_fastest"], 3.0)
        self.assertAlmostEqual(bwd["baselines"]["loop"]["ratio"], 4.5)
        self.assertEqual([(p["method"], p["pass"]) for p in res["peers_unmatched"]], [("adapter-serving", "backward")])
        self.assertEqual(res["backward_copy_gbs"], 2900.0)
        text = kit.report(res)
        self.assertIn("## Layers, backward (bf16, d = 4096; copy bandwidth 2900 GB/s; baselines: PyTorch autograd)",
                      text)
        self.assertIn("| mix-lora-per-linear | 256 | backward | 20.0 | 2000 | 60 | ok | 60.0 | 3.00x |", text)
        self.assertIn("| adapter-serving | 256 | peft_mixed | skipped: PEFT refuses | - | backward |", text)

    def test_backward_baselines_without_a_crate_backward_reach_the_report(self):
        res = self.make([layer_row("smora", 16, 5.0)],
                        [peer_row("smora", 16, "dense", "ok", 20.0, "forward"),
                         peer_row("smora", 16, "dense", "ok", 70.0, "backward")])
        self.assertEqual(res["layers_backward"], [])
        self.assertEqual(res["layers"][0]["fastest_baseline_us"], 20.0)
        self.assertEqual(len(res["peers_unmatched"]), 1)
        text = kit.report(res)
        self.assertNotIn("## Layers, backward", text)
        self.assertIn("| smora | 16 | dense | ok | 70.0 | backward |", text)

    def test_bench_layer_backward_is_skipped_in_a_dry_run_and_where_mole_lacks_it(self):
        original = kit.bench_layer_options
        try:
            kit.bench_layer_options = lambda: ["--tokens", "--runs", "--json", "--help"]
            dry = kit.Kit("default", tempfile.mkdtemp(), dry_run=True)
            dry.no_gpu_reason = "dry run: no GPU"
            timing = kit.steps_for(dry)[1]
            names = [s.name for s in timing]
            self.assertLess(names.index("bench layer"), names.index("bench layer backward"))
            self.assertLess(names.index("bench layer backward"), names.index("PyTorch baselines"))
            peers = timing[names.index("PyTorch baselines")]
            self.assertIn("--backward", peers.argv)
            step = dry.run(kit.bench_layer_backward_step(dry.work))
            self.assertEqual((step.status, step.detail), ("skipped", "dry run: no GPU"))
            gpu = kit.Kit("default", tempfile.mkdtemp(), dry_run=False)
            step = gpu.run(kit.bench_layer_backward_step(gpu.work))
            self.assertEqual(step.status, "skipped")
            self.assertIn("has no `--backward`", step.detail)
            kit.bench_layer_options = lambda: ["--tokens", "--backward", "--json"]
            step = kit.bench_layer_backward_step("/w")
            self.assertEqual(step.argv[1:], ["bench", "layer", "--backward", "--tokens", "1,16,256,4096", "--runs",
                                             "20", "--json", "/w/layer_backward.json"])
            self.assertEqual(step.json_out, "layer_backward.json")
        finally:
            kit.bench_layer_options = original

    def test_bench_layer_options_are_parsed_from_help(self):
        text = ("Usage: mole bench layer [OPTIONS]\n\nOptions:\n      --tokens <TOKENS>  Token counts [default: 1]\n"
                "      --backward         Time the backward\n      --json <JSON>      JSON rows\n"
                "  -h, --help             Print help (see more with '--help')\n")
        self.assertEqual(kit.parse_options(text), ["--tokens", "--backward", "--json", "--help"])
        self.assertNotIn("--backward", kit.parse_options(text.replace("--backward", "--forward ")))

    def test_bench_subcommands_are_parsed_from_help(self):
        text = ("Usage: mole bench <COMMAND>\n\nCommands:\n  grouped  The grouped shrink + expand\n"
                "  layer    Whole layers\n  help     Print this message\n\nOptions:\n  -h, --help  Print help\n")
        self.assertEqual(kit.parse_subcommands(text), ["grouped", "layer", "help"])
        self.assertEqual(kit.parse_subcommands("no commands"), [])

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

    def test_the_c_test_is_skipped_with_the_reason_without_its_library_and_built_with_it(self):
        work, libdir = tempfile.mkdtemp(), tempfile.mkdtemp()
        k = kit.Kit("quick", work, dry_run=True)
        saved = kit.PACKED_LIB
        try:
            kit.PACKED_LIB = os.path.join(libdir, "libmole.so.xz")
            build, run = kit.c_abi_steps(k)
            self.assertEqual((build.argv, run.argv), ([], []))
            self.assertIn("libmole.so.xz", build.detail)
            self.assertEqual(run.detail, build.detail)
            with kit.lzma.open(kit.PACKED_LIB, "wb") as z:
                z.write(b"not really a library")
            build, run = kit.c_abi_steps(k)
        finally:
            kit.PACKED_LIB = saved
        with open(os.path.join(work, "lib", "libmole.so"), "rb") as f:
            self.assertEqual(f.read(), b"not really a library")
        if kit.shutil.which("gcc"):
            self.assertEqual(build.argv[0], "gcc")
            self.assertIn("-lmole", build.argv)
            self.assertFalse(build.gpu)
            self.assertTrue(run.gpu)
            self.assertEqual(run.argv, [build.argv[build.argv.index("-o") + 1]])


if __name__ == "__main__":
    unittest.main()
