"""The exceptions of ``mole``: every error the package raises is a :class:`MoleError`.

Bad input (a spec, a shape, a dtype, a layout, a value) also derives from ``ValueError``; the GPU,
its driver and the kernel compiler's failures from ``RuntimeError``. The native module raises
these classes itself (``mole._native`` maps each error of the Rust library to one of them).
"""


class MoleError(Exception):
    """Base class of every error ``mole`` raises."""


class SpecError(MoleError, ValueError):
    """The layer spec is invalid: the message names the field (``gating.rule.k: ...``)."""


class ShapeError(MoleError, ValueError):
    """A tensor is missing, unexpected, or of the wrong shape or size: the message names it."""


class DTypeError(MoleError, ValueError):
    """A tensor's element type is not the layer's (or an unknown dtype name was given)."""


class LayoutError(MoleError, ValueError):
    """A tensor is not a C-contiguous device array (or not a device array at all), is read-only
    where the layer writes, or a workspace is misaligned."""


class InvalidValueError(MoleError, ValueError):
    """A parameter has an invalid value (e.g. an unknown method preset)."""


class DeviceError(MoleError, RuntimeError):
    """No usable GPU or driver, a CUDA call failed, or a tensor lives on another GPU."""


class CompileError(MoleError, RuntimeError):
    """NVRTC could not compile a kernel (a bug of ``mole``: please report the message)."""


__all__ = [
    "MoleError",
    "SpecError",
    "ShapeError",
    "DTypeError",
    "LayoutError",
    "InvalidValueError",
    "DeviceError",
    "CompileError",
]
