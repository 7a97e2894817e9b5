"""The layer baselines' backward under PyTorch's autograd: what a user training MoLE runs.

A `Graph` holds one baseline's forward, run once on leaf tensors that require a gradient (the
layer's `Layer.grad_inputs`); `backward()` is what is timed: `torch.autograd.grad(y, leaves, dy,
retain_graph=True)`, which computes the gradients without accumulating them into `.grad`.
The leaves are stored as a user of each formulation stores them, so that autograd is not charged
for a layout the user would not have: the banks `A [d_in, R]`, `B [R, d_out]` for `dense` (and
CoMoL's shared A and B in `loop`), one tensor per expert for `loop` (MixLoRA's and MoE-PEFT's
per-expert modules: no gradient is scattered into a whole bank per expert), `[E, d_in, r]` and
`[E, r, d_out]` stacks for `grouped_mm`. `gradients()` returns them in the banks' layouts, for the
check.

Floor bytes of the backward (`floor_elements`): x and dy read, dx written; A, B, the router
weight and the cores read once, the gradient of each trained one written once (FlyLoRA's frozen A
is read, not written); X-LoRA's given weights read and their gradient written. Intermediates (h,
the routing, which a backward either keeps from the forward or recomputes) are left out, as the
forward's floor leaves them out.
"""

import torch

from formulations import PREPARE

# How each baseline's user stores the experts' A and B (absent: as the banks).
STORAGE = {"loop": "experts", "grouped_mm": "stacked"}


def _leaf(v, grad):
    """A contiguous copy of `v`, detached, requiring a gradient if `grad`."""
    return v.detach().clone(memory_format=torch.contiguous_format).requires_grad_(grad)


class Graph:
    """Baseline `name`'s forward on `layer`'s inputs `t` as leaves (their own copies; y, the base
    output the forward adds into, cloned), kept for repeated backward calls against `dy`."""

    def __init__(self, name, layer, t, dy):
        self.layer, self.dy = layer, dy
        names = layer.grad_inputs()
        t = dict(t, y=t["y"].clone())
        self.storage = None if layer.comol else STORAGE.get(name)
        self.leaves = {}
        for n in names:
            if not (self.storage and n in ("A", "B")):
                t[n] = _leaf(t[n], True)
                self.leaves[n] = [t[n]]
        e, r, d_in, d_out = layer.experts, layer.rank, layer.d_in, layer.d_out
        train_a, train_b = "A" in names, "B" in names
        if self.storage == "experts":
            cols = [slice(i * r, (i + 1) * r) for i in range(e)]
            t["A_experts"] = [_leaf(t["A"][:, c], train_a) for c in cols]
            t["B_experts"] = [_leaf(t["B"][c], train_b) for c in cols]
            a, b = t["A_experts"], t["B_experts"]
        elif self.storage == "stacked":
            t["A3"] = _leaf(t["A"].view(d_in, e, r).permute(1, 0, 2), train_a)
            t["B3"] = _leaf(t["B"].view(e, r, d_out), train_b)
            a, b = [t["A3"]], [t["B3"]]
        if self.storage:
            self.leaves.update({n: ls for n, ls, train in (("A", a, train_a), ("B", b, train_b)) if train})
            self.leaves = {n: self.leaves[n] for n in names}  # keep grad_inputs' order
        self.flat = [leaf for ls in self.leaves.values() for leaf in ls]
        self.y = PREPARE[name](layer, t)()

    def backward(self):
        """The timed call: every leaf's gradient (None where the loss does not reach it)."""
        return torch.autograd.grad(self.y, self.flat, self.dy, retain_graph=True, allow_unused=True)

    def gradients(self):
        """The gradients by `Layer.grad_inputs` name, in the banks' layouts (zeros where the loss
        does not reach the input)."""
        grads = iter(self.backward())
        out = {}
        for n, leaves in self.leaves.items():
            gs = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)]
            out[n] = gs[0] if len(gs) == 1 else torch.cat(gs, dim=1 if n == "A" else 0)
        ly = self.layer
        if self.storage == "stacked":
            if "A" in out:
                out["A"] = out["A"].permute(1, 0, 2).reshape(ly.d_in, ly.total_rank)
            if "B" in out:
                out["B"] = out["B"].reshape(ly.total_rank, ly.d_out)
        return out


def random_dy(layer, tokens, dtype, device, seed):
    """A unit-scale output gradient [T, d_out] in the storage dtype."""
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(tokens, layer.d_out, generator=g, device=device).to(dtype)


def floor_elements(layer, tokens):
    """Elements the backward moves at least (module docstring)."""
    trained = layer.grad_inputs()
    frozen_a = 0 if "A" in trained else layer.d_in * layer.total_rank
    given = 2 * tokens * layer.experts if "weights" in trained else 0
    return tokens * (2 * layer.d_in + layer.d_out) + 2 * layer.weight_elements() - frozen_a + given
