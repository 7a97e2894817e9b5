"""The f64 reference through the package: the forward against a NumPy recomputation of a
MixLoRA-like layer, the backward against central finite differences of the forward."""

import numpy as np
import pytest

import mole

D_IN, D_OUT, E, RANK, K = 7, 5, 4, 3, 2


def mixlora(bias=True):
    s = mole.spec("mix-lora-per-linear", d_in=D_IN, d_out=D_OUT, experts=E, rank=RANK, k=K, alpha=2.0 * RANK)
    s["gating"]["router"]["bias"] = bias
    return s


def inputs(tokens, rng, bias=True):
    r = E * RANK
    arrays = dict(
        x=rng.standard_normal((tokens, D_IN)),
        a=rng.standard_normal((D_IN, r)) * 0.5,
        b=rng.standard_normal((r, D_OUT)) * 0.5,
        y=rng.standard_normal((tokens, D_OUT)),
        router_weight=rng.standard_normal((D_IN, E)),
    )
    if bias:
        arrays["router_bias"] = rng.standard_normal(E)
    return arrays


def router(x, router_weight, router_bias):
    """The router's logits and softmax probabilities."""
    z = x @ router_weight + router_bias
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return z, p / p.sum(axis=1, keepdims=True)


def numpy_mixlora(s, x, a, b, y, router_weight, router_bias):
    """MixLoRA by hand: softmax router, top-k, weights renormalised over the k, rank columns of
    each selected expert scaled by its weight, expanded, scaled."""
    _, p = router(x, router_weight, router_bias)
    top = np.argsort(-p, axis=1, kind="stable")[:, :K]
    h = x @ a
    mixed = np.zeros_like(h)
    for t in range(x.shape[0]):
        w = p[t, top[t]] / p[t, top[t]].sum()
        for e, we in zip(top[t], w):
            cols = slice(e * RANK, (e + 1) * RANK)
            mixed[t, cols] = we * h[t, cols]
    return y + s["scale"] * mixed @ b, top


def test_forward_matches_numpy_mixlora():
    rng = np.random.default_rng(7)
    s = mixlora()
    arrays = inputs(9, rng)
    out = mole.reference(s, **arrays)
    want, top = numpy_mixlora(s, **arrays)
    assert s["scale"] == 2.0
    assert out["y"].shape == (9, D_OUT) and out["y"].dtype == np.float64
    # Same f64 arithmetic in a different order: agreement to rounding.
    np.testing.assert_allclose(out["y"], want, rtol=1e-12, atol=1e-12)
    # The delta is not negligible: a layer that returned y unchanged would fail above.
    assert np.abs(want - arrays["y"]).max() > 0.1
    assert out["ids"].dtype == np.int32
    assert sorted(map(tuple, np.sort(out["ids"], axis=1))) == sorted(map(tuple, np.sort(top, axis=1)))
    np.testing.assert_allclose(out["weights"].sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(out["h"], arrays["x"] @ arrays["a"], rtol=1e-12, atol=1e-12)


def test_router_statistics_match_numpy():
    rng = np.random.default_rng(11)
    s = mixlora()
    arrays = inputs(16, rng)
    out = mole.reference(s, **arrays)
    _, top = numpy_mixlora(s, **arrays)
    z, p = router(arrays["x"], arrays["router_weight"], arrays["router_bias"])
    chosen = np.zeros_like(p)
    np.put_along_axis(chosen, top, 1.0, axis=1)
    stats = out["stats"]
    np.testing.assert_allclose(stats["selected_fraction"], chosen.mean(axis=0), rtol=1e-12)
    assert stats["selected_fraction"].sum() == pytest.approx(K)
    np.testing.assert_allclose(stats["top1_fraction"], np.bincount(top[:, 0], minlength=E) / 16, rtol=1e-12)
    np.testing.assert_allclose(stats["mean_prob"], p.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats["masked_mean_prob"], (p * chosen).mean(axis=0), rtol=1e-12)
    lse = np.log(np.exp(z - z.max(axis=1, keepdims=True)).sum(axis=1)) + z.max(axis=1)
    assert stats["z_loss"] == pytest.approx((lse**2).mean(), rel=1e-12)
    shannon = -(p * np.log(p)).sum(axis=1) / np.log(E)
    assert stats["entropy"] == pytest.approx(shannon.mean(), rel=1e-12)


def test_forward_takes_any_real_dtype_and_json():
    rng = np.random.default_rng(1)
    s = mixlora(bias=False)
    arrays = inputs(4, rng, bias=False)
    as_f32 = {k: v.astype(np.float32) for k, v in arrays.items()}
    import json

    out = mole.reference(json.dumps(s), **as_f32)
    want = mole.reference(s, **{k: v.astype(np.float64) for k, v in as_f32.items()})
    np.testing.assert_array_equal(out["y"], want["y"])


def loss(s, dy, arrays):
    out = mole.reference(s, **arrays)
    return float((dy * out["y"]).sum() + out["aux_loss"])


def test_backward_matches_finite_differences():
    rng = np.random.default_rng(3)
    s = mixlora()
    s["training"] = {"aux_losses": {"load_balancing": 0.1, "balance": "switch", "z_loss": 0.01}}
    arrays = inputs(3, rng)
    dy = rng.standard_normal((3, D_OUT))
    grads = mole.reference_backward(s, dy=dy, **arrays)
    assert set(grads) == {"x", "a", "b", "router_weight", "router_bias"}
    eps = 1e-6
    checked = 0
    for name, g in grads.items():
        assert g.shape == np.shape(arrays[name])
        flat = arrays[name].reshape(-1)
        for i in range(0, flat.size, max(1, flat.size // 6)):
            plus, minus = dict(arrays), dict(arrays)
            plus[name] = flat.copy()
            plus[name][i] += eps
            minus[name] = flat.copy()
            minus[name][i] -= eps
            plus[name] = plus[name].reshape(arrays[name].shape)
            minus[name] = minus[name].reshape(arrays[name].shape)
            fd = (loss(s, dy, plus) - loss(s, dy, minus)) / (2 * eps)
            # Central differences of an f64 function: error ~ eps² · f''' + rounding / eps.
            assert g.reshape(-1)[i] == pytest.approx(fd, rel=1e-5, abs=1e-6), (name, i)
            checked += 1
    assert checked >= 20


def test_frozen_parameters_have_no_gradient():
    rng = np.random.default_rng(4)
    s = mixlora(bias=False)
    s["training"] = {"frozen": ["a", "router"]}
    arrays = inputs(2, rng, bias=False)
    grads = mole.reference_backward(s, dy=rng.standard_normal((2, D_OUT)), **arrays)
    assert set(grads) == {"x", "b"}
    # The gradients a GPU backward of this spec writes (no GPU needed to ask).
    import json

    assert [n for n, _ in mole._native.gradients(json.dumps(s), "bf16", 2)] == ["x", "b"]
