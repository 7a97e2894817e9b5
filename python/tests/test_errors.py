"""Errors: every one a mole.MoleError, bad input a ValueError naming the field or tensor; the
layer's device-array checks run before any launch (here on arrays that only describe memory)."""

import json

import numpy as np
import pytest

import mole
from mole import DeviceArray, _arrays

SPEC = dict(d_in=6, d_out=4, experts=4, rank=2, k=2)


def arrays(tokens=3):
    rng = np.random.default_rng(0)
    return dict(x=rng.standard_normal((tokens, 6)), a=rng.standard_normal((6, 8)),
                b=rng.standard_normal((8, 4)), y=rng.standard_normal((tokens, 4)),
                router_weight=rng.standard_normal((6, 4)))


def spec():
    return mole.spec("mix-lora-per-linear", **SPEC)


def test_spec_errors_name_the_field():
    bad = spec()
    bad["gating"]["rule"]["temprature"] = 1.0
    with pytest.raises(mole.SpecError, match=r"gating\.rule\.temprature"):
        mole.spec(bad)
    bad = spec()
    del bad["d_out"]
    with pytest.raises(mole.SpecError, match="d_out"):
        mole.spec(bad)
    with pytest.raises(mole.SpecError, match="not valid JSON"):
        mole.spec("{ nope")
    with pytest.raises(ValueError, match="k = 5"):
        mole.spec("mix-lora-per-linear", **dict(SPEC, k=5))
    with pytest.raises(mole.InvalidValueError, match="not-a-method"):
        mole.spec("not-a-method", **SPEC)
    with pytest.raises(mole.SpecError, match="rank"):
        mole.spec("mix-lora-per-linear", d_in=6, d_out=4, experts=4)
    assert "comol" in mole.presets()


def test_reference_shape_and_dtype_errors():
    s = spec()
    a = arrays()
    a["router_weight"] = a["router_weight"][:5]
    with pytest.raises(mole.ShapeError, match=r"router_weight.*\[6, 4\].*\[5, 4\]"):
        mole.reference(s, **a)
    a = arrays()
    del a["router_weight"]
    with pytest.raises(mole.ShapeError, match="missing input `router_weight`"):
        mole.reference(s, **a)
    with pytest.raises(mole.ShapeError, match="unexpected input `cores`"):
        mole.reference(s, cores=np.ones((4, 8, 8)), **arrays())
    a = arrays()
    a["x"] = a["x"].astype(np.complex128)
    with pytest.raises(mole.DTypeError, match="`x`"):
        mole.reference(s, **a)
    with pytest.raises(mole.ShapeError, match="dy"):
        mole.reference_backward(s, dy=np.ones((3, 5)), **arrays())
    for cls in (mole.ShapeError, mole.DTypeError, mole.SpecError):
        assert issubclass(cls, mole.MoleError) and issubclass(cls, ValueError)


def test_layer_without_a_gpu_raises_a_device_error():
    try:
        import ctypes

        ctypes.CDLL("libcuda.so.1")
    except OSError:
        pass
    else:
        pytest.skip("a CUDA driver is present: the GPU kit tests the layer")
    with pytest.raises(mole.DeviceError, match="CUDA driver"):
        mole.Layer(spec(), "bf16")


def described(shape, dtype="bf16", ptr=1 << 20, strides=None, readonly=False):
    return DeviceArray(ptr, shape, dtype, strides=strides, readonly=readonly)


def bind(given, tokens=3, dtype="bf16"):
    contract = mole._native.tensors(json.dumps(spec()), tokens)
    return _arrays.bind(contract, dtype, given, writable={"y"})


def device_inputs(tokens=3, **over):
    given = dict(x=described((tokens, 6)), a=described((6, 8)), b=described((8, 4)), y=described((tokens, 4)),
                 router_weight=described((6, 4)))
    given.update(over)
    return given


def test_device_arrays_are_checked_before_any_launch():
    assert set(bind(device_inputs())) == {"x", "a", "b", "y", "router_weight"}
    with pytest.raises(mole.ShapeError, match=r"tensor `b`: expected shape \[8, 4\], got \[4, 8\]"):
        bind(device_inputs(b=described((4, 8))))
    with pytest.raises(mole.DTypeError, match="tensor `a`: expected bf16, got f16"):
        bind(device_inputs(a=described((6, 8), "f16")))
    # A transposed view: the right shape, column-major strides.
    with pytest.raises(mole.LayoutError, match="`a`: not C-contiguous"):
        bind(device_inputs(a=described((6, 8), strides=(2, 12))))
    with pytest.raises(mole.LayoutError, match="`y`: read-only"):
        bind(device_inputs(y=described((3, 4), readonly=True)))
    with pytest.raises(mole.ShapeError, match="missing input `router_weight`"):
        bind(device_inputs(router_weight=None))
    with pytest.raises(mole.ShapeError, match="unexpected input `router_bias`"):
        bind(device_inputs(router_bias=described((4,))))
    with pytest.raises(mole.LayoutError, match="`x`: not a CUDA array"):
        bind(device_inputs(x=np.zeros((3, 6))))
    # Row strides of a contiguous array, and a size-1 dimension's stride, are fine.
    bind(device_inputs(a=described((6, 8), strides=(16, 2)), router_weight=described((6, 4), strides=(8, 2))))
    bind(device_inputs(tokens=1, x=described((1, 6), strides=(999, 2)), y=described((1, 4))), tokens=1)


def test_workspace_regions_and_streams():
    assert _arrays.region("workspace", described((1024,), "f32"), 4096) == (1 << 20, 4096)
    with pytest.raises(mole.ShapeError, match="workspace.*4096 bytes, the call needs 5000"):
        _arrays.region("workspace", described((1024,), "f32"), 5000)
    with pytest.raises(mole.LayoutError, match="aligned"):
        _arrays.region("workspace", described((1024,), "f32", ptr=(1 << 20) + 16), 16)

    class Cai:
        def __init__(self, stream):
            self.__cuda_array_interface__ = {"shape": (2,), "typestr": "<f4", "data": (256, False),
                                             "version": 3, "stream": stream}

    first = lambda s: _arrays.Described("x", Cai(s))  # noqa: E731
    assert _arrays.stream_handle(None, first(1)) == 0
    assert _arrays.stream_handle(None, first(None)) == 0
    assert _arrays.stream_handle(None, first(2)) == 2
    assert _arrays.stream_handle(None, first(0xABC0)) == 0xABC0

    class TorchLike:
        cuda_stream = 0x1230

    assert _arrays.stream_handle(TorchLike(), first(0xABC0)) == 0x1230
    assert _arrays.stream_handle(77, first(0xABC0)) == 77


def test_byte_buffers_are_regions_but_no_tensor():
    # What mole.torch allocates workspaces and the saved routing as (torch.uint8).
    assert _arrays.region("workspace", described((4096,), "u8"), 4096) == (1 << 20, 4096)
    assert _arrays.region("saved", described((300,), "uint8"), 300) == (1 << 20, 300)
    with pytest.raises(mole.ShapeError, match="saved.*300 bytes, the call needs 301"):
        _arrays.region("saved", described((300,), "u8"), 301)

    class CupyBytes:  # the interface's own type string for bytes
        __cuda_array_interface__ = {"shape": (512,), "typestr": "|u1", "data": (1 << 21, False), "version": 3}

    assert _arrays.region("workspace", CupyBytes(), 512) == (1 << 21, 512)
    with pytest.raises(mole.DTypeError, match="tensor `x`: expected bf16, got u8"):
        bind(device_inputs(x=DeviceArray(1 << 20, (3, 6), "u8")))


def test_an_interface_that_raises_is_a_layout_error():
    class RequiresGrad:
        shape = (3, 6)

        @property
        def __cuda_array_interface__(self):
            raise RuntimeError("Can't get __cuda_array_interface__ on Variable that requires grad")

    with pytest.raises(mole.LayoutError, match=r"`a`: .*RuntimeError.*requires grad.*\.detach\(\).*DeviceArray"):
        bind(device_inputs(a=RequiresGrad()))

    class NoShape:
        @property
        def __cuda_array_interface__(self):
            raise KeyError("bfloat16")

    with pytest.raises(mole.LayoutError, match="`x`: .*KeyError"):
        mole._tokens(NoShape())
    with pytest.raises(mole.LayoutError, match="`workspace`: .*KeyError"):
        _arrays.region("workspace", NoShape(), 16)


def test_negative_integers_are_invalid_values():
    for name, value in (("device", -1), ("tokens", -3), ("stream", -5)):
        with pytest.raises(mole.InvalidValueError, match=f"`{name}`: .*non-negative.*{value}"):
            _arrays.nonnegative(name, value)
    with pytest.raises(mole.InvalidValueError, match="`stream`: .*2\\*\\*64"):
        _arrays.nonnegative("stream", 1 << 64)
    with pytest.raises(mole.InvalidValueError, match="`tokens`"):
        _arrays.nonnegative("tokens", "many")
    assert _arrays.nonnegative("tokens", np.int64(7)) == 7
    first = _arrays.Described("x", described((3, 6)))
    with pytest.raises(mole.InvalidValueError, match="`stream`: .*-1"):
        _arrays.stream_handle(-1, first)

    class NegativeTorchStream:
        cuda_stream = -2

    with pytest.raises(mole.InvalidValueError, match="`stream`: .*-2"):
        _arrays.stream_handle(NegativeTorchStream(), first)
    with pytest.raises(mole.InvalidValueError, match="`tokens`: .*-1"):
        mole.plan_sizes(spec(), -1, 132)
    with pytest.raises(mole.InvalidValueError, match="`sm_count`: .*-1"):
        mole.plan_sizes(spec(), 8, -1)
    # Checked before the driver is looked for.
    with pytest.raises(mole.InvalidValueError, match="`device`: .*-1"):
        mole.Layer(spec(), "bf16", device=-1)


def test_adapter_ids_wider_than_int32_are_refused():
    s = dict(spec(), gating={"type": "adapter_ids"})
    s.pop("aux_loss", None)
    given = arrays()
    del given["router_weight"]
    ids = np.array([0, 3, -1], dtype=np.int64)
    out = mole.reference(s, adapter_ids=ids, **given)["ids"]
    assert out[:, 0].tolist() == [0, 3, -1]
    # 2**32 + 1 would wrap around to expert 1, an id in range.
    for bad in (np.int64((1 << 32) + 1), np.int64(-(1 << 31) - 1)):
        with pytest.raises(mole.InvalidValueError, match="`adapter_ids`: .*int32"):
            mole.reference(s, adapter_ids=np.array([0, bad, 1], dtype=np.int64), **given)
    with pytest.raises(mole.InvalidValueError, match="`adapter_ids`"):
        mole.reference(s, adapter_ids=np.array([0, 1 << 63, 1], dtype=np.uint64), **given)


def test_gradients_of_frozen_parameters_are_refused():
    s = spec()
    s["training"] = {"frozen": ["a"]}
    contract = [(n, sh, False) for n, sh in mole._native.gradients(json.dumps(s), "bf16", 3)]
    grads = dict(x=described((3, 6)), b=described((8, 4)), router_weight=described((6, 4)))
    assert set(_arrays.bind(contract, "bf16", grads, writable=set(grads), role="gradient")) == set(grads)
    with pytest.raises(mole.ShapeError, match="unexpected gradient `a`: .*frozen"):
        _arrays.bind(contract, "bf16", dict(grads, a=described((6, 8))), writable=set(), role="gradient")
    with pytest.raises(mole.ShapeError, match="missing gradient `b`"):
        _arrays.bind(contract, "bf16", dict(grads, b=None), writable=set(), role="gradient")
