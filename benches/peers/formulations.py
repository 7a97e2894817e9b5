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

The backward (`backward.py`) differentiates `dense`, `loop` and `grouped_mm` as they are, with the
experts' weights of `loop` and `grouped_mm` given as the per-expert tensors their users hold
(`expert_weights`; `A3`, `B3`). `grouped_mm_backward_unsupported` and
`peft_mixed_backward_unsupported` probe whether autograd takes `torch._grouped_mm` and whether PEFT
trains its mixed batch (it refuses `adapter_names` in training mode).

The FFN-expert block (MixLoRA's; `methods.FfnBlock`): `prepare(block, t) -> run`, `run()` returns y
(the block has no base output input). Expert e is the whole gated FFN with its LoRA on gate, up
and down over shared base weights; `t` holds `x`, `router_weight`, `base.gate`, `base.up`,
`base.down` and the banks `gate.A`, `gate.B`, `up.A`, `up.B`, `down.A`, `down.B`.
- `ffn_loop`: what MoE-PEFT runs for MixLoRA (`MixtralSparseMoe.forward` with
  `LlamaMLP._mixlora_forward`), in its precisions: router and LoRA in f32, base projections in the
  storage dtype, gate and up once per token, then per expert its tokens' gate/up deltas, act,
  product, the expert's whole down projection (base + LoRA) on its rows, weighted `index_add_`
  into an f32 sum.
- `ffn_trick`: the linearity trick a user could write, in the storage dtype: one base gate|up
  GEMM and one shrink of both A banks per token; per expert the gate/up expands on its rows, act,
  product, `a_mix += w a`, the down shrink `w s (a A_d)` into its rank columns; then a single GEMM
  `[a_mix | h_d] @ [W_down; B_down]` (the base down projection once, on a_mix).
- `ffn_dense`: every expert on every token (batched matmuls over [E, T, f]), masked by the gate
  matrix, then the same single down GEMM.
"""

import torch
import torch.nn.functional as F

BASELINES = ("dense", "loop", "grouped_mm", "peft_mixed")
FFN_BASELINES = ("ffn_loop", "ffn_trick", "ffn_dense")


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
            top_w = _renormalize(top_w)
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
        return top_i, (rule["k"] * _renormalize(top_s)).to(dtype)
    if kind == "magnitude_topk":
        top_i = (z + bias).abs().topk(rule["k"], dim=-1).indices
        return top_i, torch.ones(top_i.shape, dtype=dtype, device=x.device)
    raise ValueError(f"unknown routing rule {kind!r}")


def _renormalize(w):
    """Each token's weights over their sum (MixLoRA's top-k, SMoRA's sigmoid gates)."""
    return w / w.sum(dim=-1, keepdim=True)


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


def expert_weights(layer, t):
    """Each expert's (A_e [d_in, r], B_e [r, d_out]): the separate tensors of a user's per-expert
    modules where `t` holds them (`A_experts`, `B_experts`: the backward's leaves, so that no
    gradient is scattered into a whole bank), else column and row slices of the banks (views)."""
    if "A_experts" in t:
        return list(zip(t["A_experts"], t["B_experts"]))
    r = layer.rank
    return [(t["A"][:, e * r:(e + 1) * r], t["B"][e * r:(e + 1) * r]) for e in range(layer.experts)]


def prepare_loop(layer, t):
    x, y, A, B, scale = t["x"], t["y"], t["A"], t["B"], _scale(layer)
    experts = None if layer.comol else expert_weights(layer, t)

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
        for e, (a_e, b_e) in enumerate(experts):
            tok, slot = torch.where(ids == e)
            out = (x.index_select(0, tok) @ a_e) @ b_e
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


def grouped_mm_backward_unsupported(device, dtype):
    """Why autograd does not differentiate `torch._grouped_mm` here, or None: the forward probe,
    then the gradients of its known problem (ones; groups of 8, 0 and 16 rows; dout ones), which
    are 16 for every element of a, and 8, 0 and 16 for the elements of b's three groups."""
    reason = grouped_mm_unsupported(device, dtype)
    if reason:
        return reason
    try:
        a = torch.ones(24, 32, dtype=dtype, device=device, requires_grad=True)
        b = torch.ones(3, 32, 16, dtype=dtype, device=device, requires_grad=True)
        offs = torch.tensor([8, 8, 24], dtype=torch.int32, device=device)
        out = torch._grouped_mm(a, b, offs=offs)
        da, db = torch.autograd.grad(out, (a, b), torch.ones_like(out))
        want = torch.tensor([8.0, 0.0, 16.0], device=device).view(3, 1, 1).expand(3, 32, 16)
        if not (bool((da.float() == 16.0).all()) and torch.equal(db.float(), want)):
            return "autograd of torch._grouped_mm gave wrong gradients on a probe"
    except Exception as e:  # any refusal (no derivative, architecture, dtype) is a reason to skip
        return f"autograd of torch._grouped_mm on {device} {dtype}: {str(e).splitlines()[0][:160]}"
    return None


def peft_mixed_backward_unsupported(device, dtype):
    """Why PEFT's mixed batch cannot be trained here, or None: a LoraModel of two adapters on a
    Linear, in training mode, called with `adapter_names` (PEFT refuses it: the mixed batch is an
    inference feature)."""
    try:
        from peft import LoraConfig, get_peft_model
    except Exception as e:
        return f"peft is not importable: {str(e).splitlines()[0][:120]}"
    try:
        model = _Wrapper(torch.nn.Linear(8, 8).to(device=device, dtype=dtype))
        config = LoraConfig(r=2, lora_alpha=4, target_modules=["proj"], lora_dropout=0.0)
        model = get_peft_model(model, config, adapter_name="a0")
        model.add_adapter("a1", config)
        model.train()
        model(torch.ones(2, 8, device=device, dtype=dtype), adapter_names=["a0", "a1"]).sum().backward()
    except Exception as e:
        return f"PEFT refuses a mixed batch in training mode: {str(e).splitlines()[0][:160]}"
    # Were PEFT to accept it, its gradients would land in its own per-adapter parameters, which
    # the check does not map back to A and B.
    return "PEFT's mixed batch trains its own per-adapter parameters (not mapped to A and B here)"


def prepare_grouped_mm(layer, t):
    x, y, e, r = t["x"], t["y"], layer.experts, layer.rank
    if (r * x.element_size()) % 16:
        raise Skip(f"rank {r}: torch._grouped_mm needs 16-byte aligned rows ({r * x.element_size()} B)")
    # The weights stored per expert, [E, d_in, r] and [E, r, d_out]: a layout choice made once
    # (given as `A3`, `B3` where they are the backward's leaves).
    A3 = t["A3"] if "A3" in t else t["A"].view(layer.d_in, e, r).permute(1, 0, 2).contiguous()
    B3 = t["B3"] if "B3" in t else t["B"].view(e, r, layer.d_out)
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


# ---------------------------------------------------------------------------------------------
# The FFN-expert block.

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu}  # F.gelu: exact (erf), as the crate's


def _bank(t, proj, block, e):
    """Expert e's (A [n_in, r], B [r, n_out]) of one projection's concatenated bank."""
    cols = slice(e * block.rank, (e + 1) * block.rank)
    return t[f"{proj}.A"][:, cols], t[f"{proj}.B"][cols]


def _scales(block):
    spec = block.spec()
    return spec["gate"]["scale"], spec["up"]["scale"], spec["down"]["scale"]


def prepare_ffn_loop(block, t):
    """MoE-PEFT's MixLoRA forward, structure and precisions as in TUDB-Labs/MoE-PEFT:
    `moe_peft/adapters/mixlora/model.py` (`MixtralSparseMoe.forward`: f32 router, softmax in f32,
    top-k, renormalise, one-hot expert mask, per-expert states, weighted `index_add_` into an f32
    sum, cast back), `moe_peft/models/modeling_llama.py` (`LlamaMLP._mixlora_forward`: base gate and
    up once per token, kept in f32; per expert its rows cast back, LoRA delta added, act, product,
    the down projection base + LoRA on the expert's rows) and `moe_peft/common/lora_linear.py`
    (`Lora.forward`: `residual + (lora_b(lora_a(x.float())) * scaling).to(residual.dtype)`, f32
    LoRA weights). Inference: dropout is the identity, no jitter noise. Departures: the base
    weights are used in the given input-major layout (`x @ W`, the same GEMM as `nn.Linear`'s
    `x @ W.T`), and the profiler's `print` is left out."""
    x, e, dtype = t["x"], block.experts, t["x"].dtype
    act = ACTIVATIONS[block.activation]
    scaling = dict(zip(("gate", "up", "down"), _scales(block)))
    w_gate, w_up, w_down = t["base.gate"], t["base.up"], t["base.down"]
    # Held in f32 as MoE-PEFT holds them (its gate_ and lora_a_ / lora_b_ are f32 nn.Linear
    # weights, [out, in]): converted once, as loading the adapter does.
    router = t["router_weight"].float().T.contiguous()
    loras = {p: [tuple(m.float().T.contiguous() for m in _bank(t, p, block, i)) for i in range(e)]
             for p in ("gate", "up", "down")}

    def lora(proj, i, residual, data):
        lora_a, lora_b = loras[proj][i]
        delta = F.linear(F.linear(data.to(torch.float32), lora_a), lora_b) * scaling[proj]
        return residual + delta.to(residual.dtype)

    def run():
        hidden = x.view(-1, block.d).to(torch.float32)
        router_logits = F.linear(hidden, router)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float32)
        routing_weights, selected = torch.topk(routing_weights, block.k, dim=-1)
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        final = torch.zeros((hidden.shape[0], block.d), dtype=torch.float32, device=x.device)
        expert_mask = F.one_hot(selected, num_classes=e).permute(2, 1, 0)
        common_gate = (hidden.to(dtype) @ w_gate).to(hidden.dtype)
        common_up = (hidden.to(dtype) @ w_up).to(hidden.dtype)
        states = []
        for i in range(e):
            _, top_x = torch.where(expert_mask[i])
            data = hidden[top_x].to(dtype)
            gate = lora("gate", i, common_gate[top_x].to(dtype), data)
            up = lora("up", i, common_up[top_x].to(dtype), data)
            a = act(gate) * up
            states.append(lora("down", i, a @ w_down, a))
        for i in range(e):
            idx, top_x = torch.where(expert_mask[i])
            final.index_add_(0, top_x, (states[i] * routing_weights[top_x, idx, None]).to(torch.float32))
        return final.to(dtype)

    return run


def _down_stacked(block, t):
    """[W_down; B_down] [f + R, d]: the base down projection and the down expand as one GEMM
    over [a_mix | h_d] (a layout choice made once)."""
    return torch.cat([t["base.down"], t["down.B"]], dim=0)


def prepare_ffn_trick(block, t):
    x, e, r, f, big_r = t["x"], block.experts, block.rank, block.f, block.total_rank
    s_g, s_u, s_d = _scales(block)
    act = ACTIVATIONS[block.activation]
    # Layout choices made once: gate and up side by side (one GEMM, a fused gate_up projection),
    # both A banks side by side (one shrink), the down weights stacked.
    w_gu = torch.cat([t["base.gate"], t["base.up"]], dim=1)
    a_gu = torch.cat([t["gate.A"], t["up.A"]], dim=1)
    b_g, b_u, a_d = t["gate.B"], t["up.B"], t["down.A"]
    down = _down_stacked(block, t)

    def run():
        ids, w = route(block, t)
        gu = x @ w_gu
        h = x @ a_gu
        # [a_mix | h_d]: a_mix = sum_e w_e a_e, h_d's expert columns w_e s_d (a_e A_d,e).
        mixed = torch.zeros(x.shape[0], f + big_r, dtype=x.dtype, device=x.device)
        a_mix = mixed[:, :f]
        for i in range(e):
            tok, slot = torch.where(ids == i)
            cols = slice(i * r, (i + 1) * r)
            hx = h[tok]
            g = torch.addmm(gu[tok, :f], hx[:, cols], b_g[cols], alpha=s_g)
            u = torch.addmm(gu[tok, f:], hx[:, big_r + i * r:big_r + (i + 1) * r], b_u[cols], alpha=s_u)
            a = act(g) * u
            we = w[tok, slot, None]
            a_mix.index_add_(0, tok, a * we)
            mixed[tok, f + i * r:f + (i + 1) * r] = (a @ a_d[:, cols]) * (we * s_d)
        return mixed @ down

    return run


def prepare_ffn_dense(block, t):
    x, e, r, f, big_r = t["x"], block.experts, block.rank, block.f, block.total_rank
    s_g, s_u, s_d = _scales(block)
    act = ACTIVATIONS[block.activation]
    w_gu = torch.cat([t["base.gate"], t["base.up"]], dim=1)
    a_gu = torch.cat([t["gate.A"], t["up.A"]], dim=1)
    # Per-expert stacks (layout made once): B [E, r, f], A_d [E, f, r].
    b_g, b_u = t["gate.B"].view(e, r, f), t["up.B"].view(e, r, f)
    a_d = t["down.A"].view(f, e, r).permute(1, 0, 2).contiguous()
    down = _down_stacked(block, t)

    def run():
        tokens = x.shape[0]
        gates = gate_matrix(*route(block, t), e).T.unsqueeze(2)  # [E, T, 1], 0 where not routed
        gu = x @ w_gu
        h = (x @ a_gu).view(tokens, 2, e, r).permute(1, 2, 0, 3)  # [gate|up, E, T, r]
        g = torch.baddbmm(gu[:, :f].unsqueeze(0), h[0], b_g, alpha=s_g)  # [E, T, f]
        u = torch.baddbmm(gu[:, f:].unsqueeze(0), h[1], b_u, alpha=s_u)
        a = act(g) * u * gates
        h_d = torch.bmm(a, a_d) * s_d  # [E, T, r]
        return torch.cat([a.sum(0), h_d.permute(1, 0, 2).reshape(tokens, big_r)], dim=1) @ down

    return run


FFN_PREPARE = {"ffn_loop": prepare_ffn_loop, "ffn_trick": prepare_ffn_trick, "ffn_dense": prepare_ffn_dense}
