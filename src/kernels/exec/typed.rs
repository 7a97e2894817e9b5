//! Binding typed device slices (cudarc's slices and views, of any length and offset).

use super::bind::Bindings;
use super::desc::{Buf, Elem};
use crate::plan::TokenSlot;
use crate::{DType, MoleError, Result};
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, SyncOnDrop};
use half::{bf16, f16};
use std::any::TypeId;

/// Whether `T` is the element type of `elem` in a `dtype` call.
fn element_matches<T: 'static>(elem: Elem, dtype: DType) -> bool {
    let t = TypeId::of::<T>();
    match elem {
        Elem::Data => match dtype {
            DType::F32 => t == TypeId::of::<f32>(),
            DType::F16 => t == TypeId::of::<f16>(),
            DType::BF16 => t == TypeId::of::<bf16>(),
        },
        Elem::F32 => t == TypeId::of::<f32>(),
        Elem::U32 => t == TypeId::of::<u32>(),
        Elem::I32 => t == TypeId::of::<i32>(),
        Elem::TokenSlot => t == TypeId::of::<TokenSlot>(),
    }
}

/// [`Bindings`] made from typed device slices on a stream: each slice's address and length, its
/// element type checked against the buffer's, and cudarc's stream-ordering guard of each slice
/// kept until the bindings are dropped (after the launches are enqueued).
pub struct TypedBindings<'a> {
    bindings: Bindings,
    guards: Vec<SyncOnDrop<'a>>,
    stream: &'a CudaStream,
    dtype: DType,
    error: Option<MoleError>,
}

impl<'a> TypedBindings<'a> {
    /// Nothing bound yet, for launches on `stream` with `dtype` data.
    pub fn new(stream: &'a CudaStream, dtype: DType) -> Self {
        TypedBindings { bindings: Bindings::new(), guards: Vec::new(), stream, dtype, error: None }
    }

    fn element<T: 'static>(&mut self, buf: Buf) -> bool {
        if element_matches::<T>(buf.elem(), self.dtype) {
            return true;
        }
        let (name, dtype) = (buf.name(), self.dtype);
        self.error.get_or_insert_with(|| {
            MoleError::Unsupported(format!(
                "`{name}` holds {}, not the {:?} element of a {dtype} call",
                std::any::type_name::<T>(),
                buf.elem()
            ))
        });
        false
    }

    /// Binds a buffer the call reads.
    pub fn input<T: 'static>(&mut self, buf: Buf, slice: &'a impl DevicePtr<T>) -> &mut Self {
        if self.element::<T>(buf) {
            let (ptr, guard) = slice.device_ptr(self.stream);
            self.bindings.sized(buf, ptr, slice.len());
            self.guards.push(guard);
        }
        self
    }

    /// Binds a buffer the call writes.
    pub fn output<T: 'static>(&mut self, buf: Buf, slice: &'a mut impl DevicePtrMut<T>) -> &mut Self {
        if self.element::<T>(buf) {
            let len = slice.len();
            let (ptr, guard) = slice.device_ptr_mut(self.stream);
            self.bindings.sized(buf, ptr, len);
            self.guards.push(guard);
        }
        self
    }

    /// [`TypedBindings::input`] when `slice` is present.
    pub fn input_opt<T: 'static>(&mut self, buf: Buf, slice: Option<&'a impl DevicePtr<T>>) -> &mut Self {
        if let Some(s) = slice {
            self.input(buf, s);
        }
        self
    }

    /// [`TypedBindings::output`] when `slice` is present.
    pub fn output_opt<T: 'static>(&mut self, buf: Buf, slice: Option<&'a mut impl DevicePtrMut<T>>) -> &mut Self {
        if let Some(s) = slice {
            self.output(buf, s);
        }
        self
    }

    /// The bindings, or the first element-type error.
    pub fn bindings(&self) -> Result<&Bindings> {
        match &self.error {
            Some(e) => Err(e.clone()),
            None => Ok(&self.bindings),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn element_types_follow_the_buffer_and_the_dtype() {
        assert!(element_matches::<bf16>(Elem::Data, DType::BF16));
        assert!(!element_matches::<f16>(Elem::Data, DType::BF16));
        assert!(element_matches::<f32>(Elem::Data, DType::F32));
        assert!(element_matches::<f32>(Elem::F32, DType::BF16));
        assert!(!element_matches::<u32>(Elem::I32, DType::F32));
        assert!(element_matches::<TokenSlot>(Elem::TokenSlot, DType::F16));
    }
}
