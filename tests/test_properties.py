"""Property tests over random conv configurations.

For any Conv (1-3 spatial dims, channels, kernel, strides, pads, dilations,
auto_pad, group, bias): ``--rank full`` reproduces it, and a rank-r rewrite
of a group-1 conv costs r·(K·M + M·N) MACs per output pixel.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import conv_model, random_input, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dsrewrite


@st.composite
def conv_configs(draw):
    d = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 1, 2, 3]))
    in_channels = group * draw(st.integers(1, 4))
    out_channels = group * draw(st.integers(1, 4))
    max_k = {1: 5, 2: 4, 3: 3}[d]
    kernel = tuple(draw(st.integers(1, max_k)) for _ in range(d))
    strides = tuple(draw(st.integers(1, 3)) for _ in range(d))
    dilations = tuple(draw(st.integers(1, 2)) for _ in range(d))
    auto_pad = draw(st.sampled_from([None, None, "SAME_UPPER", "SAME_LOWER", "VALID"]))
    pads = None if auto_pad else tuple(draw(st.integers(0, k - 1)) for k in kernel * 2)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        dilations = (1,) * d  # onnxruntime rejects SAME padding with dilation
    spatial_min = [dl * (k - 1) + 1 for k, dl in zip(kernel, dilations)]
    spatial = tuple(draw(st.integers(m, m + {1: 8, 2: 5, 3: 2}[d])) for m in spatial_min)
    return dict(
        in_channels=in_channels, out_channels=out_channels, kernel=kernel, spatial=spatial, group=group,
        bias=draw(st.booleans()), strides=strides, pads=pads, dilations=dilations, auto_pad=auto_pad,
        seed=draw(st.integers(0, 2**16)), batch=draw(st.integers(1, 2)),
    )  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_configs())
def test_full_rank_is_exact(config):
    model = conv_model(**config)
    result = dsrewrite.rewrite(model, rank="full", verify=False)
    (layer,) = result.report.layers
    k = int(np.prod(config["kernel"]))
    if k == 1 or config["in_channels"] == config["group"]:
        assert layer.status == "skipped"
    else:
        assert layer.status == "rewritten", layer.reason
    x, expected = _reference(model, config)
    (actual,) = run(result.model, {"x": x})
    assert actual.shape == expected.shape
    _assert_reproduces(actual, expected)


def _reference(model, config):
    """A seeded input for ``config`` and the original model's output on it."""
    x = random_input((config["batch"], config["in_channels"], *config["spatial"]), seed=config["seed"])
    (expected,) = run(model, {"x": x})
    return x, expected


def _assert_reproduces(actual, expected, **kw):
    """The full-rank oracle's tolerance: relative to the output's scale."""
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, atol=2e-5 * scale, rtol=1e-4, **kw)


@settings(max_examples=40, deadline=None)
@given(conv_configs(), st.integers(1, 4))
def test_rank_r_macs_follow_the_formula(config, rank):
    config = dict(config, group=1, in_channels=max(2, config["in_channels"]))
    model = conv_model(**config)
    result = dsrewrite.rewrite(model, rank=rank, verify=False)
    (layer,) = result.report.layers
    m, n, k = config["in_channels"], config["out_channels"], int(np.prod(config["kernel"]))
    if k == 1:
        assert layer.status == "skipped"
        return
    r = min(rank, n, k)
    per_pixel = r * (k * m + m * n)
    if per_pixel >= m * n * k:
        assert layer.status == "skipped" and "saves no MACs" in layer.reason
        return
    assert layer.status == "rewritten" and layer.rank == r
    assert layer.macs_per_pixel_after == per_pixel
    pixels = layer.macs_before // (m * n * k)
    assert layer.macs_after == per_pixel * pixels
    if r == 1:
        assert layer.macs_after / layer.macs_before == pytest.approx(1 / n + 1 / k, rel=1e-12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_configs())
def test_every_emission_form_at_full_rank_is_exact(config):
    """concat, multiplier and branches (its chain of Adds) compute the same function: each reproduces the conv."""
    import json
    import tempfile

    from dsrewrite.plan import valid_forms

    model = conv_model(**config)
    full = dsrewrite.rewrite(model, rank="full", verify=False)
    (layer,) = full.report.layers
    if layer.status != "rewritten":
        return
    x, expected = _reference(model, config)
    for form in valid_forms(layer.rank, config["group"]):
        plan = {"schema": "dsrewrite.plan/1", "model": {"input": "<ModelProto>"}, "layers": [
            {"output": layer.output, "node": layer.node, "status": "rewritten", "rank": layer.rank, "form": form, "reason": None}
        ]}  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            path = f"{tmp}/plan.json"
            with open(path, "w") as f:
                json.dump(plan, f)
            result = dsrewrite.rewrite(model, plan=path, verify=False, benchmark=False)
        assert result.report.layers[0].form == form
        (actual,) = run(result.model, {"x": x})
        _assert_reproduces(actual, expected, err_msg=form)
