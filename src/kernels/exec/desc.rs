//! What a kernel entry point takes: its parameter struct and its ordered, typed pointer
//! arguments, each bound to one of the layer's buffers ([`Buf`]).

use crate::kernels::Family;
use crate::DType;

/// The element type behind a pointer argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Elem {
    /// The build's element type (f32, f16 or bf16).
    Data,
    /// `float`.
    F32,
    /// `unsigned int`.
    U32,
    /// `int`.
    I32,
    /// `mole_token_slot` ([`crate::plan::TokenSlot`], two `u32`).
    TokenSlot,
}

impl Elem {
    /// Bytes per element in a `dtype` build.
    pub fn size(self, dtype: DType) -> usize {
        match self {
            Elem::Data => dtype.size_bytes(),
            Elem::F32 | Elem::U32 | Elem::I32 => 4,
            Elem::TokenSlot => 8,
        }
    }
}

macro_rules! buffers {
    ($($(#[doc = $doc:literal])* $v:ident = $name:literal, $elem:ident, $cap:literal;)*) => {
        /// A buffer of a layer call. Every pointer argument of every kernel names one, so that a
        /// call binds its buffers once (a [`super::Bindings`] table) and every launch takes its
        /// arguments from there in its own order.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u8)]
        pub enum Buf {
            $($(#[doc = $doc])* $v,)*
        }

        impl Buf {
            /// Every buffer, in declaration order.
            pub const ALL: [Buf; [$(Buf::$v),*].len()] = [$(Buf::$v),*];
            /// Number of buffers.
            pub const COUNT: usize = Buf::ALL.len();

            /// The name errors and docs use (the kernels' parameter name).
            pub fn name(self) -> &'static str {
                match self { $(Buf::$v => $name,)* }
            }

            /// Element type.
            pub fn elem(self) -> Elem {
                match self { $(Buf::$v => Elem::$elem,)* }
            }

            /// Whether the buffer is a capacity (a workspace or an output of variable length)
            /// that may be longer than a call needs; every other buffer must match exactly.
            pub fn is_capacity(self) -> bool {
                match self { $(Buf::$v => $cap,)* }
            }
        }
    };
}

buffers! {
    /// `x [T, d_in]`.
    X = "x", Data, false;
    /// `A [d_in, R]`.
    A = "a", Data, false;
    /// `B [R, d_out]`.
    B = "b", Data, false;
    /// `y [T, d_out]`, updated in place.
    Y = "y", Data, false;
    /// `router_weight`: `[d_in, E]` (x router) or `[R, E]` (h router).
    RouterWeight = "router_weight", Data, false;
    /// `router_bias [E]`.
    RouterBias = "router_bias", Data, false;
    /// `[T, E]`: router logits the caller computed, or given gate weights.
    GateInput = "gate_input", Data, false;
    /// `adapter_ids [T]`.
    AdapterIds = "adapter_ids", I32, false;
    /// `selection_bias [E]`: added to the selection score only.
    SelectionBias = "selection_bias", Data, false;
    /// `rank_offsets [E + 1]` of the bank.
    RankOffsets = "rank_offsets", U32, false;
    /// `expert_scales [bank experts]`: per-expert scales `s_e` of the bank (absent: all 1).
    ExpertScales = "expert_scales", F32, false;
    /// `cores [C, R, R]` (CoMoL).
    Cores = "cores", Data, false;
    /// Routing output `ids [T, slots]` (-1: empty slot).
    Ids = "ids", I32, false;
    /// Routing output `weights [T, slots]`.
    RouteWeights = "route_weights", F32, false;
    /// Router probabilities `[T, E]`.
    Probs = "probs", F32, false;
    /// Router statistics workspace (u32 words: counts, then f32 sums).
    StatsWorkspace = "stats_workspace", U32, true;
    /// Router statistics `[4E + 2]`.
    StatsOut = "stats_out", F32, false;
    /// Split-K partial sums (f32 workspace).
    Partials = "partials", F32, true;
    /// Routing-plan workspace (u32 words).
    PlanWorkspace = "plan_workspace", U32, true;
    /// Routing plan: tokens per expert, `[plans, E]`.
    PlanCounts = "plan_counts", U32, false;
    /// Routing plan: segment offsets, `[plans, E + 1]`.
    PlanOffsets = "plan_offsets", U32, false;
    /// Routing plan: entries, `[plans, entry_stride]`.
    PlanEntries = "plan_entries", TokenSlot, true;
    /// Routing plan: 1 where an id outside `-1..E` was skipped, `[plans]`.
    PlanStatus = "plan_status", U32, false;
    /// FFN block: the gate bank's `A^g [d, R_g]`.
    GateA = "gate_a", Data, false;
    /// FFN block: the gate bank's `B^g [R_g, f]`.
    GateB = "gate_b", Data, false;
    /// FFN block: the up bank's `A^u [d, R_u]`.
    UpA = "up_a", Data, false;
    /// FFN block: the up bank's `B^u [R_u, f]`.
    UpB = "up_b", Data, false;
    /// FFN block: the down bank's `A^d [f, R_d]`.
    DownA = "down_a", Data, false;
    /// FFN block: the down bank's `B^d [R_d, d]`.
    DownB = "down_b", Data, false;
    /// FFN block: `rank_offsets [E + 1]` of the gate bank.
    GateRankOffsets = "gate_rank_offsets", U32, false;
    /// FFN block: `rank_offsets [E + 1]` of the up bank.
    UpRankOffsets = "up_rank_offsets", U32, false;
    /// FFN block: `rank_offsets [E + 1]` of the down bank.
    DownRankOffsets = "down_rank_offsets", U32, false;
    /// FFN block: the base gate output `x · W_gate [T, f]`.
    GateOut = "gate_out", Data, false;
    /// FFN block: the base up output `x · W_up [T, f]`.
    UpOut = "up_out", Data, false;
    /// FFN block: `a_mix = Σ_s w_s · a_e [T, f]`, what the base down projection multiplies.
    AMix = "a_mix", Data, false;
    /// FFN block: the gate shrink's split-K partials (f32 workspace).
    GatePartials = "gate_partials", F32, true;
    /// FFN block: the up shrink's split-K partials (f32 workspace).
    UpPartials = "up_partials", F32, true;
    /// FFN block: the down shrink's per-f-slice partials (f32 workspace).
    DownPartials = "down_partials", F32, true;
    /// Backward: the loss gradient of the layer's output, `dy [T, d_out]`.
    Dy = "dy", Data, false;
    /// Backward: `dL/dx [T, d_in]` (overwritten).
    DX = "dx", Data, false;
    /// Backward: `dL/d gate_input [T, E]`, the logits' or the given weights' gradient (overwritten).
    DGateInput = "d_gate_input", Data, false;
    /// Backward workspace: `h = x·A [T, R]` (f32), recomputed.
    BwH = "bw_h", F32, true;
    /// Backward workspace: `g = scale·s_e·dy·Bᵀ [T, R]` (f32), the gradient of the mixed
    /// activations (0 on the columns of experts a token did not select, expert-scale mix).
    BwG = "bw_g", F32, true;
    /// Backward workspace: `dh = dL/dh [T, R]` (f32), the mix's and the router's.
    BwDh = "bw_dh", F32, true;
    /// Backward workspace: `hm [T, R]` (f32), the mixed activations times the per-expert scales
    /// (what `dB = hmᵀ·(scale·dy)` multiplies).
    BwHm = "bw_hm", F32, true;
    /// Backward workspace: `dw = dL/dw [T, E]` (f32), dense per routed expert, 0 where not selected.
    BwDw = "bw_dw", F32, true;
    /// Backward workspace: the routing weights, dense `[T, E]` (f32), 0 where not selected.
    BwW = "bw_w", F32, true;
    /// Backward workspace: the router scores `z [T, E]` (f32, NaN as `-inf`).
    BwZ = "bw_z", F32, true;
    /// Backward workspace: `dz = dL/dz [T, E]` (f32): the scores' gradient (given weights: the
    /// weights').
    BwDz = "bw_dz", F32, true;
    /// Backward workspace: the router statistics' per-chunk partial sums `[chunks, 4E]` (f32).
    BwStatsPartials = "bw_stats_partials", F32, true;
    /// Backward workspace: the router statistics `[4E]` (f32): selected fraction, top-1 fraction,
    /// mean probability, masked mean probability.
    BwStats = "bw_stats", F32, true;
    /// Weight gradient: the left operand `P` in the dtype, a `[T, stride]` matrix (a block of its
    /// columns is read).
    WgradP = "wgrad_p", Data, false;
    /// Weight gradient: the left operand `P` in f32, a `[T, stride]` matrix.
    WgradPFloat = "wgrad_p_float", F32, false;
    /// Weight gradient: the right operand `Q` in the dtype, a `[T, stride]` matrix.
    WgradQ = "wgrad_q", Data, false;
    /// Weight gradient: the right operand `Q` in f32, a `[T, stride]` matrix.
    WgradQFloat = "wgrad_q_float", F32, false;
    /// Weight gradient: the per-token row weights, a `[T, stride]` f32 matrix (one column per
    /// output).
    WgradRowWeight = "wgrad_row_weight", F32, false;
    /// Weight gradient: the token splits' partial sums `[splits, outputs, M, N]` (f32 workspace).
    WgradPartials = "wgrad_partials", F32, true;
    /// Weight gradient: the result `[outputs, M, N]`, overwritten.
    WgradOut = "wgrad_out", Data, false;
    /// Backward: `dL/dA [d_in, R]` (overwritten).
    DA = "d_a", Data, false;
    /// Backward: `dL/dB [R, d_out]` (overwritten).
    DB = "d_b", Data, false;
    /// Backward: `dL/d router_weight` (`[d_in, E]` or `[R, E]`, overwritten).
    DRouterWeight = "d_router_weight", Data, false;
    /// Backward: `dL/d router_bias [E]` (overwritten).
    DRouterBias = "d_router_bias", Data, false;
    /// Backward: `dL/d cores [C, R, R]` (overwritten).
    DCores = "d_cores", Data, false;
}

/// How a kernel uses a pointer argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// Reads only (`const T*`).
    Read,
    /// Writes, possibly reading back what it wrote (`T*`).
    Write,
}

/// One pointer argument of a kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ArgDesc {
    /// The buffer it binds to.
    pub buf: Buf,
    /// Read or write.
    pub access: Access,
    /// Whether the kernel accepts null (it then skips what the buffer is for).
    pub optional: bool,
}

impl ArgDesc {
    /// A required input.
    pub const fn input(buf: Buf) -> Self {
        ArgDesc { buf, access: Access::Read, optional: false }
    }

    /// An input the kernel accepts as null.
    pub const fn optional_input(buf: Buf) -> Self {
        ArgDesc { buf, access: Access::Read, optional: true }
    }

    /// A required output (or workspace).
    pub const fn output(buf: Buf) -> Self {
        ArgDesc { buf, access: Access::Write, optional: false }
    }

    /// An output the kernel accepts as null.
    pub const fn optional_output(buf: Buf) -> Self {
        ArgDesc { buf, access: Access::Write, optional: true }
    }
}

/// Most pointer arguments of one kernel.
pub const MAX_ARGS: usize = 16;
/// Largest parameter struct, bytes.
pub const MAX_PARAMS_BYTES: usize = 256;

/// One `extern "C"` entry point: the parameter struct passed by value first, then the pointer
/// arguments in order. Builds append their dtype suffix to `name` (`sgmv_shrink_bf16`).
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct KernelDesc {
    /// The source file.
    pub family: Family,
    /// Base name.
    pub name: &'static str,
    /// The C parameter struct (`mole_sgmv_params`).
    pub params_type: &'static str,
    /// Its size in bytes (asserted against the Rust twin in each family's tests).
    pub params_bytes: usize,
    /// Pointer arguments, in the kernel's order.
    pub args: &'static [ArgDesc],
}

impl KernelDesc {
    /// The entry point of a `dtype` build, e.g. `sgmv_shrink_bf16`.
    pub fn entry_name(&self, dtype: DType) -> String {
        format!("{}_{}", self.name, dtype.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_names_are_distinct_identifiers() {
        let mut names: Vec<&str> = Buf::ALL.iter().map(|b| b.name()).collect();
        assert!(names.iter().all(|n| n.chars().all(|c| c == '_' || c.is_ascii_lowercase())));
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Buf::COUNT);
        assert!(Buf::ALL.iter().enumerate().all(|(i, b)| *b as usize == i));
    }

    #[test]
    fn element_sizes() {
        assert_eq!(Elem::Data.size(DType::BF16), 2);
        assert_eq!(Elem::Data.size(DType::F32), 4);
        assert_eq!(Elem::TokenSlot.size(DType::F16), std::mem::size_of::<crate::plan::TokenSlot>());
    }
}
