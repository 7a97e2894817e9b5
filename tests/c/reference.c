/* The C ABI from C, without a GPU (scripts/test.sh compiles it with `cc` against libmole.a and runs
 * it): the f64 reference of a small MixLoRA-style layer against a naive C loop, its backward's dB
 * against the naive product, every error path (bad JSON naming the field, wrong sizes, null
 * pointers, missing and unexpected tensors, a frozen parameter's gradient) with nothing written on
 * failure, the buffer sizes of a layer planned without a GPU, and device creation failing with a
 * clear status where there is no GPU. */
#include "mole.h"
#include "check.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define T 4
#define D_IN 6
#define D_OUT 5
#define E 3
#define RANK 2
#define R (E * RANK)
#define K 2
#define SCALE 0.5

/* `call` returns `want` and the last message contains `needle` (empty after MOLE_OK). */
#define EXPECT(call, want, needle)                                                                 \
  do {                                                                                             \
    mole_status got_ = (call);                                                                     \
    const char *msg_ = mole_last_error_message();                                                  \
    if (got_ != (want))                                                                            \
      FAIL("%s: got %s, want %s (%s)", #call, mole_status_name(got_), mole_status_name(want), msg_); \
    else if ((want) == MOLE_OK && msg_[0] != '\0')                                                 \
      FAIL("%s: MOLE_OK with a message: %s", #call, msg_);                                         \
    else if (strstr(msg_, (needle)) == NULL)                                                       \
      FAIL("%s: the message does not say \"%s\": %s", #call, (needle), msg_);                       \
  } while (0)

static const char *SPEC =
    "{\"d_in\": 6, \"d_out\": 5, \"ranks\": {\"experts\": 3, \"rank\": 2}, \"scale\": 0.5,"
    " \"gating\": {\"type\": \"routed\", \"router\": {\"type\": \"x\", \"bias\": false},"
    "  \"rule\": {\"type\": \"softmax_topk\", \"k\": 2, \"weights\": \"renormalized\"}}}";

static const char *SPEC_FROZEN_A =
    "{\"d_in\": 6, \"d_out\": 5, \"ranks\": {\"experts\": 3, \"rank\": 2}, \"scale\": 0.5,"
    " \"gating\": {\"type\": \"routed\", \"router\": {\"type\": \"x\", \"bias\": false},"
    "  \"rule\": {\"type\": \"softmax_topk\", \"k\": 2, \"weights\": \"renormalized\"}},"
    " \"training\": {\"frozen\": [\"a\"]}}";

/* A misspelled field two levels down. */
static const char *SPEC_TYPO =
    "{\"d_in\": 6, \"d_out\": 5, \"ranks\": {\"experts\": 3, \"rank\": 2}, \"scale\": 0.5,"
    " \"gating\": {\"type\": \"routed\", \"router\": {\"type\": \"x\", \"bias\": false},"
    "  \"rule\": {\"type\": \"softmax_topk\", \"k\": 2, \"weigths\": \"renormalized\"}}}";

static float x[T * D_IN], a[D_IN * R], b[R * D_OUT], y0[T * D_OUT], wg[D_IN * E], dy[T * D_OUT];

static void fill(float *v, size_t n, double step, double phase) {
  for (size_t i = 0; i < n; i++) v[i] = (float)sin(phase + step * (double)i);
}

/* The layer by hand: h = x·A, z = x·W_g, softmax, top-K (ties to the lower expert), weights
 * renormalised over the selected, h' = h with expert e's columns times w_e, y = y0 + s·h'·B.
 * Also h' itself, for dB = s·h'ᵀ·dy. */
static void naive(double *y, double *hm) {
  for (int t = 0; t < T; t++) {
    double h[R], z[E], p[E], sum = 0.0, zmax = -INFINITY;
    for (int c = 0; c < R; c++) {
      h[c] = 0.0;
      for (int i = 0; i < D_IN; i++) h[c] += (double)x[t * D_IN + i] * a[i * R + c];
    }
    for (int e = 0; e < E; e++) {
      z[e] = 0.0;
      for (int i = 0; i < D_IN; i++) z[e] += (double)x[t * D_IN + i] * wg[i * E + e];
      if (z[e] > zmax) zmax = z[e];
    }
    for (int e = 0; e < E; e++) sum += (p[e] = exp(z[e] - zmax));
    for (int e = 0; e < E; e++) p[e] /= sum;
    int chosen[E] = {0};
    double w[E] = {0}, wsum = 0.0;
    for (int s = 0; s < K; s++) {
      int best = -1;
      for (int e = 0; e < E; e++)
        if (!chosen[e] && (best < 0 || p[e] > p[best])) best = e;
      chosen[best] = 1;
      wsum += p[best];
    }
    for (int e = 0; e < E; e++) w[e] = chosen[e] ? p[e] / wsum : 0.0;
    for (int c = 0; c < R; c++) hm[t * R + c] = h[c] * w[c / RANK];
    for (int o = 0; o < D_OUT; o++) {
      double acc = 0.0;
      for (int c = 0; c < R; c++) acc += hm[t * R + c] * b[c * D_OUT + o];
      y[t * D_OUT + o] = y0[t * D_OUT + o] + SCALE * acc;
    }
  }
}

/* f32 results of an f64 computation: within a rounding of the value (plus the f64 sums' order,
 * far below it) of the naive f64 loop. */
static void compare(const char *what, const float *got, const double *want, size_t n) {
  for (size_t i = 0; i < n; i++) {
    double tol = 2.0 * ldexp(fabs(want[i]), -24) + 1e-12;
    if (!(fabs(got[i] - want[i]) <= tol)) {
      FAIL("%s[%zu] = %.9g, the naive loop gives %.9g (tolerance %.3g)", what, i, got[i], want[i], tol);
      return;
    }
  }
}

static MoleHostInputs inputs(void) {
  MoleHostInputs in;
  memset(&in, 0, sizeof in);
  in.x = x, in.x_len = T * D_IN;
  in.a = a, in.a_len = D_IN * R;
  in.b = b, in.b_len = R * D_OUT;
  in.y = y0, in.y_len = T * D_OUT;
  in.router_weight = wg, in.router_weight_len = D_IN * E;
  return in;
}

static int all_nan(const float *v, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (!isnan(v[i])) return 0;
  return 1;
}

static void poison(float *v, size_t n) {
  for (size_t i = 0; i < n; i++) v[i] = NAN;
}

int main(void) {
  fill(x, T * D_IN, 0.37, 0.1);
  fill(a, D_IN * R, 0.11, 0.7);
  fill(b, R * D_OUT, 0.23, 0.3);
  fill(y0, T * D_OUT, 0.5, 1.0);
  fill(wg, D_IN * E, 0.7, 0.2);
  fill(dy, T * D_OUT, 0.31, 0.9);
  double want_y[T * D_OUT], hm[T * R];
  naive(want_y, hm);

  /* The reference forward against the naive loop, from NaN-poisoned outputs. */
  MoleHostInputs in = inputs();
  float y[T * D_OUT];
  double aux = NAN;
  poison(y, T * D_OUT);
  EXPECT(mole_reference_forward(SPEC, T, &in, y, T * D_OUT, &aux), MOLE_OK, "");
  compare("y", y, want_y, T * D_OUT);
  if (aux != 0.0) FAIL("aux_loss = %g without auxiliary losses", aux);

  /* The backward: dB = scale · h'ᵀ · dy (the selection held constant), and every gradient the
   * layer trains written (poisoned first). */
  float gx[T * D_IN], ga[D_IN * R], gb[R * D_OUT], gw[D_IN * E];
  poison(gx, T * D_IN), poison(ga, D_IN * R), poison(gb, R * D_OUT), poison(gw, D_IN * E);
  MoleHostGrads g;
  memset(&g, 0, sizeof g);
  g.x = gx, g.x_len = T * D_IN, g.a = ga, g.a_len = D_IN * R, g.b = gb, g.b_len = R * D_OUT;
  g.router_weight = gw, g.router_weight_len = D_IN * E;
  EXPECT(mole_reference_backward(SPEC, T, &in, dy, T * D_OUT, &g), MOLE_OK, "");
  double want_db[R * D_OUT];
  for (int c = 0; c < R; c++)
    for (int o = 0; o < D_OUT; o++) {
      double acc = 0.0;
      for (int t = 0; t < T; t++) acc += hm[t * R + c] * dy[t * D_OUT + o];
      want_db[c * D_OUT + o] = SCALE * acc;
    }
  compare("dB", gb, want_db, R * D_OUT);
  for (size_t i = 0; i < T * D_IN; i++)
    if (!isfinite(gx[i])) FAIL("dx[%zu] = %g after the backward", i, gx[i]);
  for (size_t i = 0; i < D_IN * E; i++)
    if (!isfinite(gw[i])) FAIL("d_router_weight[%zu] = %g after the backward", i, gw[i]);

  /* Bad JSON: a misspelled field is named with its path; text that is no JSON says so. */
  EXPECT(mole_reference_forward(SPEC_TYPO, T, &in, y, T * D_OUT, NULL), MOLE_ERROR_INVALID_SPEC, "gating.rule.weigths");
  EXPECT(mole_reference_forward("{\"d_in\": 6,", T, &in, y, T * D_OUT, NULL), MOLE_ERROR_INVALID_SPEC, "not valid JSON");

  /* Wrong sizes, each named; the output is left as it was (poisoned). */
  poison(y, T * D_OUT);
  MoleHostInputs bad = in;
  bad.x_len = T * D_IN - 1;
  EXPECT(mole_reference_forward(SPEC, T, &bad, y, T * D_OUT, NULL), MOLE_ERROR_SHAPE_MISMATCH, "x: expected shape [4, 6]");
  bad = in;
  bad.router_weight_len = D_IN * E + 1;
  EXPECT(mole_reference_forward(SPEC, T, &bad, y, T * D_OUT, NULL), MOLE_ERROR_SHAPE_MISMATCH, "router_weight");
  EXPECT(mole_reference_forward(SPEC, T, &in, y, T * D_OUT - 1, NULL), MOLE_ERROR_SHAPE_MISMATCH, "y_out");
  EXPECT(mole_reference_forward(SPEC, T + 1, &in, y, T * D_OUT, NULL), MOLE_ERROR_SHAPE_MISMATCH, "x: expected shape [5, 6]");
  EXPECT(mole_reference_backward(SPEC, T, &in, dy, T * D_OUT - 2, &g), MOLE_ERROR_SHAPE_MISMATCH, "dy");
  if (!all_nan(y, T * D_OUT)) FAIL("a failed call wrote y_out");

  /* Null pointers, each named. */
  EXPECT(mole_reference_forward(NULL, T, &in, y, T * D_OUT, NULL), MOLE_ERROR_NULL_POINTER, "spec_json");
  EXPECT(mole_reference_forward(SPEC, T, NULL, y, T * D_OUT, NULL), MOLE_ERROR_NULL_POINTER, "inputs");
  EXPECT(mole_reference_forward(SPEC, T, &in, NULL, T * D_OUT, NULL), MOLE_ERROR_NULL_POINTER, "y_out");
  bad = in;
  bad.x = NULL;
  EXPECT(mole_reference_forward(SPEC, T, &bad, y, T * D_OUT, NULL), MOLE_ERROR_NULL_POINTER, "`x` is null but its count is 24");
  EXPECT(mole_reference_backward(SPEC, T, &in, dy, T * D_OUT, NULL), MOLE_ERROR_NULL_POINTER, "grads");

  /* Missing and unexpected tensors. */
  bad = in;
  bad.router_weight = NULL, bad.router_weight_len = 0;
  EXPECT(mole_reference_forward(SPEC, T, &bad, y, T * D_OUT, NULL), MOLE_ERROR_MISSING_INPUT, "router_weight");
  bad = in;
  bad.logits = wg, bad.logits_len = T * E;
  EXPECT(mole_reference_forward(SPEC, T, &bad, y, T * D_OUT, NULL), MOLE_ERROR_UNEXPECTED_INPUT, "logits");
  if (!all_nan(y, T * D_OUT)) FAIL("a failed call wrote y_out");

  /* A frozen parameter's gradient is refused (nothing written), and left out it is fine. */
  poison(gb, R * D_OUT);
  EXPECT(mole_reference_backward(SPEC_FROZEN_A, T, &in, dy, T * D_OUT, &g), MOLE_ERROR_UNEXPECTED_INPUT, "grads.a");
  if (!all_nan(gb, R * D_OUT)) FAIL("a refused backward wrote dB");
  g.a = NULL, g.a_len = 0;
  EXPECT(mole_reference_backward(SPEC_FROZEN_A, T, &in, dy, T * D_OUT, &g), MOLE_OK, "");
  compare("dB (A frozen)", gb, want_db, R * D_OUT);
  g.a = ga, g.a_len = D_IN * R, g.b = NULL, g.b_len = 0;
  EXPECT(mole_reference_backward(SPEC, T, &in, dy, T * D_OUT, &g), MOLE_ERROR_NULL_POINTER, "grads.b");

  /* The planner without a GPU: the sizes a layer on a 132-SM GPU asks for. The saved routing
   * holds an int32 expert id and an f32 weight per token and slot; every size is a whole number of
   * 256-byte regions; the saved routing and the backward's workspace grow with the tokens (the
   * forward's workspace depends on the strategy: the single fused kernel needs none); a failed
   * call writes nothing. */
  MoleLayerSizes sizes, big, kept = {7, 7, 7};
  EXPECT(mole_plan_sizes(SPEC, "bf16", 132, T, &sizes), MOLE_OK, "");
  EXPECT(mole_plan_sizes(SPEC, "bf16", 132, 4096, &big), MOLE_OK, "");
  printf("planned on 132 SMs: T = %d: workspace %zu bytes, saved %zu, backward workspace %zu;"
         " T = 4096: %zu, %zu, %zu\n", T, sizes.workspace_bytes, sizes.saved_bytes,
         sizes.backward_workspace_bytes, big.workspace_bytes, big.saved_bytes, big.backward_workspace_bytes);
  if (sizes.saved_bytes < 8 * T * K || big.saved_bytes < 8 * 4096 * K) FAIL("the saved routing does not fit");
  if (sizes.backward_workspace_bytes == 0) FAIL("a backward workspace of 0 bytes");
  if ((sizes.workspace_bytes | sizes.saved_bytes | sizes.backward_workspace_bytes | big.workspace_bytes |
       big.saved_bytes | big.backward_workspace_bytes) % 256 != 0)
    FAIL("a size is not a whole number of 256-byte regions");
  if (big.saved_bytes <= sizes.saved_bytes || big.backward_workspace_bytes <= sizes.backward_workspace_bytes)
    FAIL("4096 tokens need less than %d", T);
  MoleLayerSizes out = kept;
  EXPECT(mole_plan_sizes(SPEC, "f64", 132, T, &out), MOLE_ERROR_INVALID_ARGUMENT, "dtype");
  EXPECT(mole_plan_sizes(SPEC, "bf16", 0, T, &out), MOLE_ERROR_INVALID_ARGUMENT, "sm_count");
  EXPECT(mole_plan_sizes(SPEC, "bf16", 132, 0, &out), MOLE_ERROR_INVALID_ARGUMENT, "tokens");
  EXPECT(mole_plan_sizes(SPEC_TYPO, "bf16", 132, T, &out), MOLE_ERROR_INVALID_SPEC, "gating.rule.weigths");
  EXPECT(mole_plan_sizes(SPEC, NULL, 132, T, &out), MOLE_ERROR_NULL_POINTER, "dtype");
  EXPECT(mole_plan_sizes(SPEC, "bf16", 132, T, NULL), MOLE_ERROR_NULL_POINTER, "out");
  if (memcmp(&out, &kept, sizeof out) != 0) FAIL("a failed mole_plan_sizes wrote its output");

  /* A device: without a GPU a clear status, never a crash; a layer needs a device. */
  MoleDevice *dev = NULL;
  mole_status st = mole_device_create(0, &dev);
  if (st == MOLE_OK) {
    printf("a GPU is present: the device path is tested by tests/c/forward_gpu.c\n");
    MoleLayer *layer = NULL;
    EXPECT(mole_layer_create(dev, SPEC, "f64", &layer), MOLE_ERROR_INVALID_ARGUMENT, "dtype");
    mole_device_destroy(dev);
  } else {
    const char *msg = mole_last_error_message();
    if (st != MOLE_ERROR_NO_CUDA_DRIVER && st != MOLE_ERROR_CUDA) FAIL("mole_device_create without a GPU: %s (%s)", mole_status_name(st), msg);
    if (strlen(msg) < 20) FAIL("mole_device_create without a GPU: no clear message: \"%s\"", msg);
    if (dev != NULL) FAIL("a failed mole_device_create set its output");
    printf("no GPU: mole_device_create says %s: %s\n", mole_status_name(st), msg);
  }
  MoleLayer *layer = NULL;
  EXPECT(mole_layer_create(NULL, SPEC, "bf16", &layer), MOLE_ERROR_NULL_POINTER, "device");
  EXPECT(mole_device_create(-1, &dev), MOLE_ERROR_INVALID_ARGUMENT, "ordinal");
  EXPECT(mole_device_from_context(NULL, &dev), MOLE_ERROR_NULL_POINTER, "context");
  size_t bytes = 0;
  EXPECT(mole_layer_workspace_bytes(NULL, T, &bytes), MOLE_ERROR_NULL_POINTER, "layer");
  uint32_t sms = 0;
  EXPECT(mole_device_sm_count(NULL, &sms), MOLE_ERROR_NULL_POINTER, "device");
  EXPECT(mole_layer_forward(NULL, NULL, T, NULL), MOLE_ERROR_NULL_POINTER, "layer");
  mole_layer_destroy(NULL);
  mole_device_destroy(NULL);
  if (strcmp(mole_status_name(MOLE_ERROR_SHAPE_MISMATCH), "MOLE_ERROR_SHAPE_MISMATCH") != 0 ||
      strcmp(mole_status_name(999), "MOLE_UNKNOWN_STATUS") != 0)
    FAIL("mole_status_name");

  return finish("tests/c/reference.c");
}
