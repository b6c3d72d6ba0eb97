"""The onnx wheel's own Conv conformance cases (pytorch-converted), rewritten at full rank.

Each case ships a model, an input and the expected output. The rewritten model
must reproduce the expected output; grouped cases are rewritten, depthwise
cases are skipped with a reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run
from onnx import numpy_helper

import dsrewrite

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data" / "pytorch-converted"
CASES = sorted(p.name for p in DATA.glob("test_Conv*") if not p.name.startswith("test_ConvTranspose"))


def load_case(name):
    case = DATA / name
    model = onnx.load(str(case / "model.onnx"))
    tensors = []
    for stem in ("input_0", "output_0"):
        proto = onnx.TensorProto()
        proto.ParseFromString((case / "test_data_set_0" / f"{stem}.pb").read_bytes())
        tensors.append(numpy_helper.to_array(proto))
    return model, tensors[0], tensors[1]


def test_the_cases_are_there():
    assert len(CASES) >= 20


@pytest.mark.parametrize("name", CASES)
def test_full_rank_rewrite_reproduces_the_expected_output(name):
    model, x, expected = load_case(name)
    result = dsrewrite.rewrite(model, rank="full")
    (layer,) = result.report.layers
    if "depthwise" in name:
        assert layer.status == "skipped" and "depthwise" in layer.reason
    else:
        assert layer.status == "rewritten", layer.reason
        assert "Conv" in [n.op_type for n in result.model.graph.node]
        assert len(result.model.graph.node) >= 2
    assert result.verification.passed
    input_name = next(i.name for i in result.model.graph.input if i.name not in {t.name for t in result.model.graph.initializer})
    (actual,) = run(result.model, {input_name: x})
    np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=1e-4)
