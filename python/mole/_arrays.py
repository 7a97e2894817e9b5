"""The callers' device arrays, read through ``__cuda_array_interface__``, and checked against a
layer's tensor contract before anything is launched."""

import math
import sys

from .errors import DTypeError, InvalidValueError, LayoutError, ShapeError

# Element types by CUDA-array-interface type string. bf16 has no standard type string: ml_dtypes'
# bfloat16 reports "<V2", and :class:`DeviceArray` (what ``mole.torch`` passes) "bfloat16". Bytes
# ("u8") are for workspaces and the saved routing only: no tensor of a layer has that type.
TYPESTRS = {"<f4": "f32", "<f2": "f16", "<V2": "bf16", "bfloat16": "bf16", "<i4": "i32", "|i4": "i32",
            "|u1": "u8", "<u1": "u8"}
ITEMSIZE = {"f32": 4, "f16": 2, "bf16": 2, "i32": 4, "u8": 1}
DTYPES = {
    "f32": "f32", "float32": "f32",
    "f16": "f16", "float16": "f16", "half": "f16",
    "bf16": "bf16", "bfloat16": "bf16",
}
# The integer element types a :class:`DeviceArray` may have besides the layer dtypes.
INT_DTYPES = {"i32": "i32", "int32": "i32", "u8": "u8", "uint8": "u8"}
# A workspace region's alignment (the runtime's 256 bytes, what every CUDA allocation gives).
WORKSPACE_ALIGN = 256


def nonnegative(name, value, bits=64):
    """``value`` as an int in ``[0, 2**bits)``, else an :class:`InvalidValueError` naming it (what
    the native module takes as an unsigned integer: a device, a token count, a stream)."""
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise InvalidValueError(f"`{name}`: expected a non-negative integer, got {value!r}") from None
    if not 0 <= n < 1 << bits:
        raise InvalidValueError(f"`{name}`: expected a non-negative integer below 2**{bits}, got {n}")
    return n


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
    as PyTorch for bfloat16. The dtype is a layer's (``"f32"``, ``"f16"``, ``"bf16"``),
    ``"i32"`` (adapter ids) or ``"u8"`` (bytes: a workspace or the saved routing). The caller keeps
    the memory alive during the call."""

    def __init__(self, ptr, shape, dtype, strides=None, readonly=False):
        self.ptr, self.shape = int(ptr), tuple(int(s) for s in shape)
        key = str(dtype).lower().rsplit(".", 1)[-1]
        self.dtype = INT_DTYPES[key] if key in INT_DTYPES else dtype_name(dtype)
        self.strides = None if strides is None else tuple(int(s) for s in strides)
        self.readonly = bool(readonly)

    @property
    def __cuda_array_interface__(self):
        typestr = {"f32": "<f4", "f16": "<f2", "bf16": "bfloat16", "i32": "<i4", "u8": "|u1"}[self.dtype]
        return {"shape": self.shape, "typestr": typestr, "data": (self.ptr, self.readonly),
                "strides": self.strides, "version": 3}


def interface(name, obj):
    """``obj.__cuda_array_interface__``, or None where it has none. A library may raise anything
    from the property (PyTorch a RuntimeError for a tensor that requires grad, a KeyError for
    bfloat16 in older versions): that is a :class:`LayoutError` naming the tensor."""
    try:
        return getattr(obj, "__cuda_array_interface__", None)
    except Exception as e:
        raise LayoutError(
            f"`{name}`: its __cuda_array_interface__ raised {type(e).__name__}: {e} (pass t.detach() for a "
            "tensor that requires grad, or describe it with mole.torch.device_array / mole.DeviceArray)") from e


class Described:
    """One array as the interface describes it: address, shape, element type, bytes, writable, and
    the object itself (``source``: its library's current stream is the default one)."""

    def __init__(self, name, obj):
        cai = interface(name, obj)
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
        self.name, self.readonly, self.source = name, readonly, obj
        self.dtype = TYPESTRS.get(typestr)
        if self.dtype is None:
            raise DTypeError(f"`{name}`: element type {typestr!r} is not one of f32, f16, bf16, int32, uint8")
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
    interface (version 3: 1 is the legacy default stream, 2 the per-thread one), else, for a
    ``torch.Tensor``, ``torch.cuda.current_stream(t.device)`` and for a CuPy array
    ``cupy.cuda.get_current_stream()`` (what ``with torch.cuda.stream(s)`` and ``with s:`` set;
    neither library is imported here: only one the caller has imported can have made the
    array), else the legacy default stream (0)."""
    if stream is None:
        stream = first.stream
        if stream is None:
            stream = library_stream(first.source)
        if stream is None or stream == 1:
            return 0
        return nonnegative("stream", stream)
    for attr in ("cuda_stream", "ptr"):
        if hasattr(stream, attr):
            return nonnegative("stream", getattr(stream, attr))
    return nonnegative("stream", stream)


def library_stream(obj):
    """The current stream of the library ``obj`` comes from (PyTorch, CuPy), or None."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return torch.cuda.current_stream(obj.device).cuda_stream
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(obj, cupy.ndarray):
        return cupy.cuda.get_current_stream().ptr
    return None


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


def check_disjoint(written, read):
    """Before any launch: no region the call writes (name, address, bytes) overlaps another one it
    writes or one it reads, else a :class:`LayoutError` naming both (the kernels would read what
    they are overwriting). Empty regions overlap nothing."""
    written = [r for r in written if r[2] > 0]
    others = written + [r for r in read if r[2] > 0]
    for i, (name, ptr, size) in enumerate(written):
        for other, optr, osize in others[i + 1:]:
            if ptr < optr + osize and optr < ptr + size:
                raise LayoutError(
                    f"`{name}` [{ptr:#x}, {ptr + size:#x}) overlaps `{other}` [{optr:#x}, {optr + osize:#x}): "
                    "the layer writes it, so it needs memory of its own")
