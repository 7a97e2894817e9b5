"""Checking a baseline against the crate's f64 reference (`mole eval`) on the same inputs.

Tolerance (relative Frobenius error of y over the tokens that are not near-ties):

    tol = 2 * (sqrt(ROUNDINGS) * u + sqrt(d_in + R) * u_acc)

`u` is the storage dtype's unit roundoff (bf16 2^-8, f16 2^-11, f32 2^-24), `u_acc` = 2^-24 that
of the f32 accumulators. A baseline rounds to the storage dtype at most ROUNDINGS = 8 times on its
way to y (router scores, gate weights, h, gated h, the merged core or per-expert product, the
expansion, the scaled delta, y); independent roundings of relative size <= u add up as
sqrt(count) * u in a Frobenius norm. The f32 sums over d_in (shrink) then R (expand) grow as
sqrt(length) * u_acc (and split-K partial sums that PyTorch may reduce in bf16 / f16 count
among the roundings). The factor 2 leaves room for the gate weights' error through logits of a
few units; measured errors are about 1.3 u (bf16, f16) on a CPU. Inputs make the delta of the
order of y, so an error in the delta shows in y's error; f32 matmuls run without TF32.

Near-ties: a token whose routing decision lies within the scores' resolution of a boundary may be
routed differently by a baseline that computes scores in the storage dtype; such tokens are left
out of the comparison and counted. Score z[t, e] = inp[t] . W[:, e] (x or h against the router
weight; x against A for the low-rank router) is rounded to the dtype once, its input h once more
for the h router, and summed in f32, so its error is at most

    dz = u * |z| + 3 * (u_in + sqrt(n) * u_acc) * ||inp[t] * W[:, e]||_2

(u_in = u for the h router, else 0; n the reduction length; 3 standard deviations of the random
walk). A selection key moves by at most dkey = dz (logits, |z + bias|) or s (1 - s) dz (sigmoid).
Near-tie: the keys of a kept and a dropped expert overlap within their dkey; for top-p and DynMoLE
a cumulative probability within dcum = 2 sum_i p_i dz_i of its threshold (|dp_i| <= p_i (dz_i +
sum_j p_j dz_j)); for DynMoLE a normalised Tsallis entropy within sum_i |dH/dp_i| |dp_i| of its
threshold. Given weights are exact in both computations: a tie there is an exact tie.

The FFN-expert block (MixLoRA's) chains two reductions: over d (base gate/up and the gate/up
shrinks, then their expands over R) and over f (base down and the down shrink, then the down
expand over R). Its tolerance is

    tol = 2 * (sqrt(FFN_ROUNDINGS) * u + (sqrt(d + R) + sqrt(f + R)) * u_acc)

with FFN_ROUNDINGS = 12, the storage roundings on the way to y of the baseline that rounds most
(`ffn_trick`: router scores, gate weight, base gate|up outputs, the shrink h, g and u after their
expands, act(g), a = act(g) * u, w * a, its sum into a_mix, the down shrink, its scaling by w s_d,
y); each reaches y with relative size about u: a relative error of g passes through the activation
with the factor g act'(g) / act(g), which is about 1 where act(g) is large (SiLU, GELU) and grows
only where act(g) is small, so it hardly moves a Frobenius norm. The two f32 reductions add
their random walks (bounded by the sum of square roots). The factor 2 covers the gate weights'
error and the activation's factor. Its near-ties are the x router's (d as the reduction length).
When `mole eval` does not take the block (a binary that parses every spec as a layer spec), the
reference is `ffn_reference_f64`: the block by its definition in float64 (each expert's whole FFN
on its tokens, mixed by the routed weights), and the check record says so.

The layer's backward: the gradients of L = sum dy . y with respect to `Layer.grad_inputs` (x, A
unless frozen, B, the router weight, CoMoL's cores, given weights), the selection held constant.
The reference is `mole eval` given the input `dy` where the binary writes `grad.*` outputs, else
`layer_grads_f64`: the layer recomputed from its spec in float64 on the CPU (h = x A, the rule's
weights of the experts the reference selected, from the scores; the mix; y = y0 + scale h' B) and
differentiated by PyTorch's autograd (the record's `reference` says which). Near-tie tokens get
dy = 0: every gradient is linear in dy, so they reach none. Each gradient g is compared by its
relative Frobenius error under

    tol_g = 2 * (sqrt(GRAD_ROUNDINGS) * u + sqrt(n_g) * u_acc)

n_g the f32 reductions on g's way: d_in (h), d_out (dy B^T), R and E (the mix, CoMoL's merge,
the router's input gradient), plus the tokens for the parameters' gradients (A, B, the router
weight, the cores), which sum over them. GRAD_ROUNDINGS = 16, twice the forward's ROUNDINGS: a
gradient reads back the forward's roundings it depends on (h, the gate weights, the gated h or the
merged core) and adds its own on its way (dy B^T, its scaling, the gated dh, the gate's gradient
summed over the expert's r columns, the rule's Jacobian cast back, the partial gradients autograd
sums in the storage dtype, the gradient itself; split-K partial sums count among them). The
rule's Jacobian subtracts the weighted mean of the gate gradients (dz_e = w_e (dw_e - sum_j w_j
dw_j)), which cancels part of them; the factor 2 covers it, as it covers the gate weights' error
in the forward. Measured errors are 0.6 to 1.3 u (bf16) and 2.5 to 7 u (f32) on a CPU, against
tolerances of 8 u and over 30 u.
"""

import json
import math
import re
import subprocess
from pathlib import Path

import torch

ROUNDINGS = 8
FFN_ROUNDINGS = 12
GRAD_ROUNDINGS = 16
U_ACC = 2.0**-24
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}


def tolerance(layer, dtype):
    """The tolerance of the module docstring for `layer` in `dtype`."""
    u = UNIT_ROUNDOFF[dtype]
    return 2.0 * (math.sqrt(ROUNDINGS) * u + math.sqrt(layer.d_in + layer.total_rank) * U_ACC)


def tolerance_grad(layer, dtype, name, tokens):
    """The tolerance of gradient `name` (a `Layer.grad_inputs` name) over `tokens` tokens (module
    docstring)."""
    n = layer.d_in + layer.d_out + layer.total_rank + layer.experts
    if name in ("A", "B", "router_weight", "router_bias", "cores"):
        n += tokens
    return 2.0 * (math.sqrt(GRAD_ROUNDINGS) * UNIT_ROUNDOFF[dtype] + math.sqrt(n) * U_ACC)


def tolerance_ffn(block, dtype):
    """The FFN block's tolerance of the module docstring for `block` in `dtype`."""
    u, big_r = UNIT_ROUNDOFF[dtype], block.total_rank
    acc = (math.sqrt(block.d + big_r) + math.sqrt(block.f + big_r)) * U_ACC
    return 2.0 * (math.sqrt(FFN_ROUNDINGS) * u + acc)


def reference(mole, layer, t, workdir):
    """Writes `t` and the layer's spec, runs `mole eval`, returns its outputs (CPU tensors)."""
    from safetensors.torch import load_file, save_file

    work = Path(workdir)
    spec_path, in_path, out_path = work / "layer.json", work / "in.safetensors", work / "out.safetensors"
    spec_path.write_text(json.dumps(layer.spec(), indent=1))
    save_file({k: v.detach().cpu().contiguous() for k, v in t.items()}, str(in_path))
    cmd = [str(mole), "eval", "--spec", str(spec_path), "--inputs", str(in_path), "--out", str(out_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"mole eval exited {done.returncode}: {(done.stderr or done.stdout).strip()[:300]}")
    return load_file(str(out_path))


# How `mole eval` rejects a spec it parses as a layer spec: a binary without the FFN block.
_NO_FFN_EVAL = re.compile(r"layer spec: .*(unknown field|missing field)")


def ffn_reference(mole, block, t, workdir):
    """(outputs, source): the block through `mole eval` when the binary takes it, else
    `ffn_reference_f64` (source says which, and why). Outputs are f64 CPU tensors with the router
    scores (computed here in f64 when `mole eval` does not write them) for the near-tie rule."""
    try:
        ref, source = reference(mole, block, t, workdir), "mole eval"
    except RuntimeError as e:
        if not _NO_FFN_EVAL.search(str(e)):
            raise
        why = str(e).split(": ", 1)[-1][:160]
        ref, source = ffn_reference_f64(block, t), f"float64 PyTorch (mole eval does not take the FFN block: {why})"
    if "scores" not in ref:
        ref["scores"] = t["x"].double().cpu() @ t["router_weight"].double().cpu()
    return ref, source


def ffn_reference_f64(block, t):
    """y, ids, weights, a_mix and the router's scores and probabilities of the block in float64
    (on t's device, returned on the CPU), by its definition: softmax top-k renormalised over the x
    router's scores; each expert's whole FFN with its LoRA on the tokens routed to it (the others
    have weight 0); y = sum_e w_e out_e."""
    import torch.nn.functional as F

    x = {k: v.double() for k, v in t.items()}
    rule, spec = block.rule(), block.spec()
    act = {"silu": F.silu, "gelu": F.gelu}[block.activation]
    scores = x["x"] @ x["router_weight"]
    probs = torch.softmax(scores / rule["temperature"], dim=-1)
    weights, ids = probs.topk(rule["k"], dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    gates = torch.zeros_like(probs).scatter_(1, ids, weights)
    base_g, base_u = x["x"] @ x["base.gate"], x["x"] @ x["base.up"]
    y = torch.zeros(x["x"].shape[0], block.d, dtype=torch.float64, device=scores.device)
    a_mix = torch.zeros_like(base_g)

    def delta(proj, inp, cols):
        return spec[proj]["scale"] * (inp @ x[f"{proj}.A"][:, cols]) @ x[f"{proj}.B"][cols]

    for e in range(block.experts):
        cols = slice(e * block.rank, (e + 1) * block.rank)
        tok = (gates[:, e] != 0).nonzero().squeeze(1)  # the rows of the other tokens have weight 0
        xe, we = x["x"][tok], gates[tok, e:e + 1]
        a = act(base_g[tok] + delta("gate", xe, cols)) * (base_u[tok] + delta("up", xe, cols))
        y.index_add_(0, tok, we * (a @ x["base.down"] + delta("down", a, cols)))
        a_mix.index_add_(0, tok, we * a)
    out = {"y": y, "ids": ids.int(), "weights": weights, "a_mix": a_mix, "scores": scores, "probs": probs}
    return {k: v.cpu() for k, v in out.items()}


def spec_problems(layer, t, ref):
    """Where the reference's routing under our spec JSON departs from the method's documentation
    (README's gating table, `src/model/method.rs`): slots per token and the weights' defining sums."""
    ids, w = ref["ids"].long(), ref["weights"]
    tokens, e, k = ids.shape[0], layer.experts, layer.k
    sel = ids >= 0
    nsel, wsum = sel.sum(1), w.sum(1)
    slots = {"llava-mole-sparse": 1, "adapter-serving": 1, "x-lora": e if k >= e else k}
    dynamic = ("mix-lora-dynamic-per-linear", "dyn-mole", "llava-mole-dense", "lora-moe")
    want_slots = e if layer.method in dynamic else slots.get(layer.method, k)
    problems = []
    if ids.shape != (tokens, want_slots):
        problems.append(f"slots: reference gives {ids.shape[1]}, the method has {want_slots}")
        return problems

    def expect(cond, what):
        if not bool(cond):
            problems.append(what)

    probs_at = ref["probs"].gather(1, ids.clamp(min=0)) * sel if "probs" in ref else None
    m = layer.method
    if m in ("mix-lora-per-linear", "comol"):
        expect((nsel == k).all() and torch.allclose(wsum, torch.ones_like(wsum)), "top-k weights renormalised to 1")
    elif m == "flex-olmo":
        expect((nsel == k).all() and torch.allclose(w, probs_at), "top-k weights are the softmax probabilities")
    elif m in ("llava-mole-dense", "lora-moe"):
        expect((nsel == e).all() and torch.allclose(wsum, torch.ones_like(wsum)), "dense softmax over every expert")
    elif m == "mix-lora-dynamic-per-linear":
        expect(torch.allclose(w, probs_at) and (wsum > 0.8).all(), "top-p 0.8: raw probabilities summing past 0.8")
    elif m == "dyn-mole":
        expect(torch.allclose(w, probs_at) and (nsel >= 2).all(), "DynMoLE: raw probabilities, keep-top-2")
    elif m == "llava-mole-sparse":
        expect((nsel == 1).all() and (w == 1).all(), "top-1 with weight 1")
    elif m == "smora":
        expect((nsel == k).all() and torch.allclose(wsum, torch.full_like(wsum, k)), "sigmoid top-k weights sum to k")
    elif m == "fly-lora":
        expect((nsel == k).all() and (w == 1).all(), "magnitude top-k with weight 1")
    elif m == "x-lora":
        given = t["weights"].double().cpu().gather(1, ids.clamp(min=0))
        expect(torch.equal(w, given), "given weights passed through")
    elif m == "adapter-serving":
        expect(torch.equal(ids[:, 0], t["adapter_ids"].long().cpu()) and torch.equal(w[:, 0], sel[:, 0].double()),
               "one adapter per token, weight 1, -1 for none")
    return problems


def _score_error(layer, t, ref, dtype):
    """dz [T, E] of the module docstring, from the reference's h and scores and the inputs (f64)."""
    u = UNIT_ROUNDOFF[dtype]
    router, f64 = layer.router(), lambda name: t[name].double().cpu()
    if router == "h":
        inp, w, u_in, n = ref["h"], f64("router_weight"), u, layer.total_rank
    else:
        inp, w, u_in, n = f64("x"), f64("A" if router == "low_rank" else "router_weight"), 0.0, layer.d_in
    spread = (inp.pow(2) @ w.pow(2)).sqrt()
    return u * ref["scores"].abs() + 3.0 * (u_in + math.sqrt(n) * U_ACC) * spread


def _overlap(keys, dkey, kept):
    """Per token: a kept and a dropped expert whose keys are within their errors."""
    inf = torch.tensor(math.inf, dtype=keys.dtype)
    lowest_kept = torch.where(kept, keys - dkey, inf).amin(1)
    highest_dropped = torch.where(kept, -inf, keys + dkey).amax(1)
    return lowest_kept <= highest_dropped


def near_ties(layer, t, ref, dtype):
    """Boolean [T]: tokens whose routing is a near-tie in `dtype` (module docstring)."""
    ids = ref["ids"].long()
    tokens = ids.shape[0]
    g = layer.spec()["gating"]
    e = layer.experts
    kept = torch.zeros(tokens, e + 1, dtype=torch.bool).scatter_(1, torch.where(ids < 0, e, ids), True)[:, :e]
    if g["type"] != "routed":
        if g["type"] == "given" and g["top_k"] is not None:
            return _overlap(t["weights"].double().cpu(), 0.0, kept)
        return torch.zeros(tokens, dtype=torch.bool)
    rule, z = g["rule"], ref["scores"]
    dz = _score_error(layer, t, ref, dtype)
    bias = t["selection_bias"].double().cpu() if rule.get("bias") else 0.0
    if rule["type"] == "sigmoid_topk":
        s = torch.sigmoid(z)
        tie = _overlap(s + bias, s * (1.0 - s) * dz, kept)
    elif rule["type"] == "magnitude_topk":
        tie = _overlap((z + bias).abs(), dz, kept)
    else:
        tie = _overlap(z, dz, kept)
    if rule["type"] in ("top_p", "dynmole"):
        p = ref["probs"]
        ps = p.gather(1, z.argsort(dim=1, descending=True, stable=True))
        dp = p * (dz + (p * dz).sum(1, keepdim=True))
        cum = ps.cumsum(1)
        if rule["type"] == "top_p":
            cum_tie = ((cum - ps - rule["p"]).abs() <= dp.sum(1, keepdim=True)).any(1)
        else:
            q, n = rule["q"], e
            pc, norm = p.clamp(min=1e-300), 1.0 - n ** (1.0 - q)
            excess = (1.0 - pc.pow(q).sum(1)) / norm - rule["entropy_threshold"]
            d_entropy = (q * pc.pow(q - 1.0) / norm * dp).sum(1)
            # The cumulative cut matters only where the entropy does not clearly select everything.
            cum_tie = ((cum - rule["top_p"]).abs() <= dp.sum(1, keepdim=True)).any(1) & (excess <= d_entropy)
            tie |= excess.abs() <= d_entropy
        tie |= cum_tie
    return tie


def compare(y, ref_y, tie, tol):
    """The check record: relative Frobenius error of `y` against `ref_y` over the non-tie tokens."""
    keep = ~tie
    diff = (y.double().cpu() - ref_y)[keep]
    denom = ref_y[keep].norm()
    rel = float(diff.norm() / denom) if float(denom) > 0 else float(diff.norm())
    return {"rel_err": rel, "tol": tol, "near_tie_tokens": int(tie.sum())}


# ---------------------------------------------------------------------------------------------
# The layer's backward.

# How `mole eval` rejects an input it does not know: a binary without the backward.
_NO_DY_EVAL = re.compile(r"tensor `dy`: unknown input name")


def grad_reference(mole, layer, t, dy, ref, workdir):
    """(gradients, source): the gradients of L = sum dy . y by `Layer.grad_inputs` name (f64 CPU
    tensors), from `mole eval` given `dy` when the binary writes `grad.*`, else `layer_grads_f64`
    on the selection `ref` (the forward's `mole eval` outputs) made; source says which, and why."""
    try:
        out = reference(mole, layer, dict(t, dy=dy), workdir)
        why = "mole eval writes no grad.x"
    except RuntimeError as e:
        if not _NO_DY_EVAL.search(str(e)):
            raise
        out, why = {}, "mole eval does not take dy"
    grads = {k[len("grad."):]: v.double() for k, v in out.items() if k.startswith("grad.")}
    if "x" in grads:
        return grads, "mole eval"
    return layer_grads_f64(layer, t, dy, ref["ids"])[0], f"float64 PyTorch ({why})"


def layer_f64(layer, v, ids):
    """y of the layer in float64 from the inputs `v` (f64 CPU tensors) by its spec, the experts
    `ids` [T, S] (-1: empty slot) selected, each rule's weights computed from the scores (so that
    autograd differentiates them as the selection-constant backward does)."""
    g, e, r = layer.spec()["gating"], layer.experts, layer.rank
    sel = ids >= 0
    idx = ids.clamp(min=0)
    h = v["x"] @ v["A"]
    if g["type"] == "adapter_ids":
        w = sel.double()
    elif g["type"] == "given":
        w = v["weights"].gather(1, idx) * sel
    else:
        rule = g["rule"]
        z = {"x": lambda: v["x"] @ v["router_weight"], "h": lambda: h @ v["router_weight"],
             "low_rank": lambda: h}[g["router"]["type"]]()
        if rule["type"] == "sigmoid_topk":
            s = torch.sigmoid(z).gather(1, idx)
            w = rule["k"] * s / s.sum(1, keepdim=True)
        elif rule["type"] == "magnitude_topk" or rule.get("weights") == "unit":
            w = sel.double()
        else:
            w = torch.softmax(z / rule.get("temperature", 1.0), dim=1).gather(1, idx) * sel
            if rule.get("weights") == "renormalized":
                w = w / w.sum(1, keepdim=True)
    gates = torch.zeros(ids.shape[0], e, dtype=torch.float64).scatter_add(1, idx, w * sel)
    if layer.comol:
        hm = torch.einsum("ti,tc,cij->tj", h, gates, v["cores"])
    else:
        hm = h * gates.repeat_interleave(r, dim=1)
    return v["y"] + layer.spec()["scale"] * hm @ v["B"]


def layer_grads_f64(layer, t, dy, ids):
    """(gradients by `Layer.grad_inputs` name, y): `layer_f64` on t's inputs differentiated by
    autograd against `dy` (a gradient the loss does not reach is zero), on the CPU."""
    names = layer.grad_inputs()
    v = {k: val.detach().double().cpu().requires_grad_(k in names) for k, val in t.items()
         if k != "adapter_ids"}
    y = layer_f64(layer, v, ids.long().cpu())
    grads = torch.autograd.grad(y, [v[n] for n in names], dy.double().cpu(), allow_unused=True)
    return {n: torch.zeros_like(v[n]) if gr is None else gr for n, gr in zip(names, grads)}, y.detach()


def compare_grads(grads, ref, tol_of, ties):
    """The backward's check record: each gradient's relative Frobenius error against `ref`
    (`tol_of(name)` its tolerance; a reference gradient of zero norm admits only zero), and
    `problems`: gradients that exceed their tolerance, or that one side has and the other not."""
    record, problems = {"grads": {}, "near_tie_tokens": int(ties)}, []
    for name in sorted(set(grads) | set(ref)):
        if name not in grads or name not in ref:
            problems.append(f"grad {name}: only the {'reference' if name in ref else 'baseline'} has it")
            continue
        mine, want = grads[name].double().cpu(), ref[name].double().cpu()
        if mine.shape != want.shape:
            problems.append(f"grad {name}: shape {list(mine.shape)}, the reference's {list(want.shape)}")
            continue
        diff, denom = float((mine - want).norm()), float(want.norm())
        rel, tol = (diff / denom if denom > 0 else diff), tol_of(name)
        record["grads"][name] = {"rel_err": rel, "tol": tol}
        if not rel <= tol:  # NaN fails
            problems.append(f"grad {name} rel_err {rel:.3e} > tol {tol:.3e}")
    worst = max(record["grads"].items(), key=lambda kv: kv[1]["rel_err"] / kv[1]["tol"], default=(None, {}))
    record.update(rel_err=worst[1].get("rel_err"), tol=worst[1].get("tol"), worst=worst[0])
    return record, problems
