"""The crate's method presets as layer specs (the JSON `mole eval` reads) and random inputs for them.

`spec()` mirrors `Method::spec` in `src/model/method.rs` with the alpha the crate's `run`, `bench
layer` and `autotune` use (alpha = 2 * rank, so scale = alpha / rank = 2 for most methods,
alpha / k for SMoRA, alpha / E for FlyLoRA). `check.spec_problems` asserts on every run that the
reference's routing under this JSON has the documented shape of each method (slots per token,
weight sums), so a spec that drifted from the method's documentation fails the check.
"""

from dataclasses import dataclass

import torch

# (method, experts, rank, k): the crate's STANDARD_METHODS (src/layer/mod.rs) plus adapter serving.
STANDARD = [
    ("mix-lora-per-linear", 8, 16, 2),
    ("mix-lora-dynamic-per-linear", 8, 16, 2),
    ("dyn-mole", 6, 24, 2),
    ("llava-mole-sparse", 8, 16, 1),
    ("llava-mole-dense", 8, 16, 2),
    ("lora-moe", 8, 16, 2),
    ("x-lora", 8, 16, 8),
    ("smora", 64, 1, 8),
    ("fly-lora", 64, 1, 8),
    ("comol", 8, 16, 2),
    ("flex-olmo", 8, 16, 2),
    ("adapter-serving", 8, 16, 1),
]

X_ROUTER = {"type": "x", "bias": False}


def _topk(k, weights):
    return {"type": "softmax_topk", "k": k, "temperature": 1.0, "weights": weights}


def _routed(router, rule):
    return {"type": "routed", "router": router, "rule": rule}


@dataclass(frozen=True)
class Layer:
    """One method at one shape: `experts` are CoMoL's cores, `rank` its shared rank."""

    method: str
    d_in: int
    d_out: int
    experts: int
    rank: int
    k: int

    @property
    def alpha(self):
        return 2.0 * self.rank

    @property
    def comol(self):
        return self.method == "comol"

    @property
    def total_rank(self):
        """R: columns of A (CoMoL keeps one shared bank expert of rank r)."""
        return self.rank if self.comol else self.experts * self.rank

    def spec(self):
        """The layer spec of `Method::spec`, as `mole eval` reads it."""
        m, e, k = self.method, self.experts, self.k
        per_rank = self.alpha / self.rank
        scale, mix, ranks = per_rank, {"type": "expert_scale"}, {"experts": e, "rank": self.rank}
        if m in ("mix-lora-per-linear", "meteo-ra"):
            gating = _routed(X_ROUTER, _topk(k, "renormalized"))
        elif m == "flex-olmo":
            gating = _routed(X_ROUTER, _topk(k, "softmax"))
        elif m == "mix-lora-dynamic-per-linear":
            gating = _routed(X_ROUTER, {"type": "top_p", "p": 0.8, "temperature": 1.0})
        elif m == "dyn-mole":
            rule = {"type": "dynmole", "q": 1.1, "top_p": 0.75, "keep_top_k": 2, "entropy_threshold": 0.9}
            gating = _routed(X_ROUTER, rule)
        elif m == "llava-mole-sparse":
            gating = _routed(X_ROUTER, _topk(1, "unit"))
        elif m in ("llava-mole-dense", "lora-moe", "hydra-lora"):
            gating = _routed(X_ROUTER, {"type": "dense_softmax", "temperature": 1.0})
        elif m == "x-lora":
            gating = {"type": "given", "top_k": k if k < e else None, "softmax_topk": False}
        elif m == "smora":
            gating = _routed(X_ROUTER, {"type": "sigmoid_topk", "k": k, "bias": True})
            scale = self.alpha / k
        elif m == "fly-lora":
            gating = _routed({"type": "low_rank"}, {"type": "magnitude_topk", "k": k, "bias": True})
            scale = self.alpha / e
        elif m == "comol":
            gating = _routed({"type": "h", "bias": False}, _topk(k, "renormalized"))
            ranks, mix = {"experts": 1, "rank": self.rank}, {"type": "core_merge", "cores": e}
        elif m == "adapter-serving":
            gating = {"type": "adapter_ids"}
        else:
            raise ValueError(f"unknown method {m!r}")
        spec = {"d_in": self.d_in, "d_out": self.d_out, "ranks": ranks, "scale": scale, "gating": gating, "mix": mix}
        if m == "fly-lora":
            spec["training"] = {"frozen": ["a"]}  # FlyLoRA's A is a fixed random projection
        return spec

    def rule(self):
        """The routing rule of a routed gating, else None."""
        g = self.spec()["gating"]
        return g["rule"] if g["type"] == "routed" else None

    def router(self):
        g = self.spec()["gating"]
        return g["router"]["type"] if g["type"] == "routed" else None

    def grad_inputs(self):
        """The inputs that get a gradient, named as `mole eval` names them after `grad.`: x, A
        unless the spec freezes it, B, the weight of an x or h router, CoMoL's cores, the given
        weights (the selection bias steers selection only; adapter ids are integers)."""
        names = ["x"] + [p for p in ("A", "B") if p.lower() not in self.spec().get("training", {}).get("frozen", [])]
        names += ["router_weight"] if self.router() in ("x", "h") else []
        names += ["cores"] if self.comol else []
        return names + (["weights"] if self.method == "x-lora" else [])

    def weight_elements(self):
        """Elements of A, B, the router weight and the cores: what a forward reads once."""
        r, e = self.total_rank, self.experts
        router = {"x": self.d_in * e, "h": r * e}.get(self.router(), 0)
        cores = e * r * r if self.comol else 0
        return r * (self.d_in + self.d_out) + router + cores


def _b_std(layer):
    w2 = layer.k if layer.method in ("smora", "fly-lora") else 1.0 / layer.k
    return 1.0 / (layer.spec()["scale"] * (layer.rank * w2) ** 0.5)


def inputs(layer, tokens, dtype, device, seed):
    """Random inputs named as `mole eval` reads them, in the storage dtype: unit-scale x and base
    output y, A and the router weights scaled by 1/sqrt(fan-in) (h and the router logits of unit
    scale), B scaled so that the delta's rms is about 1, as y's (so a wrong delta shows in y's
    error): var(delta) = scale^2 * var(B) * r * sum_e w_e^2, with sum_e w_e^2 about k where each
    selected weight is about 1 (SMoRA, FlyLoRA) and about 1 / k where the weights sum to 1."""
    g = torch.Generator(device=device).manual_seed(seed)
    r, e = layer.total_rank, layer.experts

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, device=device) * std).to(dtype)

    t = {
        "x": randn(tokens, layer.d_in),
        "y": randn(tokens, layer.d_out),
        "A": randn(layer.d_in, r, std=layer.d_in**-0.5),
        "B": randn(r, layer.d_out, std=_b_std(layer)),
    }
    router = layer.router()
    if router == "x":
        t["router_weight"] = randn(layer.d_in, e, std=layer.d_in**-0.5)
    elif router == "h":
        t["router_weight"] = randn(r, e, std=r**-0.5)
    rule = layer.rule()
    if rule is not None and rule.get("bias"):
        # Small against sigmoid gates in (0, 1): the bias steers selection without dominating it.
        t["selection_bias"] = randn(e, std=0.05)
    if layer.method == "x-lora":
        t["weights"] = torch.softmax(torch.randn(tokens, e, generator=g, device=device), dim=-1).to(dtype)
    if layer.method == "adapter-serving":
        # -1 (no adapter) for about one token in E + 1.
        t["adapter_ids"] = torch.randint(-1, e, (tokens,), generator=g, device=device, dtype=torch.int32)
    if layer.comol:
        t["cores"] = randn(e, r, r, std=r**-0.5)
    return t


# ---------------------------------------------------------------------------------------------
# The FFN-expert block (MixLoRA; `FfnSpec` in src/model/ffn.rs).

# (preset, experts, rank, k): MixLoRA's block, LoRA of rank r on gate, up and down of each expert.
FFN_STANDARD = [("mix-lora", 8, 16, 2)]


@dataclass(frozen=True)
class FfnBlock:
    """One FFN-expert block: expert e is the whole gated FFN with its own LoRA (rank `rank`,
    scale 2 = alpha / r with alpha = 2 r) on the gate, up and down projections of shared base
    weights; the x router picks `k` of `experts`, softmax top-k renormalised (MixLoRA)."""

    method: str
    d: int
    f: int
    activation: str
    experts: int
    rank: int
    k: int

    SCALE = 2.0

    @property
    def d_in(self):
        """The router's input width (the near-tie rule reads it as the layer's)."""
        return self.d

    @property
    def total_rank(self):
        """R: columns of each projection's A bank."""
        return self.experts * self.rank

    def router(self):
        return "x"

    def rule(self):
        return self.spec()["gating"]["rule"]

    def spec(self):
        """The FfnSpec JSON (`mole eval` reads it)."""
        if self.method != "mix-lora":
            raise ValueError(f"unknown FFN block preset {self.method!r}")
        lora = {"ranks": {"experts": self.experts, "rank": self.rank}, "scale": self.SCALE}
        return {"d": self.d, "f": self.f, "activation": self.activation, "experts": self.experts,
                "gating": _routed(X_ROUTER, _topk(self.k, "renormalized")),
                "gate": dict(lora), "up": dict(lora), "down": dict(lora)}

    def lora_elements(self, experts_used):
        """Elements of the gate, up and down LoRA banks of `experts_used` experts."""
        return experts_used * 3 * self.rank * (self.d + self.f)

    def floor_elements(self, tokens, experts_used):
        """Elements a forward must move at least: x read, y written, the three base weights and the
        used experts' LoRA banks read once, the base gate and up outputs and a_mix each written and
        read once (the router weight, d * E, is left out: negligible)."""
        t, d, f = tokens, self.d, self.f
        return 2 * t * d + 3 * d * f + self.lora_elements(experts_used) + 6 * t * f

    def useful_flops(self, tokens):
        """2 T (3 d f) for the base projections, once per token, plus each routed (token, slot)'s
        LoRA shrinks and expands on gate, up and down: 6 r (d + f) per slot (router left out)."""
        return 2 * tokens * 3 * self.d * self.f + tokens * self.k * 6 * self.rank * (self.d + self.f)


def ffn_inputs(block, tokens, dtype, device, seed):
    """Random inputs of the block named as `mole eval` reads them, in the storage dtype: unit-scale
    x; base and A weights scaled by 1/sqrt(fan-in), so g, u, the LoRA activations and the router
    logits are of unit scale; each B scaled by 1 / (scale sqrt(r)), so each projection's LoRA delta
    is of the order of its base output (an error in any expert's delta shows in y)."""
    g = torch.Generator(device=device).manual_seed(seed)
    d, f, e, big_r = block.d, block.f, block.experts, block.total_rank

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, device=device) * std).to(dtype)

    b_std = 1.0 / (block.SCALE * block.rank**0.5)
    return {
        "x": randn(tokens, d),
        "router_weight": randn(d, e, std=d**-0.5),
        "base.gate": randn(d, f, std=d**-0.5),
        "base.up": randn(d, f, std=d**-0.5),
        "base.down": randn(f, d, std=f**-0.5),
        "gate.A": randn(d, big_r, std=d**-0.5),
        "gate.B": randn(big_r, f, std=b_std),
        "up.A": randn(d, big_r, std=d**-0.5),
        "up.B": randn(big_r, f, std=b_std),
        "down.A": randn(f, big_r, std=f**-0.5),
        "down.B": randn(big_r, d, std=b_std),
    }
