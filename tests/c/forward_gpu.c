/* The C ABI on a GPU (the GPU kit compiles it with gcc against the packed libmole.so and runs it):
 * a device adopted from the primary context (a non-primary one refused), a layer from the spec
 * JSON, forward and training forward + backward on device buffers through a CUstream, each
 * compared with the C reference (mole_reference_*), from NaN-poisoned outputs and workspaces; the
 * backward rerun bit for bit; a short workspace refused before any launch. The CUDA driver API is
 * loaded with dlopen, so no CUDA header or toolkit is needed to build it. */
#include "mole.h"
#include "check.h"

#include <dlfcn.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext;
typedef void *CUstream;
typedef unsigned long long CUdeviceptr;

static CUresult (*cuInit)(unsigned);
static CUresult (*cuDeviceGet)(CUdevice *, int);
static CUresult (*cuDevicePrimaryCtxRetain)(CUcontext *, CUdevice);
static CUresult (*cuCtxCreate)(CUcontext *, unsigned, CUdevice);
static CUresult (*cuCtxDestroy)(CUcontext);
static CUresult (*cuCtxSetCurrent)(CUcontext);
static CUresult (*cuCtxGetCurrent)(CUcontext *);
static CUresult (*cuMemAlloc)(CUdeviceptr *, size_t);
static CUresult (*cuMemcpyHtoD)(CUdeviceptr, const void *, size_t);
static CUresult (*cuMemcpyDtoH)(void *, CUdeviceptr, size_t);
static CUresult (*cuMemsetD8)(CUdeviceptr, unsigned char, size_t);
static CUresult (*cuStreamCreate)(CUstream *, unsigned);
static CUresult (*cuStreamSynchronize)(CUstream);

#define T 37
#define D_IN 64
#define D_OUT 48
#define E 4
#define RANK 8
#define R (E * RANK)

#define CU(call)                                                                                   \
  do {                                                                                             \
    CUresult r_ = (call);                                                                          \
    if (r_ != 0) {                                                                                 \
      fprintf(stderr, "FAIL %s:%d: %s = %d\n", __FILE__, __LINE__, #call, r_);                     \
      exit(1);                                                                                     \
    }                                                                                              \
  } while (0)
#define MOLE(call)                                                                                 \
  do {                                                                                             \
    mole_status s_ = (call);                                                                       \
    if (s_ != MOLE_OK) {                                                                           \
      fprintf(stderr, "FAIL %s:%d: %s = %s: %s\n", __FILE__, __LINE__, #call, mole_status_name(s_), \
              mole_last_error_message());                                                          \
      exit(1);                                                                                     \
    }                                                                                              \
  } while (0)

static const char *SPEC =
    "{\"d_in\": 64, \"d_out\": 48, \"ranks\": {\"experts\": 4, \"rank\": 8}, \"scale\": 0.25,"
    " \"gating\": {\"type\": \"routed\", \"router\": {\"type\": \"x\", \"bias\": false},"
    "  \"rule\": {\"type\": \"softmax_topk\", \"k\": 2, \"weights\": \"renormalized\"}}}";

static void *sym(void *lib, const char *name) {
  void *p = dlsym(lib, name);
  if (!p) {
    fprintf(stderr, "FAIL: libcuda has no %s\n", name);
    exit(1);
  }
  return p;
}

static void load_driver(void) {
  void *lib = dlopen("libcuda.so.1", RTLD_NOW);
  if (!lib) {
    fprintf(stderr, "FAIL: dlopen(libcuda.so.1): %s\n", dlerror());
    exit(1);
  }
  *(void **)&cuInit = sym(lib, "cuInit");
  *(void **)&cuDeviceGet = sym(lib, "cuDeviceGet");
  *(void **)&cuDevicePrimaryCtxRetain = sym(lib, "cuDevicePrimaryCtxRetain");
  *(void **)&cuCtxCreate = sym(lib, "cuCtxCreate_v2");
  *(void **)&cuCtxDestroy = sym(lib, "cuCtxDestroy_v2");
  *(void **)&cuCtxSetCurrent = sym(lib, "cuCtxSetCurrent");
  *(void **)&cuCtxGetCurrent = sym(lib, "cuCtxGetCurrent");
  *(void **)&cuMemAlloc = sym(lib, "cuMemAlloc_v2");
  *(void **)&cuMemcpyHtoD = sym(lib, "cuMemcpyHtoD_v2");
  *(void **)&cuMemcpyDtoH = sym(lib, "cuMemcpyDtoH_v2");
  *(void **)&cuMemsetD8 = sym(lib, "cuMemsetD8_v2");
  *(void **)&cuStreamCreate = sym(lib, "cuStreamCreate");
  *(void **)&cuStreamSynchronize = sym(lib, "cuStreamSynchronize");
}

static void fill(float *v, size_t n, double step, double phase) {
  for (size_t i = 0; i < n; i++) v[i] = (float)sin(phase + step * (double)i);
}

/* A device copy of `n` floats. */
static CUdeviceptr upload(const float *v, size_t n) {
  CUdeviceptr p = 0;
  CU(cuMemAlloc(&p, n * sizeof(float)));
  CU(cuMemcpyHtoD(p, v, n * sizeof(float)));
  return p;
}

static CUdeviceptr poisoned(size_t bytes) {
  CUdeviceptr p = 0;
  CU(cuMemAlloc(&p, bytes ? bytes : 1));
  CU(cuMemsetD8(p, 0xff, bytes ? bytes : 1)); /* all-ones bytes: NaN floats */
  return p;
}

/* f32 kernels against the f64 reference rounded to f32: within f32 rounding over the longest
 * reduction (`terms`) of the magnitude of the values. */
static void compare(const char *what, const float *got, const float *want, size_t n, int terms) {
  double mag = 0.0;
  for (size_t i = 0; i < n; i++) mag = fmax(mag, fabs(want[i]));
  double tol = 4.0 * FLT_EPSILON * terms * (1.0 + mag);
  int nonzero = 0;
  for (size_t i = 0; i < n; i++) {
    nonzero |= want[i] != 0.0f;
    if (!(fabs((double)got[i] - want[i]) <= tol)) {
      FAIL("%s[%zu] = %.9g, the reference gives %.9g (tolerance %.3g)", what, i, got[i], want[i], tol);
      return;
    }
  }
  if (!nonzero) FAIL("%s: the reference is all zero, which tests nothing", what);
  printf("%s: %zu values within %.3g of the reference\n", what, n, tol);
}

static float x[T * D_IN], a[D_IN * R], b[R * D_OUT], y0[T * D_OUT], wg[D_IN * E], dy[T * D_OUT];

int main(void) {
  load_driver();
  CU(cuInit(0));
  CUdevice cu_dev;
  CU(cuDeviceGet(&cu_dev, 0));

  /* Adoption: a non-primary context is refused with a clear status, the primary one adopted. */
  CUcontext other = NULL, primary = NULL;
  MoleDevice *dev = NULL;
  CU(cuCtxCreate(&other, 0, cu_dev));
  mole_status st = mole_device_from_context(other, &dev);
  if (st != MOLE_ERROR_UNSUPPORTED || strstr(mole_last_error_message(), "primary") == NULL)
    FAIL("a non-primary context: %s (%s)", mole_status_name(st), mole_last_error_message());
  CUcontext current = NULL;
  CU(cuCtxGetCurrent(&current));
  if (current != other) FAIL("mole_device_from_context changed the thread's current context");
  CU(cuCtxDestroy(other));
  CU(cuDevicePrimaryCtxRetain(&primary, cu_dev));
  CU(cuCtxSetCurrent(primary));
  MOLE(mole_device_from_context(primary, &dev));
  MoleDevice *by_ordinal = NULL;
  MOLE(mole_device_create(0, &by_ordinal));
  mole_device_destroy(by_ordinal);

  MoleLayer *layer = NULL;
  st = mole_layer_create(dev, SPEC, "f64", &layer);
  if (st != MOLE_ERROR_INVALID_ARGUMENT) FAIL("dtype f64: %s", mole_status_name(st));
  /* Calls leave the thread's current context as they found it (the CUDA runtime's current
   * device follows it): none here. */
  CU(cuCtxSetCurrent(NULL));
  MOLE(mole_layer_create(dev, SPEC, "f32", &layer));
  CU(cuCtxGetCurrent(&current));
  if (current != NULL) FAIL("mole_layer_create left a context current");
  CU(cuCtxSetCurrent(primary));
  uint32_t sms = 0;
  MOLE(mole_device_sm_count(dev, &sms));
  mole_device_destroy(dev); /* the layer keeps what it needs */

  fill(x, T * D_IN, 0.37, 0.1);
  fill(a, D_IN * R, 0.11, 0.7);
  fill(b, R * D_OUT, 0.23, 0.3);
  fill(y0, T * D_OUT, 0.5, 1.0);
  fill(wg, D_IN * E, 0.7, 0.2);
  fill(dy, T * D_OUT, 0.31, 0.9);
  MoleHostInputs in;
  memset(&in, 0, sizeof in);
  in.x = x, in.x_len = T * D_IN, in.a = a, in.a_len = D_IN * R, in.b = b, in.b_len = R * D_OUT;
  in.y = y0, in.y_len = T * D_OUT, in.router_weight = wg, in.router_weight_len = D_IN * E;
  static float want_y[T * D_OUT], got[T * D_OUT * 4];
  MOLE(mole_reference_forward(SPEC, T, &in, want_y, T * D_OUT, NULL));

  size_t ws_bytes = 0, saved_bytes = 0, bws_bytes = 0;
  MOLE(mole_layer_workspace_bytes(layer, T, &ws_bytes));
  MOLE(mole_layer_saved_bytes(layer, T, &saved_bytes));
  MOLE(mole_layer_backward_workspace_bytes(layer, T, &bws_bytes));
  printf("T = %d: workspace %zu bytes, saved %zu, backward workspace %zu\n", T, ws_bytes, saved_bytes, bws_bytes);
  /* The planner without a GPU gives the layer's sizes, from the device's SM count. */
  MoleLayerSizes planned;
  MOLE(mole_plan_sizes(SPEC, "f32", sms, T, &planned));
  if (planned.workspace_bytes != ws_bytes || planned.saved_bytes != saved_bytes ||
      planned.backward_workspace_bytes != bws_bytes)
    FAIL("mole_plan_sizes on %u SMs gives %zu/%zu/%zu bytes, the layer %zu/%zu/%zu", sms, planned.workspace_bytes,
         planned.saved_bytes, planned.backward_workspace_bytes, ws_bytes, saved_bytes, bws_bytes);
  MOLE(mole_layer_prepare(layer, T, 1));
  CUstream stream = NULL;
  /* A blocking stream: ordered after the legacy stream's copies and memsets. */
  CU(cuStreamCreate(&stream, 0));

  /* Inference forward: y += delta. */
  MoleLayerPointers p;
  memset(&p, 0, sizeof p);
  p.x = upload(x, T * D_IN), p.a = upload(a, D_IN * R), p.b = upload(b, R * D_OUT);
  p.y = upload(y0, T * D_OUT), p.router_weight = upload(wg, D_IN * E);
  p.workspace = poisoned(ws_bytes), p.workspace_bytes = ws_bytes;
  if (ws_bytes > 0) {
    MoleLayerPointers short_ws = p;
    short_ws.workspace_bytes = ws_bytes - 1;
    st = mole_layer_forward(layer, stream, T, &short_ws);
    if (st != MOLE_ERROR_SHAPE_MISMATCH || strstr(mole_last_error_message(), "workspace") == NULL)
      FAIL("a short workspace: %s (%s)", mole_status_name(st), mole_last_error_message());
  }
  /* The forward with another context current: launched in the layer's, that one current after. */
  CUcontext bystander = NULL;
  CU(cuCtxCreate(&bystander, 0, cu_dev));
  MOLE(mole_layer_forward(layer, stream, T, &p));
  CU(cuCtxGetCurrent(&current));
  if (current != bystander) FAIL("mole_layer_forward changed the thread's current context");
  CU(cuCtxDestroy(bystander));
  CU(cuCtxSetCurrent(primary));
  CU(cuStreamSynchronize(stream));
  CU(cuMemcpyDtoH(got, p.y, sizeof(float) * T * D_OUT));
  compare("forward y", got, want_y, T * D_OUT, D_IN + R);

  /* Training forward (y reset), then the backward, from poisoned gradients and workspaces. */
  CU(cuMemcpyHtoD(p.y, y0, sizeof(float) * T * D_OUT));
  p.saved = poisoned(saved_bytes), p.saved_bytes = saved_bytes;
  MOLE(mole_layer_forward(layer, stream, T, &p));
  MoleBackwardPointers bp;
  memset(&bp, 0, sizeof bp);
  bp.x = p.x, bp.a = p.a, bp.b = p.b, bp.router_weight = p.router_weight, bp.dy = upload(dy, T * D_OUT);
  bp.saved = p.saved, bp.saved_bytes = saved_bytes;
  bp.dx = poisoned(sizeof(float) * T * D_IN), bp.da = poisoned(sizeof(float) * D_IN * R);
  bp.db = poisoned(sizeof(float) * R * D_OUT), bp.d_router_weight = poisoned(sizeof(float) * D_IN * E);
  bp.workspace = poisoned(bws_bytes), bp.workspace_bytes = bws_bytes;
  MOLE(mole_layer_backward(layer, stream, T, &bp));
  CU(cuStreamSynchronize(stream));
  CU(cuMemcpyDtoH(got, p.y, sizeof(float) * T * D_OUT));
  compare("training forward y", got, want_y, T * D_OUT, D_IN + R);

  static float gx[T * D_IN], ga[D_IN * R], gb[R * D_OUT], gw[D_IN * E];
  MoleHostGrads g;
  memset(&g, 0, sizeof g);
  g.x = gx, g.x_len = T * D_IN, g.a = ga, g.a_len = D_IN * R, g.b = gb, g.b_len = R * D_OUT;
  g.router_weight = gw, g.router_weight_len = D_IN * E;
  MOLE(mole_reference_backward(SPEC, T, &in, dy, T * D_OUT, &g));
  struct { const char *name; CUdeviceptr dev; const float *want; size_t n; } grads[] = {
      {"dx", bp.dx, gx, T * D_IN}, {"dA", bp.da, ga, D_IN * R},
      {"dB", bp.db, gb, R * D_OUT}, {"d_router_weight", bp.d_router_weight, gw, D_IN * E}};
  static float first[T * D_IN + D_IN * R + R * D_OUT + D_IN * E];
  size_t off = 0;
  for (int i = 0; i < 4; i++) {
    CU(cuMemcpyDtoH(got, grads[i].dev, sizeof(float) * grads[i].n));
    compare(grads[i].name, got, grads[i].want, grads[i].n, T + D_IN + D_OUT + R);
    memcpy(first + off, got, sizeof(float) * grads[i].n);
    off += grads[i].n;
  }

  /* The backward again, on re-poisoned gradients: bit for bit the same. */
  for (int i = 0; i < 4; i++) CU(cuMemsetD8(grads[i].dev, 0xff, sizeof(float) * grads[i].n));
  MOLE(mole_layer_backward(layer, stream, T, &bp));
  CU(cuStreamSynchronize(stream));
  off = 0;
  for (int i = 0; i < 4; i++) {
    CU(cuMemcpyDtoH(got, grads[i].dev, sizeof(float) * grads[i].n));
    if (memcmp(got, first + off, sizeof(float) * grads[i].n) != 0) FAIL("%s differs on a rerun", grads[i].name);
    off += grads[i].n;
  }

  mole_layer_destroy(layer);
  return finish("tests/c/forward_gpu.c");
}
