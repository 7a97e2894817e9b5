//! The autotuner's search (feature `cli`): per GPU and per shape, every candidate strategy and
//! kernel build, pruned from the ptxas report, timed on the device, checked against the f64
//! reference; the winners go to the tuning cache ([`crate::tune`]). `mole autotune` drives it
//! for the standard shapes of common models.
//!
//! - [`space`]: the [`Candidate`](crate::tune::Candidate)s of a shape (candidate 0 is the
//!   default) and their pruning before any timing.
//! - [`measure`](mod@measure): timing on the device through [`TunableRun`] (warm-up, L2 flush, CUDA events,
//!   median) and [`prepare_run`], where each strategy plugs in.
//! - [`tuner`]: [`tune_shape`] (a layer) and [`tune_block`] (an FFN-expert block), the search of
//!   one shape with its per-candidate [`Outcome`]s.
//!
//! Beside the search, what `mole run` and `mole bench` time on the device: [`DeviceLayer`] (a
//! layer's synthetic tensors through the layer runtime), [`DeviceBackward`] (its backward) and
//! [`DeviceFfn`] (an FFN-expert block's through the block runtime).

mod device_backward;
mod device_ffn;
mod device_layer;
pub mod measure;
pub mod space;
pub mod tuner;

pub use device_backward::DeviceBackward;
pub use device_ffn::{block_work, check_tokens, BlockWork, DeviceFfn, FfnCheck, CHECK_TOKENS};
pub use device_layer::DeviceLayer;
pub use measure::{measure, prepare_run, reference_y, MeasureOptions, Measurement, TunableRun};
pub use space::{block_candidates, candidates, candidates_for, Pruner};
pub use tuner::{tune_block, tune_shape, CandidateReport, Outcome, ShapeResult, TuneOptions};
