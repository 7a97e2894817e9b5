//! Helpers shared by the tests that run kernels through the host execution layer.

use half::{bf16, f16};
use mole::kernels::exec::{Bindings, Buf};
use mole::kernels::{gating, KernelBuild};
use mole::DType;
use mole_hostexec::Buffer;

/// A buffer of a build's element type, built from f32 values rounded to it.
pub enum Input {
    /// f32 storage.
    F32(Buffer<f32>),
    /// f16 storage.
    F16(Buffer<f16>),
    /// bf16 storage.
    Bf16(Buffer<bf16>),
}

impl Input {
    /// The buffer, and the exact values it holds (what the f64 reference must see).
    pub fn new(name: &str, dtype: DType, v: &[f32]) -> (Input, Vec<f64>) {
        match dtype {
            DType::F32 => (Input::F32(Buffer::from_slice(name, v)), v.iter().map(|&x| x as f64).collect()),
            DType::F16 => {
                let h: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
                (Input::F16(Buffer::from_slice(name, &h)), h.iter().map(|x| x.to_f64()).collect())
            }
            DType::BF16 => {
                let h: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
                (Input::Bf16(Buffer::from_slice(name, &h)), h.iter().map(|x| x.to_f64()).collect())
            }
        }
    }

    /// Binds the buffer to `buf`, with its length.
    pub fn bind(&self, b: &mut Bindings, buf: Buf) {
        match self {
            Input::F32(x) => bind(b, buf, x),
            Input::F16(x) => bind(b, buf, x),
            Input::Bf16(x) => bind(b, buf, x),
        }
    }
}

/// Binds a host-execution buffer to `buf`, with its length.
pub fn bind<T: bytemuck::Pod>(b: &mut Bindings, buf: Buf, data: &Buffer<T>) {
    b.sized(buf, data.device_ptr(), data.len());
}

/// The default gating build of `dtype` (what the host execution layer compiles).
pub fn gating_build(dtype: DType) -> KernelBuild {
    gating::default_builds().into_iter().find(|b| b.dtype == dtype).expect("a default gating build per dtype")
}
