"""Buffer sizes planned without a GPU: the routing a training forward saves, laid out as the
runtime documents it (an int32 expert id and an f32 weight per token and slot, each region a
whole number of 256-byte blocks), the strategy's dependence on the token count, and the errors."""

import math

import pytest

import mole

K = 2


def mixlora():
    return mole.spec("mix-lora-per-linear", d_in=256, d_out=192, experts=8, rank=8, k=K)


def region(nbytes):
    return math.ceil(nbytes / 256) * 256


@pytest.mark.parametrize("tokens", [1, 37, 4096])
def test_saved_routing_is_ids_and_weights_per_token_and_slot(tokens):
    sizes = mole.plan_sizes(mixlora(), tokens, sm_count=132)
    assert sizes["saved_bytes"] == 2 * region(4 * tokens * K)
    assert all(v % 256 == 0 for v in sizes.values()), sizes
    assert sizes["backward_workspace_bytes"] > 0


def test_sizes_follow_the_token_count_and_the_preset_form():
    small, large = (mole.plan_sizes(mixlora(), t, sm_count=132, dtype="f32") for t in (16, 16384))
    assert large["saved_bytes"] > small["saved_bytes"]
    assert large["backward_workspace_bytes"] > small["backward_workspace_bytes"]
    by_name = mole.plan_sizes("mix-lora-per-linear", 16, 132, "f32", d_in=256, d_out=192, experts=8, rank=8, k=K)
    assert by_name == small


def test_plan_errors():
    with pytest.raises(mole.InvalidValueError, match="sm_count"):
        mole.plan_sizes(mixlora(), 16, sm_count=0)
    with pytest.raises(mole.SpecError, match="tokens"):
        mole.plan_sizes(mixlora(), 0, sm_count=132)
    with pytest.raises(mole.DTypeError, match="f64"):
        mole.plan_sizes(mixlora(), 16, sm_count=132, dtype="f64")
    bad = mixlora()
    bad["gating"]["rule"]["kk"] = 2
    with pytest.raises(mole.SpecError, match="gating.rule.kk"):
        mole.plan_sizes(bad, 16, sm_count=132)
