"""mole.Layer's forward and backward up to the launch, without a GPU: the native layer is replaced by
one that records what it would launch, so the Python checks (overlapping buffers) and the stream
chosen by default (PyTorch's and CuPy's current stream, through stand-in modules) are observable."""

import json
import re
import sys
import types

import pytest

import mole
from mole import DeviceArray

SPEC = mole.spec("mix-lora-per-linear", d_in=6, d_out=4, experts=4, rank=2, k=2)
SIZES = {"workspace_bytes": 512, "saved_bytes": 256, "backward_workspace_bytes": 768}


class RecordingNative:
    """The native layer's contract and sizes, with launches recorded instead of run."""

    def __init__(self):
        self.launches = []

    def tensors(self, tokens):
        return mole._native.tensors(json.dumps(SPEC), tokens)

    def gradients(self, tokens):
        return mole._native.gradients(json.dumps(SPEC), "bf16", tokens)

    def __getattr__(self, name):
        if name in SIZES:
            return lambda tokens: SIZES[name]
        raise AttributeError(name)

    def forward(self, stream, tokens, ptrs, ws, saved):
        self.launches.append(("forward", stream))

    def backward(self, stream, tokens, inputs, grads, saved, ws):
        self.launches.append(("backward", stream))


def layer():
    out = object.__new__(mole.Layer)
    out.spec, out.dtype, out._native = SPEC, "bf16", RecordingNative()
    return out


class Memory:
    """Consecutive 256-aligned buffers, disjoint unless placed by hand."""

    def __init__(self):
        self.next = 1 << 20

    def __call__(self, shape, dtype="bf16", at=None):
        arr = DeviceArray(self.next if at is None else at, shape, dtype)
        if at is None:
            self.next += -(-_nbytes(shape, dtype) // 256) * 256
        return arr


def _nbytes(shape, dtype):
    n = {"bf16": 2, "f16": 2, "u8": 1}[dtype]
    for s in shape:
        n *= s
    return n


def forward_args(mem, t=3):
    return dict(x=mem((t, 6)), a=mem((6, 8)), b=mem((8, 4)), y=mem((t, 4)), router_weight=mem((6, 4)),
                workspace=mem((512,), "u8"), saved=mem((256,), "u8"))


def backward_args(mem, t=3):
    f = forward_args(mem, t)
    del f["y"]
    f["workspace"] = mem((768,), "u8")
    grads = {n: mem(s) for n, s in layer().gradients(t).items()}
    return dict(f, dy=mem((t, 4)), grads=grads)


def test_disjoint_buffers_launch():
    lay, mem = layer(), Memory()
    lay.forward(**forward_args(mem))
    lay.backward(**backward_args(mem))
    assert lay._native.launches == [("forward", 0), ("backward", 0)]


@pytest.mark.parametrize("written,other", [("y", "x"), ("workspace", "a"), ("saved", "y"), ("workspace", "saved"),
                                           ("y", "router_weight")])
def test_forward_refuses_a_written_buffer_overlapping_another(written, other):
    lay, mem = layer(), Memory()
    args = forward_args(mem)
    # The written buffer starts at the other's last 256-byte-aligned address (both stay aligned).
    src = args[other]
    end = src.ptr + _nbytes(src.shape, src.dtype) - 1
    args[written] = mem(args[written].shape, args[written].dtype, at=end - end % 256)
    with pytest.raises(mole.LayoutError, match=f"(`{written}`.*overlaps `{other}`|`{other}`.*overlaps `{written}`)"):
        lay.forward(**args)
    assert lay._native.launches == []


def test_forward_allows_adjacent_buffers_and_reads_sharing_memory():
    lay, mem = layer(), Memory()
    args = forward_args(mem)
    # y right after x's last byte: adjacent, not overlapping; a and b the same memory (both only read).
    x_end = args["x"].ptr + _nbytes(args["x"].shape, "bf16")
    args["y"] = mem((3, 4), at=x_end)
    args["b"] = mem((8, 4), at=args["a"].ptr)
    lay.forward(**args)
    assert lay._native.launches == [("forward", 0)]


@pytest.mark.parametrize("written,other", [("grads['a']", "grads['b']"), ("grads['x']", "dy"),
                                           ("backward workspace", "saved"), ("grads['router_weight']", "x")])
def test_backward_refuses_a_written_buffer_overlapping_another(written, other):
    lay, mem = layer(), Memory()
    args = backward_args(mem)

    def slot(name):  # the dict and key holding the buffer a message calls `name`
        if name.startswith("grads"):
            return args["grads"], name[len("grads['"):-2]
        return args, {"backward workspace": "workspace"}.get(name, name)

    src_dict, src_key = slot(other)
    dst_dict, dst_key = slot(written)
    src, dst = src_dict[src_key], dst_dict[dst_key]
    dst_dict[dst_key] = mem(dst.shape, dst.dtype, at=src.ptr)
    w, o = re.escape(written), re.escape(other)
    pattern = f"(`{w}`.*overlaps `{o}`|`{o}`.*overlaps `{w}`)"
    with pytest.raises(mole.LayoutError, match=pattern):
        lay.backward(**args)
    assert lay._native.launches == []


class FakeTensor:
    """What a PyTorch CUDA tensor shows: interface version 2, no stream entry, a device."""

    def __init__(self, arr, device="cuda:1"):
        self.shape, self.device = arr.shape, device
        cai = dict(arr.__cuda_array_interface__, version=2)
        self.__cuda_array_interface__ = cai


def fake_torch(stream_of_device):
    torch = types.ModuleType("torch")
    torch.Tensor = FakeTensor
    torch.cuda = types.SimpleNamespace(
        current_stream=lambda device: types.SimpleNamespace(cuda_stream=stream_of_device[device]))
    return torch


def test_torch_tensors_launch_on_torchs_current_stream(monkeypatch):
    lay, mem = layer(), Memory()
    lay.dtype = "f16"
    f16 = lambda shape: FakeTensor(mem(shape, "f16"))  # noqa: E731
    args = dict(x=f16((3, 6)), a=f16((6, 8)), b=f16((8, 4)), y=f16((3, 4)), router_weight=f16((6, 4)),
                workspace=mem((512,), "u8"))
    # Without torch imported, a tensor-like object has no library stream: the legacy one.
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    lay.forward(**args)
    monkeypatch.setitem(sys.modules, "torch", fake_torch({"cuda:1": 0x7F00}))
    lay.forward(**args)
    lay.forward(**args, stream=0x1200)  # the argument still wins
    assert lay._native.launches == [("forward", 0), ("forward", 0x7F00), ("forward", 0x1200)]
    first = mole._arrays.Described("x", args["x"])
    assert mole._arrays.stream_handle(None, first) == 0x7F00
    # A DeviceArray is no torch.Tensor: its own interface decides.
    assert mole._arrays.stream_handle(None, mole._arrays.Described("x", mem((3, 6)))) == 0


def test_cupy_arrays_without_a_stream_entry_launch_on_cupys_current_stream(monkeypatch):
    class FakeCupyArray:
        def __init__(self, stream_entry):
            self.__cuda_array_interface__ = {"shape": (3, 6), "typestr": "<f4", "data": (1 << 20, False),
                                             "version": 3}
            if stream_entry is not None:
                self.__cuda_array_interface__["stream"] = stream_entry

    cupy = types.ModuleType("cupy")
    cupy.ndarray = FakeCupyArray
    cupy.cuda = types.SimpleNamespace(get_current_stream=lambda: types.SimpleNamespace(ptr=0x9A00))
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    handle = lambda arr: mole._arrays.stream_handle(None, mole._arrays.Described("x", arr))  # noqa: E731
    assert handle(FakeCupyArray(None)) == 0x9A00
    assert handle(FakeCupyArray(0x4400)) == 0x4400  # the interface's entry first
    monkeypatch.delitem(sys.modules, "cupy")
    assert handle(FakeCupyArray(None)) == 0


def test_negative_tokens_and_streams_are_invalid_values():
    lay, mem = layer(), Memory()
    for method in ("workspace_bytes", "saved_bytes", "backward_workspace_bytes", "tensors", "gradients"):
        with pytest.raises(mole.InvalidValueError, match="`tokens`: .*-2"):
            getattr(lay, method)(-2)
    with pytest.raises(mole.InvalidValueError, match="`stream`: .*-1"):
        lay.forward(**forward_args(mem), stream=-1)
    assert lay._native.launches == []
