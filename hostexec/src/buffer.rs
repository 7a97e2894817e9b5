//! Global-memory buffers between `PROT_NONE` guard pages.

use crate::ffi;
use bytemuck::Pod;
use std::ffi::CString;
use std::marker::PhantomData;
use std::ptr::NonNull;

/// Which end of a buffer touches its guard page (the other end has one too, behind up to a page
/// of padding that is checked after every launch instead).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Guard {
    /// The data ends at the trailing guard page: the first element past the end faults.
    #[default]
    After,
    /// The data starts at the leading guard page: element -1 faults.
    Before,
}

/// Start alignment of every buffer when it ends at its guard page: enough for 16-byte vector
/// accesses, so a correct kernel never trips on alignment (CUDA allocations are 256-aligned).
/// Up to 15 bytes of padding may sit between the end and the guard page.
const ALIGN: usize = 16;

/// A buffer of `T` in "global memory": an `mmap`ed region flanked by guard pages, poisoned
/// (`0xFF` bytes: NaN as a float, -1 as an integer) where not initialised. Pass it to a launch
/// with [`crate::Arg::buffer`]; out-of-bounds accesses are reported with the buffer's name and
/// the element index.
pub struct Buffer<T: Pod> {
    ptr: NonNull<T>,
    len: usize,
    name: String,
    _owns: PhantomData<T>,
}

// SAFETY: the buffer exclusively owns its mapping; moving it to another thread moves that
// ownership. It is not Sync: a launch writes through `&Buffer`, so sharing it across threads
// could race a read with a launch.
unsafe impl<T: Pod + Send> Send for Buffer<T> {}

impl<T: Pod> Buffer<T> {
    /// `len` poisoned elements, guarded per `guard`.
    pub fn poisoned_with_guard(name: &str, len: usize, guard: Guard) -> Buffer<T> {
        Self::map(name, len, guard, false)
    }

    /// `len` zeroed elements whose pages are mapped only when touched, ending at the trailing
    /// guard page: a buffer of many GiB costs the memory of the parts written (with
    /// [`Buffer::write_at`]) and read by kernels. For tests of index arithmetic past 2^32 elements.
    pub fn lazy_zeroed(name: &str, len: usize) -> Buffer<T> {
        Self::map(name, len, Guard::After, true)
    }

    fn map(name: &str, len: usize, guard: Guard, lazy: bool) -> Buffer<T> {
        let c_name = CString::new(name.replace('\0', " ")).expect("NULs replaced");
        let elem = std::mem::size_of::<T>().max(1);
        let bytes = len.checked_mul(std::mem::size_of::<T>()).expect("buffer size overflows usize");
        let align = ALIGN.max(std::mem::align_of::<T>());
        // SAFETY: `c_name` is NUL-terminated and outlives the call (the runtime copies it);
        // `align` is a power of two as the runtime requires.
        let raw = unsafe {
            ffi::mole_hx_alloc(c_name.as_ptr(), bytes, elem, align, (guard == Guard::Before) as i32, lazy as i32)
        };
        let ptr = NonNull::new(raw.cast::<T>()).unwrap_or_else(|| panic!("hostexec: cannot map buffer '{name}'"));
        Buffer { ptr, len, name: name.to_string(), _owns: PhantomData }
    }

    /// `len` poisoned elements, ending at the trailing guard page.
    pub fn poisoned(name: &str, len: usize) -> Buffer<T> {
        Self::poisoned_with_guard(name, len, Guard::After)
    }

    /// A copy of `data`, guarded per `guard`.
    pub fn with_guard(name: &str, data: &[T], guard: Guard) -> Buffer<T> {
        let mut b = Self::poisoned_with_guard(name, data.len(), guard);
        b.write(data);
        b
    }

    /// A copy of `data`, ending at the trailing guard page.
    pub fn from_slice(name: &str, data: &[T]) -> Buffer<T> {
        Self::with_guard(name, data, Guard::After)
    }

    /// `len` zeroed elements, ending at the trailing guard page.
    pub fn zeroed(name: &str, len: usize) -> Buffer<T> {
        Self::from_slice(name, &vec![T::zeroed(); len])
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The name used in error reports.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address kernels see, for embedding in by-value parameter structs.
    pub fn device_ptr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// A copy of the contents.
    pub fn read(&self) -> Vec<T> {
        let mut out = vec![T::zeroed(); self.len];
        // SAFETY: the mapping holds `len` readable elements (read-only protection is lifted
        // after every launch); `out` has room for `len`; the regions are distinct allocations.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr(), out.as_mut_ptr(), self.len) };
        out
    }

    /// Overwrites elements `offset..offset + data.len()` with `data`.
    pub fn write_at(&mut self, offset: usize, data: &[T]) {
        let end = offset.checked_add(data.len()).filter(|&e| e <= self.len);
        assert!(end.is_some(), "buffer '{}' holds {} elements, not {offset} + {}", self.name, self.len, data.len());
        // SAFETY: `offset + data.len() <= len` elements are mapped and writable, and `&mut self`
        // excludes any launch or read in progress; the source is a distinct allocation.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(offset), data.len()) };
    }

    /// Overwrites the contents with `data` (of the same length).
    pub fn write(&mut self, data: &[T]) {
        assert_eq!(data.len(), self.len, "buffer '{}' holds {} elements", self.name, self.len);
        // SAFETY: the mapping holds `len` writable elements and `&mut self` excludes any launch
        // or read in progress; the source is a distinct allocation.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr(), self.len) };
    }
}

impl<T: Pod> Drop for Buffer<T> {
    fn drop(&mut self) {
        // SAFETY: the pointer came from mole_hx_alloc and is freed exactly once, here.
        unsafe { ffi::mole_hx_free(self.ptr.as_ptr().cast()) };
    }
}

impl<T: Pod> std::fmt::Debug for Buffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buffer").field("name", &self.name).field("len", &self.len).finish()
    }
}
