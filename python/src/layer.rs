//! A compiled layer on a GPU, run on the caller's device pointers and stream. The Python layer
//! has checked every tensor's shape, dtype and layout against [`crate::contract`] before it calls
//! in; here each pointer is checked to be device memory of the layer's GPU, and the sizes of
//! the workspace and saved buffers against the plan, before anything is launched.

use crate::contract::{gradient_shapes, input_shapes, parse, parse_dtype, TensorShape};
use crate::errors::{to_py, IntoPy};
use cudarc::driver::sys::{self, CUdeviceptr, CUpointer_attribute, CUstream};
use mole::cuda::Device;
use mole::runtime::{BackwardPointers, CompiledLayer, LayerPointers};
use mole::{DType, MoleError};
use pyo3::prelude::*;
use std::collections::HashMap;
use std::mem::ManuallyDrop;

/// A buffer the caller passes: device address and size in bytes.
type Region = (u64, usize);

/// `mole._native.NativeLayer(spec_json, dtype, device)`: one compiled layer (see
/// [`CompiledLayer`]).
/// Every call that touches the GPU, and the drop, leaves the calling thread's current CUDA
/// context as it found it ([`Device::restoring_current`]): PyTorch's current device follows it.
#[pyclass(module = "mole._native", frozen)]
pub struct NativeLayer {
    layer: ManuallyDrop<CompiledLayer>,
    device: ManuallyDrop<Device>,
    dtype: DType,
}

impl Drop for NativeLayer {
    fn drop(&mut self) {
        Device::restoring_current(|| {
            // SAFETY: dropped once, here; the fields are not used after.
            unsafe {
                ManuallyDrop::drop(&mut self.layer);
                ManuallyDrop::drop(&mut self.device);
            }
        })
    }
}

/// The device pointer `ptr` of tensor `name` must be memory of GPU `ordinal` (a host pointer, or
/// another GPU's, would fault inside a kernel). 0 is an absent tensor.
fn check_pointer(name: &str, ptr: u64, ordinal: usize) -> PyResult<()> {
    if ptr == 0 {
        return Ok(());
    }
    let mut dev: i32 = -1;
    // SAFETY: the attribute is an int written into `dev`, which outlives the call; the driver
    // only reads `ptr` as an address and reports an error for one it does not know.
    let status = unsafe {
        sys::cuPointerGetAttribute(
            (&mut dev as *mut i32).cast(),
            CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
            ptr as CUdeviceptr,
        )
    };
    if status != sys::CUresult::CUDA_SUCCESS || dev < 0 {
        return Err(to_py(MoleError::Cuda {
            call: "cuPointerGetAttribute",
            message: format!("tensor `{name}` at {ptr:#x} is not device memory the driver knows ({status:?})"),
        }));
    }
    if dev as usize != ordinal {
        return Err(to_py(MoleError::Cuda {
            call: "cuPointerGetAttribute",
            message: format!("tensor `{name}` is on GPU {dev}, the layer on GPU {ordinal}"),
        }));
    }
    Ok(())
}

impl NativeLayer {
    /// Checks every pointer of `ptrs` and `more` with [`check_pointer`], the layer's context
    /// current (the driver resolves addresses in it). Inside a CUDA-graph capture in global mode
    /// (PyTorch's default) a driver call deemed unsafe would invalidate the capture: the checks
    /// run in relaxed mode, and the thread's mode is put back after them.
    fn pointers(&self, ptrs: &HashMap<String, u64>, more: &[(&str, u64)]) -> PyResult<()> {
        self.device.bind().py()?;
        let mut mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED;
        // SAFETY: exchanges the calling thread's capture mode with a local (put back below).
        let relaxed = unsafe { sys::cuThreadExchangeStreamCaptureMode(&mut mode) } == sys::CUresult::CUDA_SUCCESS;
        let ordinal = self.device.ordinal();
        let mut all = ptrs.iter().map(|(n, &p)| (n.as_str(), p)).chain(more.iter().copied());
        let checked = all.try_for_each(|(name, p)| check_pointer(name, p, ordinal));
        if relaxed {
            // SAFETY: puts back the mode the exchange above returned.
            unsafe { sys::cuThreadExchangeStreamCaptureMode(&mut mode) };
        }
        checked
    }
}

fn ptr(ptrs: &HashMap<String, u64>, name: &str) -> CUdeviceptr {
    ptrs.get(name).copied().unwrap_or(0)
}

/// The stream handle from the integer Python passes (0: the legacy default stream).
fn stream_of(stream: usize) -> CUstream {
    stream as CUstream
}

#[pymethods]
impl NativeLayer {
    /// Compiles nothing yet: opens GPU `device` (its primary context, the one PyTorch and CuPy
    /// use), validates the spec and uploads the layer's constants.
    #[new]
    fn new(spec: &str, dtype: &str, device: usize) -> PyResult<Self> {
        let spec = parse(spec)?;
        let dtype = parse_dtype(dtype)?;
        Device::restoring_current(|| {
            let device = Device::new(device).py()?;
            let layer = CompiledLayer::new(&device, &spec, dtype, None).py()?;
            Ok(NativeLayer { layer: ManuallyDrop::new(layer), device: ManuallyDrop::new(device), dtype })
        })
    }

    /// The GPU's ordinal.
    #[getter]
    fn device(&self) -> usize {
        self.device.ordinal()
    }

    /// The layer's dtype name.
    #[getter]
    fn dtype(&self) -> &'static str {
        match self.dtype {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// Workspace bytes of a forward over `tokens` tokens.
    fn workspace_bytes(&self, tokens: usize) -> PyResult<usize> {
        self.layer.workspace_bytes(tokens).py()
    }

    /// Bytes of the routing a training forward saves for the backward.
    fn saved_bytes(&self, tokens: usize) -> PyResult<usize> {
        self.layer.saved_bytes(tokens).py()
    }

    /// Workspace bytes of a backward over `tokens` tokens.
    fn backward_workspace_bytes(&self, tokens: usize) -> PyResult<usize> {
        self.layer.backward_workspace_bytes(tokens).py()
    }

    /// Loads the kernels of a forward (and with `backward`, of a training forward and the
    /// backward) over `tokens` tokens: afterwards such calls compile nothing (graph capture).
    /// Compiling takes seconds: other Python threads run meanwhile (the GIL is released).
    #[pyo3(signature = (tokens, backward = false))]
    fn prepare(&self, py: Python<'_>, tokens: usize, backward: bool) -> PyResult<()> {
        py.detach(|| {
            Device::restoring_current(|| -> mole::Result<()> {
                self.layer.prepare(tokens)?;
                if backward {
                    self.layer.planner().plan_training(tokens)?;
                    self.layer.prepare_backward(tokens)?;
                }
                Ok(())
            })
        })
        .py()
    }

    /// The forward inputs of `tokens` tokens: `(name, shape, is_int32)`.
    fn tensors(&self, tokens: usize) -> Vec<TensorShape> {
        input_shapes(self.layer.planner().spec(), tokens)
    }

    /// The gradients a backward of `tokens` tokens writes: `(name, shape)`.
    fn gradients(&self, tokens: usize) -> PyResult<Vec<(&'static str, Vec<usize>)>> {
        gradient_shapes(self.layer.planner(), tokens)
    }

    /// `y += delta` over `tokens` tokens on `stream`: `ptrs` maps each input's name to its
    /// device address; `saved` (training) receives the routing. The GIL is released while the
    /// layer plans, compiles (the first call of a token count) and enqueues.
    #[pyo3(signature = (stream, tokens, ptrs, workspace, saved = None))]
    fn forward(
        &self,
        py: Python<'_>,
        stream: usize,
        tokens: usize,
        ptrs: HashMap<String, u64>,
        workspace: Region,
        saved: Option<Region>,
    ) -> PyResult<()> {
        let saved = saved.unwrap_or((0, 0));
        let gate = ptr(&ptrs, "logits") | ptr(&ptrs, "weights");
        let p = LayerPointers {
            x: ptr(&ptrs, "x"),
            a: ptr(&ptrs, "a"),
            b: ptr(&ptrs, "b"),
            y: ptr(&ptrs, "y"),
            router_weight: ptr(&ptrs, "router_weight"),
            router_bias: ptr(&ptrs, "router_bias"),
            gate_input: gate,
            adapter_ids: ptr(&ptrs, "adapter_ids"),
            selection_bias: ptr(&ptrs, "selection_bias"),
            cores: ptr(&ptrs, "cores"),
            workspace: workspace.0,
            workspace_bytes: workspace.1,
            saved: saved.0,
            saved_bytes: saved.1,
        };
        Device::restoring_current(|| {
            self.pointers(&ptrs, &[("workspace", workspace.0), ("saved", saved.0)])?;
            // SAFETY: the Python layer checked every tensor against this layer's contract (shape,
            // dtype, C-contiguity, writable `y`) and passes the addresses of live arrays the caller
            // holds during the call (its frame keeps them alive while the GIL is released); each is
            // device memory of the layer's GPU (checked above), whose primary context the layer uses;
            // the stream is the caller's, of that context.
            py.detach(|| unsafe { self.layer.forward_raw(stream_of(stream), tokens, p) }).py()
        })
    }

    /// The backward of a training forward over `tokens` tokens on `stream`: `inputs` maps the
    /// forward's inputs and `dy` to addresses, `grads` each gradient's name to its output.
    #[pyo3(signature = (stream, tokens, inputs, grads, saved, workspace))]
    #[allow(clippy::too_many_arguments)] // the Python call's arguments, and the GIL token
    fn backward(
        &self,
        py: Python<'_>,
        stream: usize,
        tokens: usize,
        inputs: HashMap<String, u64>,
        grads: HashMap<String, u64>,
        saved: Region,
        workspace: Region,
    ) -> PyResult<()> {
        let p = BackwardPointers {
            x: ptr(&inputs, "x"),
            a: ptr(&inputs, "a"),
            b: ptr(&inputs, "b"),
            dy: ptr(&inputs, "dy"),
            router_weight: ptr(&inputs, "router_weight"),
            router_bias: ptr(&inputs, "router_bias"),
            gate_input: ptr(&inputs, "logits") | ptr(&inputs, "weights"),
            cores: ptr(&inputs, "cores"),
            saved: saved.0,
            saved_bytes: saved.1,
            dx: ptr(&grads, "x"),
            da: ptr(&grads, "a"),
            db: ptr(&grads, "b"),
            d_router_weight: ptr(&grads, "router_weight"),
            d_router_bias: ptr(&grads, "router_bias"),
            d_gate_input: ptr(&grads, "logits") | ptr(&grads, "weights"),
            d_cores: ptr(&grads, "cores"),
            workspace: workspace.0,
            workspace_bytes: workspace.1,
        };
        Device::restoring_current(|| {
            self.pointers(&inputs, &[])?;
            self.pointers(&grads, &[("workspace", workspace.0), ("saved", saved.0)])?;
            // SAFETY: as in `forward`; the saved buffer is the one the training forward of these
            // inputs wrote (the Python layer passes the routing it kept), the gradients are distinct
            // writable arrays the caller holds during the call.
            py.detach(|| unsafe { self.layer.backward_raw(stream_of(stream), tokens, p) }).py()
        })
    }
}
