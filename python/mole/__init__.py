"""mole: sparse Mixture-of-LoRA-Experts layers on CUDA, from Python.

``Layer`` runs a layer's forward and backward on the caller's CUDA arrays (any library exposing
``__cuda_array_interface__``: PyTorch, CuPy, ...) on the caller's stream; ``reference`` and
``reference_backward`` compute the same layer in f64 on NumPy arrays, without a GPU;
``mole.torch`` wraps the layer for PyTorch (autograd function and ``nn.Module``).

Every error is a :class:`mole.MoleError`; bad input is also a ``ValueError`` (see ``mole.errors``).
"""

import json

from . import _native
from ._arrays import DeviceArray, bind, check_disjoint, dtype_name, interface, nonnegative, region, stream_handle
from .errors import (
    CompileError,
    DeviceError,
    DTypeError,
    InvalidValueError,
    LayoutError,
    MoleError,
    ShapeError,
    SpecError,
)

# The optional inputs a forward may take, after x, A, B, y (which the spec's tensor contract
# requires of every layer).
OPTIONAL_INPUTS = ("router_weight", "router_bias", "logits", "weights", "adapter_ids", "selection_bias", "cores")
# Inputs the backward reads besides the forward's own (it takes no y, adapter ids or selection bias).
BACKWARD_INPUTS = ("x", "a", "b", "router_weight", "router_bias", "logits", "weights", "cores")


def presets():
    """Every method preset's name (``"mix-lora-per-linear"``, ``"comol"``, ...)."""
    return list(_native.presets())


def spec(spec, *, d_in=None, d_out=None, experts=None, rank=None, k=2, alpha=None):
    """A validated layer spec as a dict, from a dict, a JSON string, or a method preset's name
    with its shape (``d_in``, ``d_out``, ``experts``, ``rank``; ``k`` experts per token for the
    top-k presets; ``alpha`` the LoRA alpha, by default ``rank``, i.e. a scale of 1)."""
    shape = {"d_in": d_in, "d_out": d_out, "experts": experts, "rank": rank}
    if isinstance(spec, dict):
        text = json.dumps(spec)
    elif isinstance(spec, str) and spec.lstrip().startswith("{"):
        text = spec
    elif isinstance(spec, str):
        missing = [n for n, v in shape.items() if v is None]
        if missing:
            raise SpecError(f"preset {spec!r} needs its shape: {', '.join(missing)}")
        text = _native.preset_json(spec, d_in, d_out, experts, rank, k, float(rank if alpha is None else alpha))
        return json.loads(text)
    else:
        raise SpecError(f"a spec is a dict, a JSON string or a preset name, not {type(spec).__name__}")
    if any(v is not None for v in shape.values()) or alpha is not None:
        raise SpecError("shape keywords (d_in, d_out, experts, rank, alpha) apply to presets only")
    return json.loads(_native.spec_json(text))


def plan_sizes(spec, tokens, sm_count, dtype="bf16", **shape):
    """The bytes of a layer's device buffers over ``tokens`` tokens, without a GPU:
    ``{"workspace_bytes", "saved_bytes", "backward_workspace_bytes"}``, what ``Layer(spec, dtype)``
    on a GPU with ``sm_count`` SMs gives (the strategy, and so the workspace, depends on both
    counts). ``spec`` as :func:`spec` takes it."""
    sizes = _native.plan_sizes(_spec_text(spec, shape), dtype_name(dtype), nonnegative("sm_count", sm_count, 32),
                               nonnegative("tokens", tokens))
    return dict(zip(("workspace_bytes", "saved_bytes", "backward_workspace_bytes"), sizes))


def _spec_text(s, shape):
    return json.dumps(spec(s, **shape))


class Layer:
    """One MoLE layer compiled for a GPU: ``Layer(spec, dtype="bf16", device=0, **shape)``, with
    ``spec`` as :func:`spec` takes it. Kernels compile on the first call of each token count
    (``prepare`` does it ahead, e.g. before a CUDA-graph capture).

    Calls take the caller's arrays (C-contiguous, of the layer's dtype; ``adapter_ids`` int32) and
    launch on the caller's stream: the ``stream`` argument (an int ``CUstream``, a
    ``torch.cuda.Stream`` or a CuPy stream), else the ``stream`` entry of ``x``'s
    ``__cuda_array_interface__`` (version 3, as CuPy fills it), else the current stream of ``x``'s
    library (``torch.cuda.current_stream(x.device)`` for a PyTorch tensor, whose interface has no
    stream entry; ``cupy.cuda.get_current_stream()`` for a CuPy array), else the legacy default
    stream. Nothing is allocated, copied or synchronised; every shape, dtype, layout and device is
    checked before any launch, and no buffer the call writes may overlap another it uses."""

    def __init__(self, spec, dtype="bf16", device=0, **shape):
        self.spec = json.loads(_spec_text(spec, shape))
        self.dtype = dtype_name(dtype)
        self._native = _native.NativeLayer(json.dumps(self.spec), self.dtype, nonnegative("device", device))

    @property
    def device(self):
        """The GPU's ordinal."""
        return self._native.device

    def workspace_bytes(self, tokens):
        """Bytes of the workspace a forward over ``tokens`` tokens needs (shareable by layers)."""
        return self._native.workspace_bytes(nonnegative("tokens", tokens))

    def saved_bytes(self, tokens):
        """Bytes of the routing a training forward saves for its backward (one buffer per call)."""
        return self._native.saved_bytes(nonnegative("tokens", tokens))

    def backward_workspace_bytes(self, tokens):
        """Bytes of the workspace a backward over ``tokens`` tokens needs."""
        return self._native.backward_workspace_bytes(nonnegative("tokens", tokens))

    def prepare(self, tokens, backward=False):
        """Compiles and loads the kernels of ``tokens``-token calls (with ``backward``, the
        training forward's and the backward's too): afterwards those calls compile nothing."""
        self._native.prepare(nonnegative("tokens", tokens), bool(backward))

    def tensors(self, tokens):
        """The inputs a forward takes: ``{name: shape}``."""
        return {n: tuple(s) for n, s, _ in self._native.tensors(nonnegative("tokens", tokens))}

    def gradients(self, tokens):
        """The gradients a backward writes: ``{name: shape}`` (frozen parameters have none)."""
        return {n: tuple(s) for n, s in self._native.gradients(nonnegative("tokens", tokens))}

    def forward(self, x, a, b, y, workspace, router_weight=None, router_bias=None, logits=None, weights=None,
                adapter_ids=None, selection_bias=None, cores=None, saved=None, stream=None):
        """``y += delta`` in place, over ``T = x.shape[0]`` tokens. ``saved`` (a device buffer of
        ``saved_bytes(T)`` bytes) makes it a training forward that keeps the routing for
        :meth:`backward`. ``stream`` as the class says: PyTorch tensors and CuPy arrays launch on
        their library's current stream by default."""
        tokens = _tokens(x)
        given = {"x": x, "a": a, "b": b, "y": y, "router_weight": router_weight, "router_bias": router_bias,
                 "logits": logits, "weights": weights, "adapter_ids": adapter_ids,
                 "selection_bias": selection_bias, "cores": cores}
        arrays = bind(self._native.tensors(tokens), self.dtype, given, writable={"y"})
        if tokens == 0:
            return
        need = self.workspace_bytes(tokens)
        ws = region("workspace", workspace, need)
        written = [("y", arrays["y"].ptr, arrays["y"].nbytes), ("workspace", ws[0], need)]
        kept = None
        if saved is not None:
            saved_need = self.saved_bytes(tokens)
            kept = region("saved", saved, saved_need)
            written.append(("saved", kept[0], saved_need))
        check_disjoint(written, [(n, d.ptr, d.nbytes) for n, d in arrays.items() if n != "y"])
        handle = stream_handle(stream, arrays["x"])
        self._native.forward(handle, tokens, {n: d.ptr for n, d in arrays.items()}, ws, kept)

    def backward(self, dy, x, a, b, saved, workspace, grads, router_weight=None, router_bias=None, logits=None,
                 weights=None, cores=None, stream=None):
        """The gradients of ``L = sum(dy * y) + aux_loss`` after a training forward of the same
        inputs that wrote ``saved``: ``grads`` maps each name of :meth:`gradients` to an output
        array of its shape, overwritten (not accumulated). The selection is a constant."""
        tokens = _tokens(x)
        if tokens == 0:
            raise ShapeError("backward of 0 tokens: there is nothing to differentiate")
        given = {"x": x, "a": a, "b": b, "router_weight": router_weight, "router_bias": router_bias,
                 "logits": logits, "weights": weights, "cores": cores}
        contract = [c for c in self._native.tensors(tokens) if c[0] in BACKWARD_INPUTS]
        inputs = bind(contract, self.dtype, given, writable=set())
        inputs.update(bind([("dy", (tokens, self.spec["d_out"]), False)], self.dtype, {"dy": dy}, set()))
        grad_contract = [(n, s, False) for n, s in self._native.gradients(tokens)]
        outs = bind(grad_contract, self.dtype, dict(grads), writable={n for n, _, _ in grad_contract},
                    role="gradient")
        saved_need, need = self.saved_bytes(tokens), self.backward_workspace_bytes(tokens)
        kept = region("saved", saved, saved_need)
        ws = region("backward workspace", workspace, need)
        written = [(f"grads[{n!r}]", d.ptr, d.nbytes) for n, d in outs.items()] + [("backward workspace", ws[0], need)]
        read = [(n, d.ptr, d.nbytes) for n, d in inputs.items()] + [("saved", kept[0], saved_need)]
        check_disjoint(written, read)
        handle = stream_handle(stream, inputs["x"])
        self._native.backward(handle, tokens, {n: d.ptr for n, d in inputs.items()},
                              {n: d.ptr for n, d in outs.items()}, kept, ws)


def _tokens(x):
    shape = getattr(x, "shape", None)
    if shape is None:
        cai = interface("x", x)
        shape = cai.get("shape") if isinstance(cai, dict) else None
    if shape is None or len(shape) != 2:
        raise ShapeError(f"tensor `x`: expected shape [T, d_in], got {None if shape is None else list(shape)}")
    return int(shape[0])


def _host_arrays(spec_text, arrays, extra=()):
    """NumPy arrays checked against the contract and encoded for the native reference."""
    import numpy as np

    first = arrays.get("x")
    if first is None:
        raise ShapeError("missing input `x`: every layer needs it")
    x = np.asarray(first)
    if x.ndim != 2:
        raise ShapeError(f"tensor `x`: expected shape [T, d_in], got {list(x.shape)}")
    tokens = x.shape[0]
    contract = list(_native.tensors(spec_text, tokens)) + list(extra)
    names = {n for n, _, _ in contract}
    for name in names:
        if arrays.get(name) is None:
            raise ShapeError(f"missing input `{name}`: this layer's spec needs it")
    encoded = {}
    for name, value in arrays.items():
        if value is None:
            continue
        if name not in names:
            raise ShapeError(f"unexpected input `{name}`: this layer's spec does not take it")
        shape, is_int = next((tuple(s), i) for n, s, i in contract if n == name)
        arr = np.asarray(value)
        if arr.shape != shape:
            raise ShapeError(f"tensor `{name}`: expected shape {list(shape)}, got {list(arr.shape)}")
        kind = "iu" if is_int else "fiu"
        if arr.dtype.kind not in kind:
            want = "an integer array" if is_int else "a real array"
            raise DTypeError(f"tensor `{name}`: expected {want}, got dtype {arr.dtype}")
        # Integers are sent as int32: a wider value would wrap around into another (valid) id.
        if is_int and arr.size and not (-(1 << 31) <= int(arr.min()) and int(arr.max()) < 1 << 31):
            raise InvalidValueError(
                f"tensor `{name}`: values from {int(arr.min())} to {int(arr.max())} do not fit int32")
        encoded[name] = np.ascontiguousarray(arr, dtype="<i4" if is_int else "<f8").tobytes()
    return tokens, encoded


def _decode(result):
    import numpy as np

    out = {}
    for name, value in result.items():
        if isinstance(value, tuple):
            data, shape, typestr = value
            out[name] = np.frombuffer(data, dtype=typestr).reshape(shape).copy()
        elif isinstance(value, dict):
            out[name] = _decode(value)
        else:
            out[name] = value
    return out


def reference(spec, **arrays):
    """The f64 reference forward on NumPy arrays (any real dtype; ``adapter_ids`` integer):
    ``x``, ``a``, ``b``, ``y`` and the optional inputs the spec takes. Returns a dict of NumPy
    arrays: ``y`` (``y + delta``), ``h``, ``h_mixed``, ``ids`` (int32, -1 for an empty slot),
    ``weights`` (per slot), ``scores`` and ``probs`` where the gating has them, ``aux_loss``
    (a float), and ``stats``: the router statistics the auxiliary losses are made of
    (``selected_fraction`` and ``top1_fraction`` per expert, ``mean_prob`` and
    ``masked_mean_prob`` where the rule has probabilities, ``z_loss`` and ``entropy`` where it
    has scores). ``spec`` as :func:`spec` takes it (a preset: ``mole.spec(name, d_in=..., ...)``)."""
    text = _spec_text(spec, {})
    tokens, encoded = _host_arrays(text, arrays)
    return _decode(_native.reference_forward(text, tokens, encoded))


def reference_backward(spec, dy, **arrays):
    """The f64 reference backward: the gradients of ``L = sum(dy * y) + aux_loss`` with respect
    to ``x``, the trained parameters and the gating inputs the spec takes, keyed by the tensor's
    name (``x``, ``a``, ``b``, ``router_weight``, ...), as NumPy f64 arrays. The routing
    selection is a constant, as in every framework."""
    import numpy as np

    text = _spec_text(spec, {})
    d_out = json.loads(text)["d_out"]
    x = arrays.get("x")
    tokens = np.asarray(x).shape[0] if x is not None and np.ndim(x) == 2 else 0
    _, encoded = _host_arrays(text, dict(arrays, dy=dy), extra=[("dy", [tokens, d_out], False)])
    dy_bytes = encoded.pop("dy")
    return _decode(_native.reference_backward(text, tokens, encoded, dy_bytes))


__all__ = [
    "Layer",
    "DeviceArray",
    "presets",
    "spec",
    "plan_sizes",
    "reference",
    "reference_backward",
    "MoleError",
    "SpecError",
    "ShapeError",
    "DTypeError",
    "LayoutError",
    "InvalidValueError",
    "DeviceError",
    "CompileError",
]
