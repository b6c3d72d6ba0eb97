"""Pass-level tests: each pass called directly on a graph, and the pipeline's conditions and instruments."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from conftest import SAMPLES, assert_same_outputs, conv_model, ops, random_input

import dsrewrite
from dsrewrite import lowrank
from dsrewrite.decide import apply_decisions
from dsrewrite.distill import FittedLayer
from dsrewrite.errors import DsrewriteError, InputError, PassError, UsageError
from dsrewrite.graph import collect_shapes
from dsrewrite.passes.decompose_conv import emitted_factors
from dsrewrite.passes import REGISTRY, AnalyseConvs, Cleanup, DecomposeConv, FoldBatchNorm, resolve_passes
from dsrewrite.pipeline import (
    ONNX_CHECKER,
    Change,
    Condition,
    PassBase,
    PassContext,
    PassResult,
    PassTimer,
    Pipeline,
    infer_shapes,
)
from dsrewrite.plan import Decision, Decisions
from dsrewrite.projection import ProjectedFactors


def analysed(model):
    """The plans of ``analyse_convs`` run directly on the model's graph, and that graph."""
    graph = gs.import_onnx(model)
    context = PassContext(shapes=collect_shapes(infer_shapes(model)), opset=17)
    return AnalyseConvs().run(graph, context), graph


# -- analyse_convs --------------------------------------------------------------------------------


def test_analysis_reads_the_graph_and_leaves_it_untouched():
    model = onnx.load(SAMPLES / "resnet_bn.onnx")
    before = gs.export_onnx(gs.import_onnx(model)).SerializeToString()
    result, graph = analysed(model)
    assert gs.export_onnx(graph).SerializeToString() == before
    assert not result.changes and not result.skips
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert [p.output for p in result.facts] == [n.output[0] for n in convs]
    for plan in result.facts:
        assert plan.status == "skipped" and plan.rank is None  # nothing is decided here
        assert plan.macs_before == plan.macs_after and plan.macs_before > 0


def test_analysis_gives_eligible_convs_their_spectrum_error_curve():
    (plan,) = analysed(conv_model(in_channels=4, out_channels=6))[0].facts
    assert plan.eligible and plan.reason is None and plan.full_rank == 6
    assert plan.error_source == "weights" and len(plan.error_at_rank) == 6
    assert plan.error_at_rank[-1] == pytest.approx(0.0, abs=1e-12)  # full rank is exact
    assert all(a >= b for a, b in zip(plan.error_at_rank, plan.error_at_rank[1:]))
    assert "analysis" not in plan.to_dict()  # analysis internals never reach the report


@pytest.mark.parametrize(
    "model, reason",
    [
        (conv_model(kernel=(1, 1)), "1x1 kernel"),
        (conv_model(in_channels=4, out_channels=4, group=4), "already depthwise"),
    ],
)
def test_analysis_says_why_a_conv_is_not_eligible(model, reason):
    (plan,) = analysed(model)[0].facts
    assert not plan.eligible and reason in plan.reason and plan.error_at_rank is None


def test_analysis_applies_the_selection():
    model = conv_model(name="head/conv")
    graph = gs.import_onnx(model)
    context = PassContext(shapes={}, opset=17)
    (plan,) = AnalyseConvs(exclude=("head/*",)).run(graph, context).facts
    assert plan.reason == "excluded by --exclude head/*"
    (plan,) = AnalyseConvs(include=("body/*",)).run(graph, context).facts
    assert plan.reason == "not selected by --include"


# -- decompose_conv emits exactly the plan --------------------------------------------------------


def test_emission_follows_the_decided_plan_rank_and_form():
    model = conv_model(in_channels=8, out_channels=16, pads=(1, 1, 1, 1))
    plans = analysed(model)[0].facts
    apply_decisions(plans, Decisions({"y": Decision(3, form="branches")}))
    outcome = Pipeline([DecomposeConv(plans=plans), Cleanup()]).run(model)
    # Three branches accumulated by two Adds, the new branch first (onnxruntime fuses an Add into its first input's conv).
    assert ops(outcome.model).count("Conv") == 6 and ops(outcome.model).count("Add") == 2 and "Sum" not in ops(outcome.model)
    adds = [n for n in outcome.model.graph.node if n.op_type == "Add"]
    assert adds[0].input[0].endswith("pw1_out") and adds[0].input[1].endswith("pw0_out") and adds[1].output[0] == "y"
    assert outcome.results[0].facts[0] is plans[0]
    assert [c.description for c in outcome.results[0].changes] == ["rank 3 (branches)"]


def test_emission_of_a_full_rank_plan_reproduces_the_outputs():
    model = conv_model(in_channels=5, out_channels=7, strides=(2, 1), pads=(1, 0, 2, 1), dilations=(1, 2))
    plans = analysed(model)[0].facts
    apply_decisions(plans, Decisions({"y": Decision(plans[0].full_rank)}))
    outcome = Pipeline([DecomposeConv(plans=plans), Cleanup()]).run(model)
    assert_same_outputs(model, outcome.model, {"x": random_input((1, 5, 9, 9))}, atol=1e-4)


def test_a_conv_the_plan_leaves_alone_is_kept_with_its_reason():
    model = conv_model()
    plans = analysed(model)[0].facts
    apply_decisions(plans, Decisions({"y": Decision(None, "kept on purpose")}))
    outcome = Pipeline([DecomposeConv(plans=plans)]).run(model)
    assert ops(outcome.model) == ["Conv"]
    assert outcome.results[0].skips[0].reason == "kept on purpose"


def test_standalone_decisions_are_analysed_and_emitted():
    model = conv_model(in_channels=8, out_channels=16, pads=(1, 1, 1, 1))
    outcome = Pipeline([DecomposeConv(decisions=Decisions({"y": Decision(2, form="multiplier")})), Cleanup()]).run(model)
    assert ops(outcome.model) == ["Conv", "Conv"]
    assert outcome.results[0].facts[0].form == "multiplier"


# -- the pipeline: conditions, nesting, instruments ------------------------------------------------


class Marker(PassBase):
    """Renames nothing; records that it ran and what it saw."""

    name = "marker"

    def __init__(self, *, requires=(), ensures=()):
        self.requires, self.ensures, self.seen = tuple(requires), tuple(ensures), []

    def run(self, graph, context):
        self.seen.append(sum(1 for n in graph.nodes if n.op == "Conv"))
        return PassResult(self.name, changes=[Change("", "looked")])


NEVER = Condition("never holds", lambda model: "it never does")


def test_a_broken_ensures_is_an_internal_error_naming_the_pass():
    with pytest.raises(DsrewriteError, match="internal error: the model after pass 'marker' breaks what it ensures"):
        Pipeline([Marker(ensures=[NEVER])]).run(conv_model())


def test_a_broken_requires_is_an_input_error_naming_the_pass():
    with pytest.raises(InputError, match="pass 'marker' requires \\(never holds\\)"):
        Pipeline([Marker(requires=[NEVER])]).run(conv_model())


def test_what_an_earlier_pass_ensures_is_not_required_of_the_input():
    ensured = Condition("ensured", lambda model: None)
    pipeline = Pipeline([Marker(ensures=[ensured]), Marker(requires=[ensured, NEVER])])
    assert pipeline.requires == (NEVER,)
    assert pipeline.ensures == (ensured,)


def test_decompose_conv_ensures_the_onnx_checker():
    assert ONNX_CHECKER in DecomposeConv.ensures
    assert ONNX_CHECKER in Pipeline([FoldBatchNorm(), DecomposeConv(), Cleanup()]).ensures


def test_a_pipeline_is_a_pass_and_nests():
    first, second = Marker(), Marker()
    inner = Pipeline([first, DecomposeConv(rank=1)], name="inner")
    outcome = Pipeline([inner, second, Cleanup()]).run(conv_model(pads=(1, 1, 1, 1)))
    assert [r.pass_name for r in outcome.results] == ["marker", "decompose_conv", "marker", "cleanup"]
    assert first.seen == [1] and second.seen == [2]  # the second marker sees the rewritten graph
    assert ONNX_CHECKER in Pipeline([inner]).ensures


def test_a_failing_pass_names_the_passes_before_it():
    class Broken(PassBase):
        name = "broken"

        def run(self, graph, context):
            raise RuntimeError("boom")

    with pytest.raises(PassError, match="pass 'broken' failed .*passes run before it: marker"):
        Pipeline([Marker(), Broken()]).run(conv_model())


def test_instruments_time_every_pass():
    calls = []

    class Recorder:
        def before_pass(self, p):
            calls.append(("before", p.name))

        def after_pass(self, p, result):
            calls.append(("after", p.name))

    outcome = Pipeline([Marker(), Cleanup()], instruments=[PassTimer(), Recorder()]).run(conv_model())
    assert calls == [("before", "marker"), ("after", "marker"), ("before", "cleanup"), ("after", "cleanup")]
    assert all(r.seconds > 0 for r in outcome.results)


# -- the registry and a user's own pass in rewrite() ----------------------------------------------


def test_the_registry_resolves_names_references_and_objects():
    marker = Marker()
    passes = resolve_passes(["fold_batchnorm", "decompose_conv", "test_passes:Marker", marker])
    assert [p.name for p in passes] == ["fold_batchnorm", "decompose_conv", "marker", "marker"]
    assert passes[-1] is marker and set(REGISTRY) >= {"analyse_convs", "decompose_conv"}
    with pytest.raises(UsageError, match="unknown pass 'nope'"):
        resolve_passes(["nope"])
    with pytest.raises(UsageError, match="cannot load pass"):
        resolve_passes(["no_such_module:Pass"])


def test_a_users_pass_runs_inside_rewrite_and_shows_in_the_report():
    before, after = Marker(), Marker()
    result = dsrewrite.rewrite(
        SAMPLES / "vgg_small.onnx", rank=1, passes=("fold_batchnorm", before, "decompose_conv", after, "cleanup")
    )
    assert [p["name"] for p in result.report.passes] == ["fold_batchnorm", "marker", "decompose_conv", "marker", "cleanup"]
    assert before.seen[0] > 0 and after.seen[0] == 2 * before.seen[0]  # each conv became two
    assert result.ok and result.report.totals.rewritten == before.seen[0]


def test_the_pass_list_must_name_decompose_conv_once():
    with pytest.raises(UsageError, match="must name decompose_conv exactly once"):
        dsrewrite.rewrite(conv_model(), passes=("fold_batchnorm", "cleanup"))


def test_passes_from_the_command_line(tmp_path, tmp_model):
    from conftest import dsrewrite_cli

    path = tmp_model(conv_model(pads=(1, 1, 1, 1)))
    report = tmp_path / "report.json"
    code, _out, err = dsrewrite_cli(
        path, "-o", tmp_path / "slim.onnx", "--rank", "1", "--passes", "decompose_conv,test_passes:Marker",
        "--report", report,
    )  # fmt: skip
    assert code == 0, err
    import json

    assert [p["name"] for p in json.loads(report.read_text())["passes"]] == ["decompose_conv", "marker"]
    code, _out, err = dsrewrite_cli(path, "-o", tmp_path / "x.onnx", "--passes", "cleanup")
    assert code == 2 and err.startswith("error:") and "decompose_conv" in err


def test_option_groups_validate_themselves():
    from dsrewrite.options import CalibrationSettings, LatencySettings, RewriteOptions

    with pytest.raises(UsageError, match="--threads"):
        LatencySettings(threads=0).validate()
    with pytest.raises(UsageError, match="--calibration-samples"):
        CalibrationSettings(samples=0).validate()
    options = RewriteOptions.of(rank=2, calibration="c.npz", threads=2, atol=1e-3, sweep=True)
    assert (options.decompose.rank, options.calibration.data, options.latency.threads) == (2, "c.npz", 2)
    assert options.verify.atol == 1e-3 and options.report.sweep
    with pytest.raises(TypeError, match="unknown rewrite option"):
        RewriteOptions.of(rnak=2)
    settings = options.to_settings()
    assert settings["rank"] == 2 and settings["calibration"] == "c.npz" and settings["threads"] == 2


def test_convs_inside_local_functions_are_inlined_rewritten_and_verified():
    from onnx import TensorProto, helper, numpy_helper

    body = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])]
    function = helper.make_function("custom", "Block", ["x", "W"], ["y"], body, [helper.make_opsetid("", 17)])
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 4, 3, 3)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("Block", ["x", "W"], ["y"], domain="custom", name="block")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 9, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 9, 9])], initializer=[weight],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)],
                              functions=[function])  # fmt: skip
    model.ir_version = 8
    result = dsrewrite.rewrite(model, rank="full")
    (layer,) = result.report.layers
    assert layer.rewritten and layer.macs_before == 8 * 4 * 9 * 81
    assert result.ok and result.report.verification.passed is True  # exact, against the original with its function
    assert any("inlined the model's local functions (1, convs in custom.Block)" in n for n in result.report.notes)
    assert not result.model.functions and len(model.functions) == 1  # the input is untouched


@settings(max_examples=25, deadline=None)
@given(
    groups=st.sampled_from([1, 2]), per_group_in=st.integers(2, 4), per_group_out=st.integers(4, 6),
    rank=st.integers(1, 3), form=st.sampled_from(["concat", "multiplier", "branches", "projected"]),
    bias=st.booleans(), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_emitted_factors_reads_back_exactly_what_emission_laid_out(groups, per_group_in, per_group_out, rank, form, bias, seed):
    """``emitted_factors`` is emission's inverse for every form: trained weights can be read back as factors."""
    if (form == "concat" and groups > 1) or (form == "projected" and groups > 1):
        form = "multiplier"
    m, n = groups * per_group_in, groups * per_group_out
    model = conv_model(in_channels=m, out_channels=n, group=groups, bias=bias, pads=(1, 1, 1, 1), seed=seed % 97)
    plans = analysed(model)[0].facts
    apply_decisions(plans, Decisions({"y": Decision(rank, form=form)}))
    assert plans[0].rewritten and plans[0].rank == rank
    form = plans[0].form  # rank 1 is emitted in one form
    rng = np.random.default_rng(seed)
    f32 = lambda shape: rng.standard_normal(shape).astype(np.float32).astype(np.float64)  # noqa: E731
    if form == "projected":
        factors = ProjectedFactors(f32(m), f32((rank, 9)), f32((n, rank)), (3, 3))
        fitted = FittedLayer(factors.separable(), f32(n), 0, 0, 0, 0, 0, "test", projected=factors)
    else:
        factors = lowrank.SeparableFactors(f32((m, rank, 9)), f32((n, per_group_in, rank)), groups, (3, 3))
        fitted = FittedLayer(factors, f32(n), 0, 0, 0, 0, 0, "test")
    emission = DecomposeConv(plans=plans, fitted={"y": fitted})
    emitted = Pipeline([emission, Cleanup()]).run(model).model
    by_name = {node.name: node for node in emitted.graph.node}
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in emitted.graph.initializer}
    got, got_bias = emitted_factors([by_name[name] for name in emission.emitted["y"]], weights, form)
    if form == "projected":
        for field in ("projection", "depthwise", "pointwise"):
            np.testing.assert_array_equal(getattr(got, field), getattr(factors, field))
    else:
        np.testing.assert_array_equal(got.depthwise, factors.depthwise)
        np.testing.assert_array_equal(got.pointwise, factors.pointwise)
        assert got.groups == groups and got.kernel_shape == (3, 3)
    np.testing.assert_array_equal(got_bias, fitted.bias)
