//! # mole: kernels for sparse Mixture-of-LoRA-Experts layers
//!
//! Every MoLE variant is `shrink → mix → expand` on a frozen base layer's output `y`:
//!
//! ```text
//! h  = x · A                      shrink   x [T, d_in], A [d_in, R]
//! h' = mix(h; gating weights)     mix      in the low-rank space
//! y += scale · h' · B             expand   B [R, d_out]
//! ```
//!
//! The methods differ only in the mix: top-k softmax over LoRA experts (MixLoRA, LLaVA-MoLE,
//! MeteoRA), dense soft weights (X-LoRA, LoRAMoE), dynamic-k (DynMoLE), rank-wise experts
//! (SMoRA, FlyLoRA) and soft-merged cores (CoMoL). [`model`](mod@model) describes a layer,
//! [`reference`](mod@reference) computes it in f64 on the CPU (the oracle for every kernel),
//! `plan` groups routed tokens per expert, `kernels` holds the typed
//! launch layer of each CUDA op family and [`cuda`](mod@cuda) compiles and loads them.
//!
//! ```
//! use mole::model::{LayerInputs, Method, MethodShape};
//!
//! let shape = MethodShape { d_in: 8, d_out: 4, experts: 4, rank: 2, k: 2, alpha: 4.0 };
//! let spec = Method::MixLoraPerLinear.spec(shape)?;
//! let t = 3;
//! let x: Vec<f32> = (0..t * 8).map(|i| (i as f32 * 0.37).sin()).collect();
//! let a: Vec<f32> = (0..8 * 8).map(|i| (i as f32 * 0.11).cos()).collect();
//! let b: Vec<f32> = (0..8 * 4).map(|i| (i as f32 * 0.23).sin()).collect();
//! let y = vec![1.0f32; t * 4];
//! let w_g: Vec<f32> = (0..8 * 4).map(|i| (i as f32 * 0.7).cos()).collect();
//! let mut inputs = LayerInputs::new(t, &x, &a, &b, &y);
//! inputs.router_weight = Some(&w_g);
//! let out = mole::reference::forward(&spec, &inputs)?;
//! assert_eq!(out.y.len(), t * 4);
//! assert!(out.routing.weights.chunks(2).all(|w| (w[0] + w[1] - 1.0).abs() < 1e-12));
//! # Ok::<(), mole::MoleError>(())
//! ```

#![warn(missing_docs)]

/// Declares a module that is public API with the `internals` feature and crate-private without
/// it (what only the command line, the tests and the benchmarks call; a framework links the
/// runtime). Private, its unused parts are not dead code: the feature makes them public.
macro_rules! internal_mod {
    ($name:ident) => {
        #[cfg(feature = "internals")]
        pub mod $name;
        #[cfg(not(feature = "internals"))]
        #[allow(dead_code, unused_imports)]
        pub(crate) mod $name;
    };
}
pub(crate) use internal_mod;

#[cfg(feature = "cli")]
pub mod autotune;
#[cfg(feature = "cli")]
pub mod bench;
pub mod cuda;
pub mod dtype;
pub mod error;
internal_mod!(kernels);
internal_mod!(limits);
pub mod model;
internal_mod!(outfile);
internal_mod!(plan);
pub mod reference;
pub mod runtime;
// Synthetic layer data: for the command line, the benchmarks and the tests.
#[cfg(any(test, feature = "cli"))]
pub mod synth;
#[cfg(feature = "cli")]
pub mod tensors;
pub mod tune;

pub use dtype::{DType, KernelElement, Scalar};

/// The README's Rust examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
pub use error::{MoleError, Result};
