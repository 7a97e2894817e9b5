"""What a user would run instead of the crate, in PyTorch, in the storage dtype (GEMMs accumulate
in f32 as cuBLAS does; softmax and sigmoid in f32 as MixLoRA's router does, weights cast back).

Each baseline is `prepare(layer, t) -> run`, where `t` holds the inputs named as `mole eval` reads
them and `run()` updates `t["y"]` in place (as the crate's layer does) and returns it. Routing is
part of every run: the crate's fused layer routes on the device too.

- `dense`: the formulation of PEFT-style MoLE code: `h = x @ A_all`, router, gate mask expanded
  over each expert's rank columns, `y += scale * (h * mask) @ B_all` (CoMoL: every token's merged
  core `sum_c w_c C_c`, then `h @ merged`).
- `loop`: the per-expert loop of MixLoRA / MoE-PEFT (Mixtral's sparse MoE block): router, top-k,
  then per expert `torch.where` of its tokens, `index_select`, two matmuls, weighted `index_add_`
  (CoMoL: the loop runs over cores on the shared `h`).
- `grouped_mm`: routed (token, slot) pairs sorted by expert, `torch._grouped_mm` over the expert
  segments for the shrink and the expand, weighted `index_add_`.
- `peft_mixed`: PEFT's mixed-adapter batch (`adapter_names=`) over E adapters of a LoraModel on a
  Linear; its base layer returns the given base output y (the crate's `y` input), so neither side
  times the base GEMM and PEFT adds its deltas into y in place.

Pairs a baseline cannot express (`unsupported` says why; no row is written for them):
- FlyLoRA in `loop` and `grouped_mm`: its router reads h = x @ A of every rank, so the shrink is
  dense by construction; a per-expert formulation would compute it twice.
- CoMoL in `grouped_mm`: its shrink and expand are shared by every core; grouping would only cover
  the r x r core products, which the loop already runs per core.
- `peft_mixed` serves one adapter per token: it expresses `adapter-serving` only.
"""

import torch

BASELINES = ("dense", "loop", "grouped_mm", "peft_mixed")


class Skip(Exception):
    """A baseline that cannot run this configuration here (the message says why)."""


def unsupported(baseline, layer):
    """Why `baseline` cannot express `layer`'s method, or None."""
    m = layer.method
    if baseline == "peft_mixed" and m != "adapter-serving":
        return "PEFT's mixed batch serves one adapter per token (adapter-serving only)"
    if baseline in ("loop", "grouped_mm") and m == "fly-lora":
        return "FlyLoRA's router reads h of every rank: the shrink is dense by construction"
    if baseline == "grouped_mm" and layer.comol:
        return "CoMoL's shrink and expand are shared by every core: nothing to group"
    return None


# ---------------------------------------------------------------------------------------------
# Routing: (ids [T, S] int64 with -1 for an empty slot, weights [T, S] in the storage dtype).


def _scores(layer, t, h):
    router = layer.router()
    if router == "x":
        return t["x"] @ t["router_weight"]
    if router == "h":
        return h @ t["router_weight"]
    return h  # low_rank: each rank-1 expert scored by its own activation


def _keep(order, keep, w):
    return torch.where(keep, order, -1), torch.where(keep, w, 0.0)


def route(layer, t, h=None):
    """Every token's experts and weights under the layer's gating (see `src/model/gating.rs`)."""
    dtype, x = t["x"].dtype, t["x"]
    g = layer.spec()["gating"]
    if g["type"] == "adapter_ids":
        ids = t["adapter_ids"].long().unsqueeze(1)
        return ids, (ids >= 0).to(dtype)
    if g["type"] == "given":
        w = t["weights"]
        if g["top_k"] is None:
            return torch.arange(layer.experts, device=x.device).expand(w.shape[0], -1), w
        top_w, top_i = w.topk(g["top_k"], dim=-1)
        return top_i, top_w
    rule = g["rule"]
    z = _scores(layer, t, h).float()
    kind = rule["type"]
    if kind == "softmax_topk":
        p = torch.softmax(z / rule["temperature"], dim=-1)
        top_w, top_i = p.topk(rule["k"], dim=-1)
        if rule["weights"] == "renormalized":
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        elif rule["weights"] == "unit":
            top_w = torch.ones_like(top_w)
        return top_i, top_w.to(dtype)
    if kind in ("top_p", "dynmole", "dense_softmax"):
        p = torch.softmax(z / rule.get("temperature", 1.0), dim=-1)
        ps, order = p.sort(dim=-1, descending=True, stable=True)
        if kind == "dense_softmax":
            return order, ps.to(dtype)
        cum = ps.cumsum(dim=-1)
        if kind == "top_p":
            # Up to and including the first expert whose cumulative p exceeds the threshold.
            keep = cum - ps <= rule["p"]
        else:
            q, n = rule["q"], p.shape[-1]
            entropy = (1.0 - p.pow(q).sum(dim=-1)) / (1.0 - n ** (1.0 - q))
            pos = torch.arange(n, device=p.device)
            everything = (entropy > rule["entropy_threshold"]).unsqueeze(1)
            keep = everything | (cum <= rule["top_p"]) | (pos < rule["keep_top_k"])
        return _keep(order, keep, ps.to(dtype))
    bias = t["selection_bias"].float() if rule.get("bias") else 0.0
    if kind == "sigmoid_topk":
        s = torch.sigmoid(z)
        top_i = (s + bias).topk(rule["k"], dim=-1).indices
        top_s = s.gather(1, top_i)
        return top_i, (rule["k"] * top_s / top_s.sum(dim=-1, keepdim=True)).to(dtype)
    if kind == "magnitude_topk":
        top_i = (z + bias).abs().topk(rule["k"], dim=-1).indices
        return top_i, torch.ones(top_i.shape, dtype=dtype, device=x.device)
    raise ValueError(f"unknown routing rule {kind!r}")


def gate_matrix(ids, w, experts):
    """Dense gates [T, E]: each slot's weight at its expert, 0 elsewhere."""
    g = torch.zeros(ids.shape[0], experts + 1, dtype=w.dtype, device=w.device)
    return g.scatter_add_(1, torch.where(ids < 0, experts, ids), w)[:, :experts]


# ---------------------------------------------------------------------------------------------
# Baselines.


def _scale(layer):
    return layer.spec()["scale"]


def prepare_dense(layer, t):
    x, A, B, r = t["x"], t["A"], t["B"], layer.rank

    def run():
        h = x @ A
        gates = gate_matrix(*route(layer, t, h), layer.experts)
        if layer.comol:
            merged = (gates @ t["cores"].reshape(layer.experts, r * r)).view(-1, r, r)
            hm = torch.bmm(h.unsqueeze(1), merged).squeeze(1)
        else:
            hm = h * gates.repeat_interleave(r, dim=1)
        return t["y"].addmm_(hm, B, alpha=_scale(layer))

    return run


def prepare_loop(layer, t):
    x, y, A, B, r, scale = t["x"], t["y"], t["A"], t["B"], layer.rank, _scale(layer)

    def run():
        if layer.comol:
            h = x @ A
            ids, w = route(layer, t, h)
            hm = torch.zeros_like(h)
            for c in range(layer.experts):
                tok, slot = torch.where(ids == c)
                hm.index_add_(0, tok, (h[tok] @ t["cores"][c]) * w[tok, slot, None])
            return y.addmm_(hm, B, alpha=scale)
        ids, w = route(layer, t)
        for e in range(layer.experts):
            tok, slot = torch.where(ids == e)
            cols = slice(e * r, (e + 1) * r)
            out = (x.index_select(0, tok) @ A[:, cols]) @ B[cols]
            y.index_add_(0, tok, out * scale * w[tok, slot, None])
        return y

    return run


def grouped_mm_unsupported(device, dtype):
    """Why `torch._grouped_mm` does not run here, or None (probed on a small known problem)."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    try:
        a = torch.ones(24, 32, dtype=dtype, device=device)
        b = torch.ones(3, 32, 16, dtype=dtype, device=device)
        offs = torch.tensor([8, 8, 24], dtype=torch.int32, device=device)
        out = torch._grouped_mm(a, b, offs=offs)
        if out.shape != (24, 16) or not bool((out.float() == 32.0).all()):
            return "torch._grouped_mm gave a wrong result on a probe"
    except Exception as e:  # any refusal (architecture, dtype, build) is a reason to skip
        return f"torch._grouped_mm on {device} {dtype}: {str(e).splitlines()[0][:160]}"
    return None


def prepare_grouped_mm(layer, t):
    x, y, e, r = t["x"], t["y"], layer.experts, layer.rank
    if (r * x.element_size()) % 16:
        raise Skip(f"rank {r}: torch._grouped_mm needs 16-byte aligned rows ({r * x.element_size()} B)")
    # The weights stored per expert, [E, d_in, r] and [E, r, d_out]: a layout choice made once.
    A3 = t["A"].view(layer.d_in, e, r).permute(1, 0, 2).contiguous()
    B3 = t["B"].view(e, r, layer.d_out)
    slots_tok = torch.arange(x.shape[0], device=x.device)

    def run():
        ids, w = route(layer, t)
        s = ids.shape[1]
        flat = ids.reshape(-1)
        expert, order = flat.sort(stable=True)
        tok = slots_tok.repeat_interleave(s)[order]
        first = torch.searchsorted(expert, 0)  # empty slots (-1) sort first
        expert, tok, ww = expert[first:], tok[first:], w.reshape(-1)[order][first:]
        offs = torch.bincount(expert, minlength=e).cumsum(0).to(torch.int32)
        h = torch._grouped_mm(x.index_select(0, tok), A3, offs=offs) * ww.unsqueeze(1)
        out = torch._grouped_mm(h, B3, offs=offs)
        return y.index_add_(0, tok, out, alpha=_scale(layer))

    return run


def prepare_peft_mixed(layer, t):
    try:
        from peft import LoraConfig, get_peft_model
    except Exception as e:
        raise Skip(f"peft is not importable: {str(e).splitlines()[0][:120]}") from None
    x, A, B, r = t["x"], t["A"], t["B"], layer.rank
    placeholder = torch.empty(0, dtype=x.dtype, device=x.device)
    model = _Wrapper(_GivenBaseOutput(layer.d_in, layer.d_out, placeholder))
    config = LoraConfig(r=r, lora_alpha=layer.alpha, target_modules=["proj"], lora_dropout=0.0)
    model = get_peft_model(model, config, adapter_name="a0")
    for e in range(1, layer.experts):
        model.add_adapter(f"a{e}", config)
    lora = model.base_model.model.proj
    with torch.no_grad():
        for e in range(layer.experts):
            cols = slice(e * r, (e + 1) * r)
            lora.lora_A[f"a{e}"].weight.copy_(A[:, cols].T)
            lora.lora_B[f"a{e}"].weight.copy_(B[cols].T)
    if abs(lora.scaling["a0"] - _scale(layer)) > 0:
        raise ValueError(f"PEFT scaling {lora.scaling['a0']} != the spec's scale {_scale(layer)}")
    model.eval()
    names = ["__base__" if i < 0 else f"a{i}" for i in t["adapter_ids"].tolist()]

    def run():
        lora.base_layer.out = t["y"]
        with torch.no_grad():
            return model(x, adapter_names=names)

    return run


class _GivenBaseOutput(torch.nn.Linear):
    """A Linear whose output is given (set `out`): the base output y, which PEFT updates in place.
    Its weight is an empty placeholder that only tells PEFT the device and dtype."""

    def __init__(self, d_in, d_out, placeholder):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = d_in, d_out
        self.weight = torch.nn.Parameter(placeholder, requires_grad=False)
        self.bias = None
        self.out = None

    def forward(self, x):
        return self.out


class _Wrapper(torch.nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


PREPARE = {
    "dense": prepare_dense,
    "loop": prepare_loop,
    "grouped_mm": prepare_grouped_mm,
    "peft_mixed": prepare_peft_mixed,
}
