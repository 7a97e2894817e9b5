/* The C ABI of mole: MoLE layers on raw CUDA device pointers and a CUstream, and the f64
 * reference on host f32 buffers. Generated from capi/ by cbindgen: do not edit (regenerate with
 * `cargo run -p mole-c --features gen-header --bin gen-header`).
 * Every call returns a mole_status (mole_last_error_message() says why, per thread); a call
 * that touches a GPU leaves the calling thread's current CUDA context as it found it.
 * Link: -lmole (libmole.so, or libmole.a with -lpthread -ldl -lm). See the README's "C" section. */

#ifndef MOLE_H
#define MOLE_H

#include <stddef.h>
#include <stdint.h>

// What every `mole_*` call returns: `MOLE_OK`, or the family of the error, whose text
// `mole_last_error_message()` gives.
typedef enum mole_status {
  // Success.
  MOLE_OK = 0,
  // A pointer argument that must not be null is null (the message names it).
  MOLE_ERROR_NULL_POINTER = 1,
  // The layer spec JSON does not follow the documented form (the message names the field).
  MOLE_ERROR_INVALID_SPEC = 2,
  // A scalar argument or parameter is out of its domain: a dtype name, `k`, rank offsets, a
  // zero dimension, a string that is not UTF-8, a misaligned host pointer.
  MOLE_ERROR_INVALID_ARGUMENT = 3,
  // A buffer has the wrong size for the spec and the token count (the message names it).
  MOLE_ERROR_SHAPE_MISMATCH = 4,
  // A tensor the spec needs was not given (null), or a buffer the call needs is missing.
  MOLE_ERROR_MISSING_INPUT = 5,
  // A tensor was given that the spec does not take (or a gradient the backward does not write).
  MOLE_ERROR_UNEXPECTED_INPUT = 6,
  // An expert or adapter id is out of range, or repeated among a token's slots.
  MOLE_ERROR_INVALID_ROUTING = 7,
  // The combination is not supported (e.g. a non-primary CUDA context, an unsupported GPU).
  MOLE_ERROR_UNSUPPORTED = 8,
  // A size is over its documented limit, or overflows.
  MOLE_ERROR_TOO_LARGE = 9,
  // An allocation would exceed the host's or the device's available memory; nothing was
  // allocated.
  MOLE_ERROR_OUT_OF_MEMORY = 10,
  // The CUDA driver (libcuda) could not be loaded: no GPU on this machine.
  MOLE_ERROR_NO_CUDA_DRIVER = 11,
  // NVRTC could not be loaded where a kernel had to be compiled.
  MOLE_ERROR_NO_NVRTC = 12,
  // cuBLAS could not be loaded.
  MOLE_ERROR_NO_CUBLAS = 13,
  // A CUDA driver call failed (e.g. no GPU of that ordinal).
  MOLE_ERROR_CUDA = 14,
  // NVRTC rejected a kernel (the message holds its log).
  MOLE_ERROR_KERNEL_COMPILE = 15,
  // A file could not be read or written.
  MOLE_ERROR_IO = 16,
  // A bug in mole: a Rust panic, caught at the boundary (please report the message).
  MOLE_ERROR_PANIC = 17,
  // Any other error (see the message).
  MOLE_ERROR_OTHER = 18,
} mole_status;

// A GPU with its CUDA context (opaque). Layers created on it keep what they need alive, so it
// may be destroyed before them.
typedef struct MoleDevice MoleDevice;

// One MoLE layer on a device (opaque): its constants on the device, its loaded kernels and its
// plans per token count. Calls on one layer may come from several threads.
typedef struct MoleLayer MoleLayer;

// Device addresses (`CUdeviceptr`) of a forward's tensors, 0 for an absent one, each of the
// layer's dtype and row-major: `x [T, d_in]`, `a [d_in, R]`, `b [R, d_out]`, `y [T, d_out]`
// (updated in place), `router_weight` (`[d_in, E]` for the x router, `[R, E]` for the h router),
// `router_bias [E]`, `gate_input [T, E]` (logits or given weights), `adapter_ids [T]` (int32),
// `selection_bias [E]`, `cores [E, R, R]`; which optional ones a spec takes is as in the Rust
// `LayerInputs`. The workspace (256-byte aligned) holds at least
// `mole_layer_workspace_bytes(T)` bytes; `saved` (0 for inference) at least
// `mole_layer_saved_bytes(T)`, kept for the backward of this call.
typedef struct MoleLayerPointers {
  // `x`.
  uint64_t x;
  // `A`.
  uint64_t a;
  // `B`.
  uint64_t b;
  // `y`.
  uint64_t y;
  // `router_weight`.
  uint64_t router_weight;
  // `router_bias`.
  uint64_t router_bias;
  // Router logits or given gate weights.
  uint64_t gate_input;
  // `adapter_ids` (int32).
  uint64_t adapter_ids;
  // `selection_bias`.
  uint64_t selection_bias;
  // `cores`.
  uint64_t cores;
  // The workspace.
  uint64_t workspace;
  // Its size in bytes.
  size_t workspace_bytes;
  // The saved routing of a training forward (0: inference).
  uint64_t saved;
  // Its size in bytes.
  size_t saved_bytes;
} MoleLayerPointers;

// Device addresses of a backward's tensors (0: absent), of the layer's dtype: the forward's
// inputs, `dy [T, d_out]`, the `saved` buffer the training forward of this call wrote, and the
// gradients, overwritten: `dx [T, d_in]` always; `da`, `db`, `d_router_weight`,
// `d_router_bias`, `d_cores` unless the spec freezes the parameter (then 0: giving one is an
// error); `d_gate_input [T, E]` where the gating takes logits or given weights. The workspace
// holds at least `mole_layer_backward_workspace_bytes(T)` bytes.
typedef struct MoleBackwardPointers {
  // `x`.
  uint64_t x;
  // `A`.
  uint64_t a;
  // `B`.
  uint64_t b;
  // `dy`.
  uint64_t dy;
  // `router_weight`.
  uint64_t router_weight;
  // `router_bias`.
  uint64_t router_bias;
  // Router logits or given gate weights.
  uint64_t gate_input;
  // `cores`.
  uint64_t cores;
  // The saved buffer of the training forward.
  uint64_t saved;
  // Its size in bytes.
  size_t saved_bytes;
  // `dx`.
  uint64_t dx;
  // `dA`.
  uint64_t da;
  // `dB`.
  uint64_t db;
  // The router weight's gradient.
  uint64_t d_router_weight;
  // The router bias's gradient.
  uint64_t d_router_bias;
  // The logits' or given weights' gradient.
  uint64_t d_gate_input;
  // The cores' gradient.
  uint64_t d_cores;
  // The workspace.
  uint64_t workspace;
  // Its size in bytes.
  size_t workspace_bytes;
} MoleBackwardPointers;

// The bytes of the device buffers a layer's calls over one token count take, each 256-byte
// aligned by the caller: the forward's workspace, the routing a training forward saves for the
// backward, and the backward's workspace.
typedef struct MoleLayerSizes {
  // Workspace of a forward (inference or training).
  size_t workspace_bytes;
  // The saved buffer a training forward writes.
  size_t saved_bytes;
  // Workspace of a backward.
  size_t backward_workspace_bytes;
} MoleLayerSizes;

// The host tensors of a reference call (row-major, f32 except `adapter_ids`), each a pointer and
// its element count. An absent optional tensor is a null pointer with count 0; which ones a
// spec takes, and their shapes, are those of `MoleLayerPointers`, plus `y`: the base output
// `[T, d_out]` the delta is added to.
typedef struct MoleHostInputs {
  // `x [T, d_in]`.
  const float *x;
  // Elements of `x`.
  size_t x_len;
  // `A [d_in, R]`.
  const float *a;
  // Elements of `A`.
  size_t a_len;
  // `B [R, d_out]`.
  const float *b;
  // Elements of `B`.
  size_t b_len;
  // The base output `y [T, d_out]`.
  const float *y;
  // Elements of `y`.
  size_t y_len;
  // `router_weight` (`[d_in, E]` or `[R, E]`).
  const float *router_weight;
  // Its elements.
  size_t router_weight_len;
  // `router_bias [E]`.
  const float *router_bias;
  // Its elements.
  size_t router_bias_len;
  // `logits [T, E]` (the logits router).
  const float *logits;
  // Its elements.
  size_t logits_len;
  // `weights [T, E]` (given gating).
  const float *weights;
  // Its elements.
  size_t weights_len;
  // `adapter_ids [T]` (int32; -1: none).
  const int32_t *adapter_ids;
  // Its elements.
  size_t adapter_ids_len;
  // `selection_bias [E]`.
  const float *selection_bias;
  // Its elements.
  size_t selection_bias_len;
  // `cores [E, R, R]` (CoMoL).
  const float *cores;
  // Its elements.
  size_t cores_len;
} MoleHostInputs;

// Where the reference backward writes its gradients (f32), each a pointer and its element count:
// those the backward computes must be given with their exact size (`x` always; `a`, `b`, the
// router's unless frozen; `logits` or `weights` where the gating takes them; `cores` for CoMoL
// unless frozen), the others must be null with count 0.
typedef struct MoleHostGrads {
  // `dx [T, d_in]`.
  float *x;
  // Elements of `dx`.
  size_t x_len;
  // `dA [d_in, R]`.
  float *a;
  // Its elements.
  size_t a_len;
  // `dB [R, d_out]`.
  float *b;
  // Its elements.
  size_t b_len;
  // The router weight's gradient.
  float *router_weight;
  // Its elements.
  size_t router_weight_len;
  // The router bias's gradient.
  float *router_bias;
  // Its elements.
  size_t router_bias_len;
  // The logits' gradient `[T, E]`.
  float *logits;
  // Its elements.
  size_t logits_len;
  // The given weights' gradient `[T, E]`.
  float *weights;
  // Its elements.
  size_t weights_len;
  // The cores' gradient `[E, R, R]`.
  float *cores;
  // Its elements.
  size_t cores_len;
} MoleHostGrads;

#ifdef __cplusplus
extern "C" {
#endif // __cplusplus

// Opens GPU `ordinal` (its primary context, the one the CUDA runtime, PyTorch and CuPy use) into
// `*out`. Fails with `MOLE_ERROR_NO_CUDA_DRIVER` on a machine without the driver and
// `MOLE_ERROR_CUDA` when there is no such GPU. Free it with `mole_device_destroy`.
//
// # Safety
// `out` is null or valid for a write.
enum mole_status mole_device_create(int32_t ordinal, struct MoleDevice **out);

// Adopts the caller's CUDA context `context` (a `CUcontext`) into `*out`: kernels are loaded
// into it. It must be its device's primary context (what `cudaSetDevice`, PyTorch and CuPy use,
// or `cuDevicePrimaryCtxRetain`): any other context is refused with `MOLE_ERROR_UNSUPPORTED`,
// as cudarc, which mole runs on, adopts only primary contexts without taking them over.
// The caller keeps its own reference to the context.
//
// # Safety
// `context` is null or a live `CUcontext`; `out` is null or valid for a write.
enum mole_status mole_device_from_context(void *context, struct MoleDevice **out);

// The number of SMs of the device into `*out`: what `mole_plan_sizes` plans for.
//
// # Safety
// `device` is null or live; `out` is null or valid for a write.
enum mole_status mole_device_sm_count(const struct MoleDevice *device, uint32_t *out);

// Frees a device from `mole_device_create` or `mole_device_from_context` (null: nothing).
//
// # Safety
// `device` is null or a device from those calls, not yet destroyed.
void mole_device_destroy(struct MoleDevice *device);

// Builds a layer on `device` from the spec JSON (the `mole eval --spec` form) and a dtype name
// (`"f32"`, `"f16"` or `"bf16"`) into `*out`: validates the spec and uploads its constants
// (synchronously). Kernels are compiled on first use (`mole_layer_prepare`). Free it with
// `mole_layer_destroy`.
//
// # Safety
// `device` is null or a live device; `spec_json` and `dtype` are null or NUL-terminated;
// `out` is null or valid for a write.
enum mole_status mole_layer_create(const struct MoleDevice *device,
                                   const char *spec_json,
                                   const char *dtype,
                                   struct MoleLayer **out);

// Frees a layer (null: nothing), after waiting for the work of its context.
//
// # Safety
// `layer` is null or a layer from `mole_layer_create`, not yet destroyed.
void mole_layer_destroy(struct MoleLayer *layer);

// Workspace bytes a forward over `tokens` tokens needs, into `*out`.
//
// # Safety
// `layer` is null or live; `out` is null or valid for a write.
enum mole_status mole_layer_workspace_bytes(const struct MoleLayer *layer,
                                            size_t tokens,
                                            size_t *out);

// Bytes of the saved buffer a training forward over `tokens` tokens writes for the backward,
// into `*out`.
//
// # Safety
// `layer` is null or live; `out` is null or valid for a write.
enum mole_status mole_layer_saved_bytes(const struct MoleLayer *layer, size_t tokens, size_t *out);

// Workspace bytes a backward over `tokens` tokens needs, into `*out`.
//
// # Safety
// `layer` is null or live; `out` is null or valid for a write.
enum mole_status mole_layer_backward_workspace_bytes(const struct MoleLayer *layer,
                                                     size_t tokens,
                                                     size_t *out);

// Plans a forward of `tokens` tokens and loads its kernels (compiling them if needed): after it,
// such a forward compiles nothing and can be captured in a CUDA graph. With `backward` non-zero,
// the same for the backward.
//
// # Safety
// `layer` is null or live.
enum mole_status mole_layer_prepare(const struct MoleLayer *layer, size_t tokens, int32_t backward);

// One forward over `tokens` tokens, enqueued on `stream` (a `CUstream` or `cudaStream_t` of the
// layer's context; null: the legacy default stream): `y += delta`, and the routing written to
// `saved` for a training forward. Allocates nothing, copies nothing, never synchronises. The
// workspace and saved sizes are checked against the plan before any launch.
//
// # Safety
// `layer` and `pointers` are null or live; every non-zero address in `pointers` is device
// memory of the layer's context holding its tensor (sizes above), `y`, the workspace and the
// saved buffer overlap nothing else, and all stay untouched by other work until the stream has
// run the forward.
enum mole_status mole_layer_forward(const struct MoleLayer *layer,
                                    void *stream,
                                    size_t tokens,
                                    const struct MoleLayerPointers *pointers);

// The backward of a training forward over `tokens` tokens, enqueued on `stream`: overwrites `dx`
// and the gradients of the trained parameters and gating inputs (never accumulates). Every
// buffer is checked against the plan before any launch: a missing gradient, one the backward
// does not write (a frozen parameter's) or a short workspace is an error.
//
// # Safety
// As `mole_layer_forward`, for `MoleBackwardPointers`; `saved` holds what the training forward
// of these inputs wrote.
enum mole_status mole_layer_backward(const struct MoleLayer *layer,
                                     void *stream,
                                     size_t tokens,
                                     const struct MoleBackwardPointers *pointers);

// The sizes of a layer's buffers over `tokens` tokens into `*out`, for the spec JSON, a dtype
// name and a GPU with `sm_count` SMs, without a GPU: the numbers `mole_layer_workspace_bytes`,
// `mole_layer_saved_bytes` and `mole_layer_backward_workspace_bytes` give for a layer created
// from the same spec and dtype on such a GPU (the strategy, and so the workspace, depends on
// the token count and the SM count). Errors: the spec's, an unknown dtype, zero SMs or tokens,
// a token count past the limits.
//
// # Safety
// `spec_json` and `dtype` are null or NUL-terminated; `out` is null or valid for a write.
enum mole_status mole_plan_sizes(const char *spec_json,
                                 const char *dtype,
                                 uint32_t sm_count,
                                 size_t tokens,
                                 struct MoleLayerSizes *out);

// The f64 reference forward of the layer `spec_json` over `tokens` tokens on host f32 tensors:
// writes `y + delta` (`[T, d_out]`, rounded to f32) to `y_out` (`y_out_len` elements, exactly
// `T · d_out`) and, when `aux_loss_out` is not null, the weighted auxiliary losses of the spec.
// Every size is checked before anything is written. No GPU is needed.
//
// # Safety
// `spec_json` is null or NUL-terminated; `inputs` is null or a live struct whose every non-null
// pointer holds its count of elements; `y_out` is null or valid for `y_out_len` writes and
// overlaps no input; `aux_loss_out` is null or valid for a write.
enum mole_status mole_reference_forward(const char *spec_json,
                                        size_t tokens,
                                        const struct MoleHostInputs *inputs,
                                        float *y_out,
                                        size_t y_out_len,
                                        double *aux_loss_out);

// The f64 reference backward of the layer `spec_json` over `tokens` tokens: the gradients of
// `L = Σ dy · y + aux_loss` (`dy [T, d_out]`, `dy_len` elements) with the routing selection held
// constant, as the GPU backward computes them, written (rounded to f32) where `grads` says (see
// `MoleHostGrads`). Every size and the presence of each gradient are checked before anything is
// written. No GPU is needed.
//
// # Safety
// As `mole_reference_forward`; `dy` is null or holds `dy_len` elements; `grads` is null or a
// live struct whose every non-null pointer is valid for its count of writes and overlaps no
// input and no other gradient.
enum mole_status mole_reference_backward(const char *spec_json,
                                         size_t tokens,
                                         const struct MoleHostInputs *inputs,
                                         const float *dy,
                                         size_t dy_len,
                                         const struct MoleHostGrads *grads);

// The message of this thread's last `mole_*` call: empty after one that returned `MOLE_OK`.
// The text stays valid until the next `mole_*` call on the same thread (copy it to keep it);
// never null.
const char *mole_last_error_message(void);

// The name of a status (`"MOLE_ERROR_INVALID_SPEC"`), a static string; `"MOLE_UNKNOWN_STATUS"`
// for a value that is no status.
const char *mole_status_name(int32_t status);

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* MOLE_H */
