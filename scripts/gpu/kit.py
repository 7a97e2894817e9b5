#!/usr/bin/env python3
"""The GPU kit's runner: every check and measurement of the project on a real GPU, in one command.

Runs on the GPU machine (python3 and bash, no Rust, no network) from the repository root over the
binaries that scripts/gpu/pack.sh wrote into .gpu/, and here with --dry-run, where each step that
needs a GPU is reported as skipped with the reason. Writes into OUTDIR exactly:
  report.md     what a person reads first: pass/fail per step, then the performance table
  results.json  machine-readable: steps, per-shape results with baselines and ratios
  logs.tar.gz   every step's log and raw JSON
  tuning.json   the autotuner's file for this GPU (when the autotune step ran)

Sets: `quick` (correctness only, <= 2 min), `default` (everything, <= 7 min). A failing step is
reported and the kit goes on; the exit code is 1 when any step failed.

Usage: python3 scripts/gpu/kit.py {quick,default} OUTDIR [--dry-run]
"""

import argparse
import concurrent.futures
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KIT = os.path.join(ROOT, ".gpu")
BIN = os.path.join(KIT, "bin")
MOLE = os.path.join(BIN, "mole")
# Whole-run budgets (seconds): a step never runs past what is left of its set's budget.
BUDGET_S = {"quick": 110, "default": 420}
SANITIZER_TOOLS = ["memcheck", "racecheck", "synccheck", "initcheck"]
# The determinism test runs as a step of its own, not inside the GPU test step.
DETERMINISM_TEST = "every_strategy_is_bit_identical_over_20_runs"
GPU_ENV = {"MOLE_REQUIRE_GPU": "1"}
# The C ABI's GPU test and what it is built from (pack.sh packs the library).
C_TEST = os.path.join(ROOT, "tests", "c", "forward_gpu.c")
C_INCLUDE = os.path.join(ROOT, "include")
PACKED_LIB = os.path.join(KIT, "lib", "libmole.so.xz")


class Step:
    """One named command with a time limit; `gpu` steps are skipped by a dry run."""

    def __init__(self, name, argv, timeout, gpu=True, env=None, json_out=None, must_not_say=None):
        self.name, self.argv, self.timeout, self.gpu = name, argv, timeout, gpu
        self.env = env or {}
        # A step that exits 0 still fails without the file it exists to write, or when its
        # output says this (e.g. `mole info` without NVRTC on the GPU machine).
        self.json_out = json_out
        self.must_not_say = must_not_say
        self.status, self.seconds, self.detail = "pending", 0.0, ""

    def record(self):
        return {"step": self.name, "status": self.status, "seconds": round(self.seconds, 1), "detail": self.detail}


class Kit:
    def __init__(self, set_name, work, dry_run):
        self.set_name, self.work, self.dry_run = set_name, work, dry_run
        self.deadline = time.monotonic() + BUDGET_S[set_name]
        self.steps = []
        self.no_gpu_reason = None
        os.makedirs(os.path.join(work, "logs"), exist_ok=True)

    def log_path(self, step):
        return os.path.join(self.work, "logs", re.sub(r"[^A-Za-z0-9_.-]", "_", step.name) + ".log")

    def run(self, step):
        """Runs one step (or skips it) and records the outcome."""
        self.steps.append(step)
        if step.gpu and self.no_gpu_reason:
            step.status, step.detail = "skipped", self.no_gpu_reason
            return step
        if not step.argv:  # nothing to run here: its detail says why
            step.status = "skipped"
            return step
        left = self.deadline - time.monotonic()
        if left < 5:
            step.status, step.detail = "skipped", f"the {self.set_name} set's {BUDGET_S[self.set_name]} s budget is spent"
            return step
        timeout = min(step.timeout, left)
        cut = timeout < step.timeout
        env = dict(os.environ, **step.env)
        start = time.monotonic()
        with open(self.log_path(step), "w") as log:
            log.write("$ " + " ".join(step.argv) + "\n")
            log.flush()
            try:
                proc = subprocess.Popen(step.argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
                rc = proc.wait(timeout=timeout)
                step.status = "pass" if rc == 0 else "fail"
                step.detail = "" if rc == 0 else f"exit code {rc}"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
                if cut:
                    step.status, step.detail = "cut", f"stopped after {timeout:.0f} s: the set's budget ran out"
                else:
                    step.status, step.detail = "fail", f"timed out after {timeout:.0f} s"
            except OSError as e:
                step.status, step.detail = "fail", f"could not start: {e}"
        step.seconds = time.monotonic() - start
        if step.status == "pass" and step.json_out and not os.path.exists(os.path.join(self.work, step.json_out)):
            step.status, step.detail = "fail", f"exit code 0 but no {step.json_out} was written"
        if step.status == "pass" and step.must_not_say:
            with open(self.log_path(step), errors="replace") as f:
                if step.must_not_say in f.read():
                    step.status, step.detail = "fail", f"its output says `{step.must_not_say}`"
        if step.status in ("fail", "cut"):
            step.detail += "; " + last_lines(self.log_path(step))
        return step

    def run_parallel(self, steps, workers):
        """Correctness steps share the GPU; timing steps never run in parallel."""
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(self.run, steps))
        # Keep the report in the order the steps were listed.
        order = {id(s): i for i, s in enumerate(steps)}
        done = [s for s in self.steps if id(s) not in order] + sorted(steps, key=lambda s: order[id(s)])
        self.steps = done


def last_lines(path, n=3):
    try:
        lines = [l.strip() for l in open(path, errors="replace").read().splitlines() if l.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])[-400:]


def check_manifest():
    """The packed binaries are all there and intact."""
    path = os.path.join(KIT, "manifest.json")
    if not os.path.exists(path):
        return False, ".gpu/manifest.json is missing: run scripts/gpu/pack.sh here and carry .gpu"
    manifest = json.load(open(path))
    for name, f in manifest["files"].items():
        p = os.path.join(KIT, name)
        if not os.path.exists(p):
            return False, f"{name} is missing"
        if hashlib.sha256(open(p, "rb").read()).hexdigest() != f["sha256"]:
            return False, f"{name} differs from the manifest"
        if name.startswith("bin/") and not os.access(p, os.X_OK):
            return False, f"{name} is not executable"
    return True, f"{len(manifest['files'])} files, {manifest['total_bytes'] / 2**20:.1f} MiB, commit {manifest['commit']}"


def gpu_presence():
    """None when a GPU is visible, else why not."""
    if shutil.which("nvidia-smi") is None:
        return "no GPU: nvidia-smi not found"
    r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    if r.returncode != 0 or "GPU" not in r.stdout:
        return "no GPU: nvidia-smi -L lists none"
    return None


def sanitizer_path():
    """compute-sanitizer from PATH, else the CUDA toolkit's own folder."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for p in ("/usr/local/cuda/bin/compute-sanitizer", "/usr/local/cuda/compute-sanitizer/compute-sanitizer"):
        if os.access(p, os.X_OK):
            return p
    return "compute-sanitizer"


def sanitizer_unusable(kit):
    """None when compute-sanitizer runs a trivial program on this GPU, else why not (so its
    steps are reported as skipped for that reason, not as 16 failures of the code)."""
    if kit.no_gpu_reason:
        return None
    probe = os.path.join(BIN, "modules_gpu")
    try:
        r = subprocess.run([sanitizer_path(), "--tool", "memcheck", "--error-exitcode", "1", probe, "--list"],
                           capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"compute-sanitizer unusable here: {e}"
    if r.returncode != 0:
        return "compute-sanitizer unusable here: " + " | ".join((r.stdout + r.stderr).strip().splitlines()[-2:])
    return None


def gpu_test_binaries():
    if not os.path.isdir(BIN):
        return []
    return sorted(os.path.join(BIN, f) for f in os.listdir(BIN) if f.endswith("_gpu"))


def methods():
    """Every method `mole run` accepts, from its short help."""
    try:
        text = subprocess.run([MOLE, "run", "-h"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return parse_methods(text)


def parse_methods(help_text):
    m = re.search(r"--method <METHOD>[^\n]*?\[possible values: ([^\]]+)\]", help_text)
    return [v.strip() for v in m.group(1).split(",")] if m else []


def bench_kinds():
    """The subcommands of `mole bench`, from its help."""
    try:
        text = subprocess.run([MOLE, "bench", "-h"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return parse_subcommands(text)


def bench_layer_options():
    """The long options of `mole bench layer`, from its help."""
    try:
        text = subprocess.run([MOLE, "bench", "layer", "-h"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return parse_options(text)


def parse_options(help_text):
    return re.findall(r"^\s+(?:-\w, )?(--[a-z0-9][a-z0-9-]*)", help_text, re.M)


def parse_subcommands(help_text):
    block = re.search(r"^Commands:\n((?:  \S.*\n?)+)", help_text, re.M)
    return [line.split()[0] for line in block.group(1).splitlines()] if block else []


def steps_for(kit):
    w = kit.work
    tests = gpu_test_binaries()
    sanitize = sanitizer_path()
    correctness = []
    # The layer tests compile every default build of every dtype: first, alone (see main).
    tests.sort(key=lambda t: os.path.basename(t) != "layer_gpu")
    for t in tests:
        name = os.path.basename(t)
        env = GPU_ENV if kit.set_name == "default" else dict(GPU_ENV, MOLE_GPU_QUICK="1")
        correctness.append(Step(f"test {name}", [t, "--ignored", "--skip", DETERMINISM_TEST, "--test-threads=1"], 200,
                                env=env))
    layer = os.path.join(BIN, "layer_gpu")
    correctness.append(Step("determinism (20 runs, every strategy)", [layer, "--ignored", "--exact", DETERMINISM_TEST],
                            120, env=GPU_ENV))
    quick_env = dict(GPU_ENV, MOLE_GPU_QUICK="1")
    unusable = sanitizer_unusable(kit)
    for tool in SANITIZER_TOOLS:
        for t in tests:
            argv = [sanitize, "--tool", tool, "--error-exitcode", "1"]
            if tool == "memcheck":
                argv += ["--leak-check", "full"]
            if tool == "racecheck":
                argv += ["--racecheck-report", "all"]
            argv += [t, "--ignored", "--test-threads=1"]
            step = Step(f"{tool} {os.path.basename(t)}", argv, 150, env=quick_env)
            if unusable:
                step.argv, step.detail = [], unusable
            correctness.append(step)
    # The shipped-PTX path: NVRTC hidden (a variable naming no library disables the search).
    no_nvrtc = dict(quick_env, MOLE_NVRTC_PATH="/nonexistent/libnvrtc.so")
    correctness.append(Step("shipped PTX (NVRTC hidden): layer tests", [layer, "--ignored", "--skip", DETERMINISM_TEST],
                            150, env=no_nvrtc))
    if kit.set_name == "default":
        names = methods()
        if not names:
            # Never a silent zero: the step list must hold every method.
            correctness.append(Step("list methods from `mole run -h`", ["false"], 5, gpu=False))
        for m in names:
            correctness.append(Step(f"mole run --method {m}", [MOLE, "run", "--method", m], 120))
    correctness.append(python_step(w))
    timing = []
    if kit.set_name == "default":
        timing = [
            Step("bench layer", [MOLE, "bench", "layer", "--tokens", "1,16,256,4096", "--runs", "20", "--json",
                                 os.path.join(w, "bench_layer.json")], 150, json_out="bench_layer.json"),
            bench_layer_backward_step(w),
            Step("bench grouped", [MOLE, "bench", "grouped", "--runs", "20", "--json",
                                   os.path.join(w, "bench_grouped.json")], 60, json_out="bench_grouped.json"),
            bench_ffn_step(w),
            # The layer's methods, forward and backward (autograd), and the FFN block (d = 4096,
            # f = 11008 and 14336): one run, one check set and `mole eval` per method for both passes.
            Step("PyTorch baselines", [sys.executable, "benches/peers/baselines.py", "--mole", MOLE, "--device", "cuda",
                                       "--dtype", "bf16", "--shapes", "standard", "--tokens", "1,16,256,4096",
                                       "--runs", "20", "--backward", "--out", os.path.join(w, "peers.json")], 240,
                 json_out="peers.json"),
            Step("autotune (Llama-3-8B, MixLoRA and SMoRA, 60 s budget)",
                 [MOLE, "autotune", "--model", "llama3-8b", "--method", "mix-lora-per-linear,smora", "--budget", "60", "--runs",
                  "20", "--out", os.path.join(w, "tuning")], 110),
        ]
    return correctness, timing


def python_step(work):
    """The Python package on this machine's PyTorch (python/gpu_check.py: forward and backward
    against autograd, a CUDA-graph capture, a training loop) from the wheel pack.sh built;
    skipped with the reason where the wheel or torch is absent."""
    wheel_dir = os.path.join(KIT, "wheel")
    step = Step("python: PyTorch check", [sys.executable, os.path.join(ROOT, "python", "gpu_check.py"), "--wheel-dir",
                                         wheel_dir, "--json", os.path.join(work, "python.json")], 180,
                json_out="python.json")
    import importlib.util

    if not (os.path.isdir(wheel_dir) and any(f.endswith(".whl") for f in os.listdir(wheel_dir))):
        step.argv, step.detail = [], "no wheel in .gpu/wheel (pack.sh builds it where maturin is installed)"
    elif importlib.util.find_spec("torch") is None:
        step.argv, step.detail = [], "torch is not installed here"
    return step
def c_abi_steps(kit):
    """tests/c/forward_gpu.c: compiled with the machine's gcc against the packed libmole.so
    (unpacked into the work folder; no GPU needed, so a dry run compiles it too), then run on the
    GPU; both skipped with the reason where gcc or the library is absent."""
    exe, libdir = os.path.join(kit.work, "forward_gpu_c"), os.path.join(kit.work, "lib")
    build = Step("compile tests/c/forward_gpu.c (gcc, the packed libmole.so)",
                 ["gcc", "-std=c11", "-O1", "-Wall", "-Wextra", "-I", C_INCLUDE, C_TEST, "-o", exe, "-L", libdir,
                  "-lmole", "-Wl,-rpath," + libdir, "-ldl", "-lm"], 60, gpu=False)
    run = Step("C ABI: tests/c/forward_gpu.c", [exe], 120, env=GPU_ENV)
    reason = None
    if shutil.which("gcc") is None:
        reason = "gcc not found on this machine"
    elif not os.path.exists(PACKED_LIB):
        reason = "no .gpu/lib/libmole.so.xz: this pack has no C library (scripts/gpu/pack.sh builds it)"
    else:
        try:
            os.makedirs(libdir, exist_ok=True)
            with lzma.open(PACKED_LIB) as z, open(os.path.join(libdir, "libmole.so"), "wb") as f:
                shutil.copyfileobj(z, f)
        except (OSError, lzma.LZMAError) as e:
            reason = f"cannot unpack .gpu/lib/libmole.so.xz: {e}"
    if reason:
        build.argv, build.detail = [], reason
        run.argv, run.detail = [], reason
    return build, run


def bench_ffn_step(work):
    """`mole bench ffn` (the FFN-expert block), skipped with the reason where the packed mole has
    no such subcommand."""
    step = Step("bench ffn", [MOLE, "bench", "ffn", "--json", os.path.join(work, "ffn.json")], 60, json_out="ffn.json")
    kinds = bench_kinds()
    if "ffn" not in kinds:
        step.argv = []
        step.detail = f"this mole has no `bench ffn` (`mole bench -h` lists: {', '.join(kinds) or 'nothing'})"
    return step


def bench_layer_backward_step(work):
    """`mole bench layer --backward` (the layers' backward), skipped with the reason where the
    packed mole's `bench layer` has no `--backward`."""
    step = Step("bench layer backward", [MOLE, "bench", "layer", "--backward", "--tokens", "1,16,256,4096", "--runs",
                                         "20", "--json", os.path.join(work, "layer_backward.json")], 150,
                json_out="layer_backward.json")
    if "--backward" not in bench_layer_options():
        step.argv = []
        step.detail = "this mole's `bench layer` has no `--backward` (`mole bench layer -h`)"
    return step


def dry_run_peers(kit):
    """On a machine without a GPU the baselines still run their tiny CPU set, where torch exists."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return Step("PyTorch baselines (tiny, CPU)", [], 0, gpu=False)
    return Step("PyTorch baselines (tiny, CPU)", [sys.executable, "benches/peers/baselines.py", "--mole", MOLE,
                                                  "--device", "cpu", "--dtype", "bf16", "--shapes", "tiny",
                                                  "--backward", "--out", os.path.join(kit.work, "peers.json")], 180,
                gpu=False, json_out="peers.json")


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def layer_key(r):
    return (r.get("method"), r.get("d_in"), r.get("d_out"), r.get("tokens"))


def ffn_key(r):
    return (r.get("method"), r.get("tokens"), r.get("d"), r.get("f"))


def crate_us(r):
    """A crate row's time (`time_us` as `bench layer` writes it; `us` accepted)."""
    return r.get("time_us") if r.get("time_us") is not None else r.get("us")


def with_baselines(r, peers, key):
    """A crate row with the baselines of the same key: each one's time and ratio, the fastest
    checked one and the speed-up over it (a failed or skipped baseline is never the fastest)."""
    us, base = crate_us(r), {}
    for p in peers:
        if key(p) == key(r):
            entry = {"status": p["status"], "time_us": p.get("time_us")}
            if us and p.get("time_us"):
                entry["ratio"] = p["time_us"] / us
            base[p["baseline"]] = entry
    timed = [b["time_us"] for b in base.values() if b["status"] == "ok" and b.get("time_us")]
    fastest = min(timed) if timed else None
    return dict(r, time_us=us, baselines=base, fastest_baseline_us=fastest,
                speedup_vs_fastest=(fastest / us) if fastest and us else None)


def pass_of(r):
    """A layer row's pass: `pass` where it says, else forward (rows written before the backward)."""
    return r.get("pass") or "forward"


def results(kit, env):
    """results.json: the steps, then one entry per (method, shape) with the baselines' ratios: the
    layers (`mole bench layer`, matched by method, d_in, d_out, tokens), their backward (`mole
    bench layer --backward` with the baselines' backward rows, matched alike) and the FFN block
    (`mole bench ffn`, matched by method, tokens, d, f), and every FFN block baseline row."""
    layer = load(os.path.join(kit.work, "bench_layer.json")) or {"rows": []}
    layer_bwd = load(os.path.join(kit.work, "layer_backward.json")) or {"rows": []}
    grouped = load(os.path.join(kit.work, "bench_grouped.json")) or {"rows": []}
    ffn = load(os.path.join(kit.work, "ffn.json")) or {"rows": []}
    peers = load(os.path.join(kit.work, "peers.json")) or {"rows": []}
    layer_peers = [p for p in peers["rows"] if p.get("block") != "ffn" and pass_of(p) == "forward"]
    bwd_peers = [p for p in peers["rows"] if p.get("block") != "ffn" and pass_of(p) == "backward"]
    ffn_peers = [p for p in peers["rows"] if p.get("block") == "ffn"]
    shapes = [with_baselines(r, layer_peers, layer_key) for r in layer["rows"]]
    crate_bwd = [r for r in layer_bwd["rows"] if r.get("pass", "backward") == "backward"]
    return {
        "set": kit.set_name,
        "dry_run": kit.dry_run,
        "environment": env,
        "copy_gbs": layer.get("copy_gbs"),
        "steps": [s.record() for s in kit.steps],
        "layers": shapes,
        "backward_copy_gbs": layer_bwd.get("copy_gbs"),
        "layers_backward": [with_baselines(r, bwd_peers, layer_key) for r in crate_bwd],
        "grouped": grouped["rows"],
        "ffn": [with_baselines(r, ffn_peers, ffn_key) for r in ffn["rows"]],
        "ffn_baselines": ffn_peers,
        "peers_unmatched": [p for p in layer_peers if p.get("method") not in {r["method"] for r in layer["rows"]}]
        + [p for p in bwd_peers if p.get("method") not in {r["method"] for r in crate_bwd}],
    }


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def report(res):
    lines = [f"# GPU kit report ({res['set']}{', dry run' if res['dry_run'] else ''})", ""]
    for k, v in res["environment"].items():
        lines.append(f"- {k}: {v}")
    counts = {s: sum(1 for x in res["steps"] if x["status"] == s) for s in ("pass", "fail", "cut", "skipped")}
    lines += ["", f"**{counts['pass']} passed, {counts['fail']} failed, {counts['skipped']} skipped, "
              f"{counts['cut']} cut by the budget**", "",
              "| step | status | s | detail |", "|---|---|---|---|"]
    for s in res["steps"]:
        detail = s["detail"].replace("|", "/")
        lines.append(f"| {s['step']} | {s['status'].upper()} | {s['seconds']} | {detail} |")
    if res["layers"]:
        lines += layer_table(f"Layers (bf16, d = 4096; copy bandwidth {fmt(res['copy_gbs'], '.0f')} GB/s)",
                             res["layers"])
    if res.get("layers_backward"):
        title = (f"Layers, backward (bf16, d = 4096; copy bandwidth {fmt(res.get('backward_copy_gbs'), '.0f')} GB/s; "
                 "baselines: PyTorch autograd)")
        lines += layer_table(title, res["layers_backward"])
    if res["grouped"]:
        lines += ["", "## Grouped (SGMV)", "", "| d_in | d_out | r | E | k | T | µs | GB/s | % copy |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in res["grouped"]:
            frac = None if r.get("fraction_of_copy") is None else 100 * r["fraction_of_copy"]
            lines.append(f"| {r['d_in']} | {r['d_out']} | {r['rank']} | {r['experts']} | {r['k']} | {r['tokens']} | "
                         f"{fmt(r.get('time_us'), '.1f')} | {fmt(r.get('gbs'), '.0f')} | {fmt(frac, '.0f')} |")
    if res.get("ffn"):
        lines += ["", "## FFN block (MixLoRA: every expert a whole FFN with LoRA)", "",
                  "| method | d | f | act | T | µs | GB/s | % copy | check | fastest baseline µs | speed-up |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["ffn"]:
            check = r.get("check") or {}
            ok = "-" if not check else ("ok" if check.get("ok") else "FAIL")
            frac = None if r.get("fraction_of_copy") is None else 100 * r["fraction_of_copy"]
            lines.append(
                f"| {r.get('method')} | {r.get('d')} | {r.get('f')} | {r.get('activation', '-')} | {r.get('tokens')} | "
                f"{fmt(r.get('time_us'), '.1f')} | {fmt(r.get('gbs'), '.0f')} | {fmt(frac, '.0f')} | {ok} | "
                f"{fmt(r['fastest_baseline_us'], '.1f')} | {fmt(r['speedup_vs_fastest'], '.2f')}x |")
    if res.get("ffn_baselines"):
        lines += ["", "## FFN block baselines (PyTorch)", "",
                  "| method | f | act | T | baseline | status | µs | GB/s | TFLOP/s | reference |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for p in res["ffn_baselines"]:
            ref = ((p.get("check") or {}).get("reference") or "-").split(" (")[0]
            status = str(p.get("status")).replace("|", "/")
            lines.append(f"| {p.get('method')} | {p.get('f', '-')} | {p.get('activation', '-')} | "
                         f"{p.get('tokens', '-')} | {p.get('baseline')} | {status} | {fmt(p.get('time_us'), '.1f')} | "
                         f"{fmt(p.get('gbs'), '.0f')} | {fmt(p.get('tflops'), '.1f')} | {ref} |")
    if res["peers_unmatched"]:
        lines += ["", "## Baselines without a crate row", "", "| method | T | baseline | status | µs | pass |",
                  "|---|---|---|---|---|---|"]
        for p in res["peers_unmatched"]:
            lines.append(f"| {p.get('method')} | {p.get('tokens', '-')} | {p.get('baseline')} | {p.get('status')} | "
                         f"{fmt(p.get('time_us'), '.1f')} | {pass_of(p)} |")
    return "\n".join(lines) + "\n"


def layer_table(title, rows):
    """The report's lines of one table of crate layer rows joined with their baselines."""
    lines = ["", f"## {title}", "",
             "| method | T | strategy | µs | GB/s | % copy | check | fastest baseline µs | speed-up |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        check = r.get("check") or {}
        ok = "-" if not check else ("ok" if check.get("ok") else "FAIL")
        frac = None if r.get("fraction_of_copy") is None else 100 * r["fraction_of_copy"]
        lines.append(
            f"| {r['method']} | {r['tokens']} | {r.get('strategy') or r.get('error', '-')} | "
            f"{fmt(r.get('time_us'), '.1f')} | {fmt(r.get('gbs'), '.0f')} | {fmt(frac, '.0f')} | {ok} | "
            f"{fmt(r['fastest_baseline_us'], '.1f')} | {fmt(r['speedup_vs_fastest'], '.2f')}x |")
    return lines


def environment(kit):
    env = {"kit commit": "-", "GPU": kit.no_gpu_reason or "-"}
    manifest = load(os.path.join(KIT, "manifest.json"))
    if manifest:
        env["kit commit"] = manifest["commit"] + (" (dirty)" if manifest.get("dirty") else "")
    if not kit.no_gpu_reason:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True)
        env["GPU"] = r.stdout.strip()
    if os.path.exists(MOLE):
        info = subprocess.run([MOLE, "info"], capture_output=True, text=True).stdout
        nvrtc = [l for l in info.splitlines() if l.startswith("NVRTC")]
        env["NVRTC"] = nvrtc[0] if nvrtc else "-"
    return env


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("set", choices=sorted(BUDGET_S))
    ap.add_argument("outdir")
    ap.add_argument("--dry-run", action="store_true", help="no GPU here: report every GPU step as skipped")
    args = ap.parse_args()
    os.makedirs(args.outdir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="mole-kit-")
    os.environ["MOLE_CACHE_DIR"] = os.path.join(work, "cache")
    kit = Kit(args.set, work, args.dry_run)
    kit.no_gpu_reason = ("dry run: " + (gpu_presence() or "GPU steps not run")) if args.dry_run else None

    ok, detail = check_manifest()
    manifest_step = Step("packed binaries (.gpu/manifest.json)", [], 0, gpu=False)
    manifest_step.status, manifest_step.detail = ("pass" if ok else "fail"), detail
    kit.steps.append(manifest_step)
    kit.run(Step("nvidia-smi -L", ["nvidia-smi", "-L"], 20))
    info = Step("mole info", [MOLE, "info"], 30, gpu=False)
    if not args.dry_run:
        # The GPU machine has CUDA's NVRTC: a run that silently fell back to the shipped PTX
        # would leave NVRTC discovery and every compiled build untested.
        info.must_not_say = "NVRTC: not available"
    kit.run(info)
    # Each packed test binary starts here and lists its GPU tests (no GPU needed).
    for t in gpu_test_binaries():
        kit.run(Step(f"list {os.path.basename(t)}", [t, "--list", "--ignored"], 30, gpu=False))
    correctness, timing = steps_for(kit)
    c_build, c_run = c_abi_steps(kit)
    kit.run(c_build)
    if c_build.status not in ("pass", "skipped"):
        c_run.argv, c_run.detail = [], f"tests/c/forward_gpu.c did not compile ({c_build.status})"
    correctness.append(c_run)
    # One compiler run fills the kit's kernel cache (MOLE_CACHE_DIR) before the parallel steps,
    # so they load cubins instead of each compiling the same builds.
    kit.run(correctness.pop(0))
    # Timing next, on an otherwise idle GPU and before the sanitizers can eat the budget.
    for step in timing:
        kit.run(step)
    runnable = [s for s in correctness if s.argv]
    for s in correctness:
        if not s.argv:
            s.status = "skipped"
            kit.steps.append(s)
    kit.run_parallel(runnable, workers=8)
    if args.dry_run:
        peers = dry_run_peers(kit)
        if peers.argv:
            kit.run(peers)
        else:
            peers.status, peers.detail = "skipped", "torch is not installed here"
            kit.steps.append(peers)

    # The logs first: whatever happens to the report, the evidence comes back.
    with tarfile.open(os.path.join(args.outdir, "logs.tar.gz"), "w:gz") as tar:
        # The kernel cache's cubins are not evidence, and would crowd the 16 MiB a file may take back.
        tar.add(work, arcname="kit", filter=lambda info: None if info.name.startswith(("kit/cache", "kit/lib")) else info)
    try:
        res = results(kit, environment(kit))
        tuning = os.path.join(work, "tuning")
        for f in sorted(os.listdir(tuning)) if os.path.isdir(tuning) else []:
            if f.endswith(".json"):
                shutil.copy(os.path.join(tuning, f), os.path.join(args.outdir, "tuning.json"))
                res["tuning_file"] = f
        text = report(res)
    except Exception:  # noqa: BLE001 (a broken report must not lose the run)
        import traceback

        res = {"steps": [s.record() for s in kit.steps], "report_error": traceback.format_exc()}
        text = "# GPU kit report (the report builder failed)\n\n```\n" + res["report_error"] + "```\n"
        kit.steps.append(Step("report builder", [], 0, gpu=False))
        kit.steps[-1].status = "fail"
    with open(os.path.join(args.outdir, "results.json"), "w") as f:
        json.dump(res, f, indent=2)
    with open(os.path.join(args.outdir, "report.md"), "w") as f:
        f.write(text)
    shutil.rmtree(work, ignore_errors=True)
    failed = [s for s in kit.steps if s.status == "fail"]
    print(text.split("\n## ")[0])
    print(f"kit: {len(failed)} failed step(s); results in {args.outdir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
