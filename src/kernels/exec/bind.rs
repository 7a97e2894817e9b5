//! Binding a call's buffers and packing launches.

use super::desc::{Buf, KernelDesc, MAX_ARGS, MAX_PARAMS_BYTES};
use crate::{DType, MoleError, Result};
use bytemuck::Pod;

/// The element count of every buffer a call takes, by [`Buf`]; 0 marks a buffer it does not
/// take. Made by each family's plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufLens([usize; Buf::COUNT]);

impl Default for BufLens {
    fn default() -> Self {
        BufLens([0; Buf::COUNT])
    }
}

impl BufLens {
    /// No buffers.
    pub fn new() -> Self {
        Self::default()
    }

    /// The element count of `buf` (0: not taken).
    pub fn get(&self, buf: Buf) -> usize {
        self.0[buf as usize]
    }

    /// Sets the element count of `buf`.
    pub fn set(&mut self, buf: Buf, len: usize) {
        self.0[buf as usize] = len;
    }

    /// With `buf` at `len` elements.
    pub fn with(mut self, buf: Buf, len: usize) -> Self {
        self.set(buf, len);
        self
    }

    /// The buffers taken, with their element counts.
    pub fn taken(&self) -> impl Iterator<Item = (Buf, usize)> + '_ {
        Buf::ALL.into_iter().map(|b| (b, self.get(b))).filter(|&(_, n)| n > 0)
    }

    /// Only the buffers `kernel`'s arguments name (what one of a plan's launches takes).
    pub fn for_kernel(&self, kernel: &KernelDesc) -> BufLens {
        kernel.args.iter().fold(BufLens::new(), |acc, a| acc.with(a.buf, self.get(a.buf)))
    }

    /// Bytes of buffer `buf` in a `dtype` build.
    pub fn bytes(&self, buf: Buf, dtype: DType) -> usize {
        self.get(buf) * buf.elem().size(dtype)
    }
}

/// Device addresses of a call's buffers, by [`Buf`], with their element counts where known
/// (typed slices); 0 is an absent buffer. Raw-pointer calls bind addresses only: their lengths
/// are the caller's promise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bindings {
    ptr: [u64; Buf::COUNT],
    len: [Option<usize>; Buf::COUNT],
}

impl Default for Bindings {
    fn default() -> Self {
        Bindings { ptr: [0; Buf::COUNT], len: [None; Buf::COUNT] }
    }
}

impl Bindings {
    /// Nothing bound.
    pub fn new() -> Self {
        Self::default()
    }

    /// Binds `buf` to device address `ptr` (0: absent) whose length the caller vouches for.
    pub fn raw(&mut self, buf: Buf, ptr: u64) -> &mut Self {
        self.ptr[buf as usize] = ptr;
        self.len[buf as usize] = None;
        self
    }

    /// Binds `buf` to device address `ptr` holding `len` elements.
    pub fn sized(&mut self, buf: Buf, ptr: u64, len: usize) -> &mut Self {
        self.ptr[buf as usize] = ptr;
        self.len[buf as usize] = Some(len);
        self
    }

    /// The address bound to `buf` (0 when absent).
    pub fn ptr(&self, buf: Buf) -> u64 {
        self.ptr[buf as usize]
    }

    /// The element count bound to `buf`, when known.
    pub fn len(&self, buf: Buf) -> Option<usize> {
        self.len[buf as usize]
    }

    /// Checks the bindings against what a call takes: every buffer it takes is present and, where
    /// its length is known, holds exactly that many elements ([`Buf::is_capacity`] buffers: at
    /// least). Buffers the call does not take are ignored (they are passed as null).
    /// `needed_by` names the call in errors.
    pub fn check(&self, lens: &BufLens, needed_by: &'static str) -> Result<()> {
        for (buf, need) in lens.taken() {
            if self.ptr(buf) == 0 {
                return Err(MoleError::MissingInput { name: buf.name(), needed_by });
            }
            match self.len(buf) {
                Some(got) if got < need || (got != need && !buf.is_capacity()) => {
                    return Err(MoleError::ShapeMismatch { what: buf.name(), expected: vec![need], got })
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The bindings with buffer `to` bound as `from` is, for each `(to, from)`: how a composed
    /// forward hands one of its buffers to a kernel that names it otherwise (the FFN block's
    /// gate bank as the `a` of an SGMV shrink).
    pub fn aliased(&self, pairs: &[(Buf, Buf)]) -> Bindings {
        let mut out = *self;
        for &(to, from) in pairs {
            out.ptr[to as usize] = self.ptr(from);
            out.len[to as usize] = self.len(from);
        }
        out
    }

    /// The bindings with every buffer `lens` does not take cleared, so kernels see null for them.
    pub fn only(&self, lens: &BufLens) -> Bindings {
        let mut out = Bindings::new();
        for (buf, _) in lens.taken() {
            out.ptr[buf as usize] = self.ptr(buf);
            out.len[buf as usize] = self.len(buf);
        }
        out
    }
}

/// Grid, block and dynamic shared memory of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Dims {
    /// Blocks `(x, y, z)`.
    pub grid: (u32, u32, u32),
    /// Threads per block (x only).
    pub block: u32,
    /// Dynamic shared memory, bytes.
    pub shared_bytes: u32,
}

#[derive(Clone, Copy)]
#[repr(C, align(16))]
struct ParamBytes([u8; MAX_PARAMS_BYTES]);

/// One kernel launch, packed: the kernel, its dimensions, its parameter struct's bytes and its
/// pointer arguments in order. Made by [`Launch::pack`]; run by a [`super::Backend`].
#[derive(Clone, Copy)]
pub struct Launch {
    kernel: &'static KernelDesc,
    dims: Dims,
    params: ParamBytes,
    ptrs: [u64; MAX_ARGS],
}

impl std::fmt::Debug for Launch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Launch")
            .field("kernel", &self.kernel.name)
            .field("dims", &self.dims)
            .field("ptrs", &self.ptrs())
            .finish_non_exhaustive()
    }
}

impl Launch {
    /// Packs a launch of `kernel` with `params` and the pointers `bindings` holds for its
    /// arguments. Errors when `params` is not the size the kernel declares or a required argument
    /// is unbound (optional ones are passed as null).
    pub fn pack<P: Pod>(kernel: &'static KernelDesc, dims: Dims, params: &P, bindings: &Bindings) -> Result<Launch> {
        let bytes = bytemuck::bytes_of(params);
        if bytes.len() != kernel.params_bytes || bytes.len() > MAX_PARAMS_BYTES || kernel.args.len() > MAX_ARGS {
            return Err(MoleError::Unsupported(format!(
                "{}: a {}-byte parameter struct for a kernel that declares {} bytes",
                kernel.name,
                bytes.len(),
                kernel.params_bytes
            )));
        }
        let mut launch = Launch { kernel, dims, params: ParamBytes([0; MAX_PARAMS_BYTES]), ptrs: [0; MAX_ARGS] };
        launch.params.0[..bytes.len()].copy_from_slice(bytes);
        for (slot, arg) in launch.ptrs.iter_mut().zip(kernel.args) {
            *slot = bindings.ptr(arg.buf);
            if *slot == 0 && !arg.optional {
                return Err(MoleError::MissingInput { name: arg.buf.name(), needed_by: kernel.name });
            }
        }
        Ok(launch)
    }

    /// The kernel.
    pub fn kernel(&self) -> &'static KernelDesc {
        self.kernel
    }

    /// Grid, block and shared memory.
    pub fn dims(&self) -> Dims {
        self.dims
    }

    /// The parameter struct's bytes.
    pub fn params(&self) -> &[u8] {
        &self.params.0[..self.kernel.params_bytes]
    }

    /// The pointer arguments, in the kernel's order.
    pub fn ptrs(&self) -> &[u64] {
        &self.ptrs[..self.kernel.args.len()]
    }

    /// The argument array `cuLaunchKernel` takes: one pointer to each argument's value.
    pub(crate) fn arg_pointers(&mut self) -> ([*mut std::ffi::c_void; MAX_ARGS + 1], usize) {
        let mut out = [std::ptr::null_mut(); MAX_ARGS + 1];
        out[0] = self.params.0.as_mut_ptr().cast();
        let n = self.kernel.args.len();
        for (o, p) in out[1..].iter_mut().zip(&mut self.ptrs[..n]) {
            *o = (p as *mut u64).cast();
        }
        (out, n + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::super::desc::ArgDesc;
    use super::*;
    use crate::kernels::Family;

    static K: KernelDesc = KernelDesc {
        family: Family::Sgmv,
        name: "k",
        params_type: "p",
        params_bytes: 8,
        args: &[ArgDesc::input(Buf::X), ArgDesc::optional_input(Buf::Cores), ArgDesc::output(Buf::Y)],
    };

    fn dims() -> Dims {
        Dims { grid: (1, 1, 1), block: 32, shared_bytes: 0 }
    }

    #[test]
    fn pack_takes_pointers_in_the_kernels_order() {
        let mut b = Bindings::new();
        b.raw(Buf::Y, 0x300).raw(Buf::X, 0x100).raw(Buf::A, 0x200);
        let l = Launch::pack(&K, dims(), &[7u32, 9u32], &b).unwrap();
        assert_eq!(l.ptrs(), [0x100, 0, 0x300]);
        assert_eq!(l.params(), bytemuck::bytes_of(&[7u32, 9u32]));
        let mut l2 = l;
        let (args, n) = l2.arg_pointers();
        assert_eq!(n, 4);
        // SAFETY: the pointers point into `l2`, alive here; each is a u64 argument slot.
        assert_eq!(unsafe { *(args[3] as *const u64) }, 0x300);
        b.raw(Buf::X, 0);
        assert_eq!(
            Launch::pack(&K, dims(), &[7u32, 9u32], &b).unwrap_err(),
            MoleError::MissingInput { name: "x", needed_by: "k" }
        );
        assert!(Launch::pack(&K, dims(), &7u32, &b).is_err());
    }

    #[test]
    fn check_wants_exact_lengths_and_capacities() {
        let lens = BufLens::new().with(Buf::X, 6).with(Buf::Partials, 10);
        let mut b = Bindings::new();
        b.sized(Buf::X, 0x10, 6).sized(Buf::Partials, 0x20, 12).sized(Buf::Cores, 0x30, 1);
        b.check(&lens, "t").unwrap();
        assert_eq!(b.only(&lens).ptr(Buf::Cores), 0);
        b.sized(Buf::X, 0x10, 7);
        assert!(matches!(b.check(&lens, "t"), Err(MoleError::ShapeMismatch { what: "x", .. })));
        b.sized(Buf::X, 0x10, 6).sized(Buf::Partials, 0x20, 9);
        assert!(matches!(b.check(&lens, "t"), Err(MoleError::ShapeMismatch { what: "partials", .. })));
        b.raw(Buf::Partials, 0x20);
        b.check(&lens, "t").unwrap();
        b.raw(Buf::X, 0);
        assert_eq!(b.check(&lens, "t"), Err(MoleError::MissingInput { name: "x", needed_by: "t" }));
    }
}
