"""mole for PyTorch: :class:`MoleFunction` (an autograd function over a layer's training forward
and backward) and :class:`MoleLinear` (an ``nn.Module`` that adds a MoLE bank and router to a
frozen ``nn.Linear``, as PEFT does to a projection). Importing this module imports torch.

Tensors go to the layer as :class:`mole.DeviceArray` (PyTorch's ``__cuda_array_interface__``
has no bfloat16), on ``torch.cuda.current_stream()``; workspaces and the saved routing are
allocated by PyTorch's caching allocator on the tensors' device."""

import math

import torch
from torch import nn

import mole
from mole import DeviceArray

# torch.uint8 for byte buffers (workspaces, the saved routing), which the layer takes as regions.
_DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.int32: "i32",
           torch.uint8: "u8"}


def device_array(t, name):
    """``t`` as the layer reads it: checked to be a CUDA tensor of a supported dtype; its byte
    strides go along, so a non-contiguous view is refused by the layer's checks."""
    if not isinstance(t, torch.Tensor):
        raise mole.LayoutError(f"`{name}`: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_cuda:
        raise mole.LayoutError(f"`{name}`: on {t.device}, not a CUDA device")
    if t.dtype not in _DTYPES:
        raise mole.DTypeError(f"`{name}`: dtype {t.dtype} is not one of float32, float16, bfloat16, int32, uint8")
    strides = tuple(s * t.element_size() for s in t.stride())
    return DeviceArray(t.data_ptr(), t.shape, _DTYPES[t.dtype], strides=strides)


def _arrays(**tensors):
    return {n: (None if t is None else device_array(t, n)) for n, t in tensors.items()}


def _bytes(nbytes, device):
    # At least one byte, so the address is a real allocation (the caching allocator aligns it).
    return torch.empty(max(int(nbytes), 1), dtype=torch.uint8, device=device)


def forward(layer, x, a, b, y, stream=None, **optional):
    """``y += delta`` in place (inference) on PyTorch tensors, with a workspace from PyTorch's
    allocator, on the current stream of ``x``'s device."""
    tokens = x.shape[0]
    ws = _bytes(layer.workspace_bytes(tokens), x.device)
    stream = torch.cuda.current_stream(x.device) if stream is None else stream
    layer.forward(**_arrays(x=x, a=a, b=b, y=y, **optional), workspace=device_array(ws, "workspace"),
                  stream=stream)


class MoleFunction(torch.autograd.Function):
    """``MoleFunction.apply(layer, x, a, b, y_base, router_weight, router_bias, cores,
    selection_bias)``: returns ``y_base + delta`` (a new tensor) through a training forward that
    saves the routing, and differentiates it with the layer's backward: gradients for ``x``,
    ``y_base`` (the identity), and those of ``a``, ``b``, ``router_weight``, ``router_bias`` and
    ``cores`` the layer trains (``None`` for frozen or absent ones; ``selection_bias`` only steers
    the selection, a constant: none). ``x`` is ``[T, d_in]``; with ``T = 0`` the result is a copy
    of ``y_base`` and the gradients are zeros."""

    @staticmethod
    def forward(ctx, layer, x, a, b, y_base, router_weight=None, router_bias=None, cores=None, selection_bias=None):
        x = x.contiguous()
        tokens, device = x.shape[0], x.device
        y = y_base.contiguous().clone()
        ctx.layer = layer
        if tokens == 0:
            # Nothing to launch (the layer has no backward of 0 tokens): only the shapes matter.
            ctx.save_for_backward(x, a, b, router_weight, router_bias, cores, None)
            return y
        saved = _bytes(layer.saved_bytes(tokens), device)
        ws = _bytes(layer.workspace_bytes(tokens), device)
        layer.forward(**_arrays(x=x, a=a, b=b, y=y, router_weight=router_weight, router_bias=router_bias,
                                cores=cores, selection_bias=selection_bias),
                      workspace=device_array(ws, "workspace"), saved=device_array(saved, "saved"),
                      stream=torch.cuda.current_stream(device))
        ctx.save_for_backward(x, a, b, router_weight, router_bias, cores, saved)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, a, b, router_weight, router_bias, cores, saved = ctx.saved_tensors
        layer = ctx.layer
        tokens, device = x.shape[0], x.device
        if tokens == 0:
            # No token: every gradient is an empty sum.
            zeros = [None if t is None or not need else torch.zeros_like(t)
                     for t, need in zip((x, a, b), ctx.needs_input_grad[1:4])]
            rest = [None if t is None or not need else torch.zeros_like(t)
                    for t, need in zip((router_weight, router_bias, cores), ctx.needs_input_grad[5:8])]
            return None, *zeros, dy, *rest, None
        dy = dy.contiguous()
        grads = {n: torch.empty(s, dtype=x.dtype, device=device) for n, s in layer.gradients(tokens).items()}
        ws = _bytes(layer.backward_workspace_bytes(tokens), device)
        layer.backward(**_arrays(dy=dy, x=x, a=a, b=b, router_weight=router_weight, router_bias=router_bias,
                                 cores=cores),
                       saved=device_array(saved, "saved"), workspace=device_array(ws, "workspace"),
                       grads={n: device_array(g, n) for n, g in grads.items()},
                       stream=torch.cuda.current_stream(device))
        g = grads.get
        return None, g("x"), g("a"), g("b"), dy, g("router_weight"), g("router_bias"), g("cores"), None


class MoleLinear(nn.Module):
    """A frozen ``base`` linear plus a MoLE layer on its input: ``base(x) + delta(x)``, with the
    LoRA bank ``lora_A [d_in, R]`` (random), ``lora_B [R, d_out]`` (zeros: the module starts
    as the base) and the router (and CoMoL's cores) as parameters; the ``selection_bias`` of
    SMoRA and FlyLoRA is a buffer of zeros ``[E]`` in the layer's dtype (a balancing rule may
    update it in place between steps; no gradient flows to it). Build it with
    :meth:`from_linear`; the layer runs on the base's CUDA device in its dtype. Methods whose
    gating takes caller logits, given weights or adapter ids are not wrapped here (call
    :class:`mole.Layer` directly)."""

    def __init__(self, base, spec, dtype=None):
        super().__init__()
        weight = base.weight
        if not weight.is_cuda:
            raise mole.DeviceError("MoleLinear: the base linear must be on a CUDA device (move it first)")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        dtype = weight.dtype if dtype is None else dtype
        self.layer = mole.Layer(spec, _DTYPES.get(dtype, str(dtype)), device=weight.device.index or 0)
        shapes = self.layer.tensors(1)
        unsupported = {"logits", "weights", "adapter_ids"} & set(shapes)
        if unsupported:
            raise mole.SpecError(f"MoleLinear: this spec takes {sorted(unsupported)}: call mole.Layer directly")
        trained = self.layer.gradients(1)
        kw = dict(device=weight.device, dtype=dtype)
        d_in, rank = shapes["a"]
        gen = torch.Generator(device="cpu").manual_seed(0)

        def param(name, init):
            if name not in shapes:
                return None
            p = nn.Parameter(init(shapes[name]).to(**kw), requires_grad=name in trained)
            return p

        self.lora_A = param("a", lambda s: torch.randn(s, generator=gen) / math.sqrt(d_in))
        self.lora_B = param("b", torch.zeros)
        self.router_weight = param("router_weight", lambda s: torch.randn(s, generator=gen) / math.sqrt(s[0]))
        self.router_bias = param("router_bias", torch.zeros)
        self.cores = param("cores", lambda s: torch.eye(s[1]).expand(s).clone())
        bias = shapes.get("selection_bias")
        self.register_buffer("selection_bias", None if bias is None else torch.zeros(bias, **kw))

    @classmethod
    def from_linear(cls, linear, method="mix-lora-per-linear", experts=8, rank=16, k=2, alpha=None, dtype=None):
        """Wraps ``linear`` with the method preset ``method`` (``mole.presets()``) of ``experts``
        experts of rank ``rank``, ``k`` per token, LoRA ``alpha`` (default ``2 * rank``)."""
        spec = mole.spec(method, d_in=linear.in_features, d_out=linear.out_features, experts=experts, rank=rank,
                         k=k, alpha=2.0 * rank if alpha is None else alpha)
        return cls(linear, spec, dtype=dtype)

    def forward(self, x):
        lead = x.shape[:-1]
        y = self.base(x).reshape(-1, self.base.out_features)
        x2 = x.reshape(-1, self.base.in_features)
        out = MoleFunction.apply(self.layer, x2, self.lora_A, self.lora_B, y, self.router_weight, self.router_bias,
                                 self.cores, self.selection_bias)
        return out.reshape(*lead, self.base.out_features)
