"""The callers' device arrays, read through ``__cuda_array_interface__``, and checked against a
layer's tensor contract before anything is launched."""

import math

from .errors import DTypeError, LayoutError, ShapeError

# Element types by CUDA-array-interface type string. bf16 has no standard type string: ml_dtypes'
# bfloat16 reports "<V2", and :class:`DeviceArray` (what ``mole.torch`` passes) "bfloat16".
TYPESTRS = {"<f4": "f32", "<f2": "f16", "<V2": "bf16", "bfloat16": "bf16", "<i4": "i32", "|i4": "i32"}
ITEMSIZE = {"f32": 4, "f16": 2, "bf16": 2, "i32": 4}
DTYPES = {
    "f32": "f32", "float32": "f32",
    "f16": "f16", "float16": "f16", "half": "f16",
    "bf16": "bf16", "bfloat16": "bf16",
}
# A workspace region's alignment (the runtime's 256 bytes, what every CUDA allocation gives).
WORKSPACE_ALIGN = 256


def dtype_name(dtype):
    """``"f32"``, ``"f16"`` or ``"bf16"`` from a name (``"bfloat16"``) or an object whose str
    ends with one (``torch.bfloat16``, ``numpy.float16``)."""
    key = str(dtype).lower().rsplit(".", 1)[-1]
    if key not in DTYPES:
        raise DTypeError(f"dtype {dtype!r}: expected one of f32, f16, bf16")
    return DTYPES[key]


class DeviceArray:
    """A device buffer described by hand (address, shape, dtype name, byte strides or None for
    C-contiguous): for arrays whose library has no ``__cuda_array_interface__`` for their dtype,
    as PyTorch for bfloat16. The caller keeps the memory alive during the call."""

    def __init__(self, ptr, shape, dtype, strides=None, readonly=False):
        self.ptr, self.shape = int(ptr), tuple(int(s) for s in shape)
        self.dtype = "i32" if str(dtype).lower().rsplit(".", 1)[-1] in ("i32", "int32") else dtype_name(dtype)
        self.strides = None if strides is None else tuple(int(s) for s in strides)
        self.readonly = bool(readonly)

    @property
    def __cuda_array_interface__(self):
        typestr = {"f32": "<f4", "f16": "<f2", "bf16": "bfloat16", "i32": "<i4"}[self.dtype]
        return {"shape": self.shape, "typestr": typestr, "data": (self.ptr, self.readonly),
                "strides": self.strides, "version": 3}


class Described:
    """One array as the interface describes it: address, shape, element type, bytes, writable."""

    def __init__(self, name, obj):
        cai = getattr(obj, "__cuda_array_interface__", None)
        if not isinstance(cai, dict):
            raise LayoutError(
                f"`{name}`: not a CUDA array (no __cuda_array_interface__: pass a CUDA tensor of "
                "PyTorch, CuPy, ...; NumPy arrays go to mole.reference)")
        try:
            self.shape = tuple(int(s) for s in cai["shape"])
            self.ptr, readonly = int(cai["data"][0]), bool(cai["data"][1])
            typestr = cai["typestr"]
        except (KeyError, TypeError, IndexError, ValueError) as e:
            raise LayoutError(f"`{name}`: malformed __cuda_array_interface__ ({e!r})") from None
        self.name, self.readonly = name, readonly
        self.dtype = TYPESTRS.get(typestr)
        if self.dtype is None:
            raise DTypeError(f"`{name}`: element type {typestr!r} is not one of f32, f16, bf16, int32")
        self.numel = math.prod(self.shape)
        self.nbytes = self.numel * ITEMSIZE[self.dtype]
        self.stream = cai.get("stream")
        strides = cai.get("strides")
        if strides is not None and self.numel > 1:
            want, step = [], ITEMSIZE[self.dtype]
            for dim in reversed(self.shape):
                want.append(step)
                step *= dim
            want.reverse()
            bad = [i for i, (s, w, d) in enumerate(zip(strides, want, self.shape)) if d > 1 and s != w]
            if len(strides) != len(self.shape) or bad:
                raise LayoutError(
                    f"`{name}`: not C-contiguous (strides {tuple(strides)} bytes, expected {tuple(want)}): "
                    "pass .contiguous() or a copy")
        if self.ptr == 0 and self.numel > 0:
            raise LayoutError(f"`{name}`: null data pointer")


def stream_handle(stream, first):
    """The CUstream to launch on: ``stream`` when given (an int handle, or an object with
    ``cuda_stream`` (PyTorch) or ``ptr`` (CuPy)), else the ``stream`` entry of the first array's
    interface (version 3: 1 is the legacy default stream, 2 the per-thread one), else the
    legacy default stream (0)."""
    if stream is None:
        stream = first.stream
        if stream is None or stream == 1:
            return 0
        return int(stream)
    for attr in ("cuda_stream", "ptr"):
        if hasattr(stream, attr):
            return int(getattr(stream, attr))
    return int(stream)


def bind(contract, dtype, given, writable, role="input"):
    """Checks ``given`` (name -> array or None) against ``contract`` (name, shape, is_int32):
    exactly the contract's tensors, each of its shape and dtype (int32 where the contract says
    so), C-contiguous, and writable where ``writable`` names it. ``role`` says what the arrays
    are in messages (``"gradient"`` for a backward's outputs). Returns name -> Described."""
    why = {"input": ("this layer's spec needs it", "this layer's spec does not take it"),
           "gradient": ("this layer's backward writes it",
                        "this layer's backward does not write it (a frozen parameter, or one the spec lacks)")}[role]
    want = {name: (tuple(shape), "i32" if is_int else dtype) for name, shape, is_int in contract}
    present = {n: a for n, a in given.items() if a is not None}
    for name in want:
        if name not in present:
            raise ShapeError(f"missing {role} `{name}`: {why[0]}")
    for name in present:
        if name not in want:
            raise ShapeError(f"unexpected {role} `{name}`: {why[1]}")
    out = {}
    for name, obj in present.items():
        d = Described(name, obj)
        shape, dt = want[name]
        if d.shape != shape:
            raise ShapeError(f"tensor `{name}`: expected shape {list(shape)}, got {list(d.shape)}")
        if d.dtype != dt:
            raise DTypeError(f"tensor `{name}`: expected {dt}, got {d.dtype}")
        if name in writable and d.readonly:
            raise LayoutError(f"tensor `{name}`: read-only, but the layer writes it")
        out[name] = d
    return out


def region(name, obj, need):
    """A workspace or saved buffer: any C-contiguous device array of at least ``need`` bytes,
    256-byte aligned. Returns (address, bytes)."""
    d = Described(name, obj)
    if d.readonly:
        raise LayoutError(f"`{name}`: read-only, but the layer writes it")
    if d.nbytes < need:
        raise ShapeError(f"`{name}`: {d.nbytes} bytes, the call needs {need}")
    if need > 0 and d.ptr % WORKSPACE_ALIGN:
        raise LayoutError(f"`{name}`: address {d.ptr:#x} is not {WORKSPACE_ALIGN}-byte aligned")
    return (d.ptr, d.nbytes)
