"""Decision strategies, called directly on analysed plans (no rewrite around them)."""

from __future__ import annotations

import onnx
from conftest import SAMPLES



def _plans(model_path):
    import onnx_graphsurgeon as gs

    from dsrewrite.graph import collect_shapes
    from dsrewrite.passes import AnalyseConvs
    from dsrewrite.pipeline import PassContext, infer_shapes

    model = onnx.load(model_path)
    context = PassContext(shapes=collect_shapes(infer_shapes(model)), opset=17)
    return AnalyseConvs().run(gs.import_onnx(model), context).facts


def test_uniform_rank_strategy_skips_ranks_that_save_nothing():
    from dsrewrite.decide import UniformRank

    plans = _plans(SAMPLES / "vgg_small.onnx")
    decisions = UniformRank(64).decide(plans)
    for plan in plans:
        if plan.eligible:
            decision = decisions.layers[plan.output]
            assert decision.rank is None and "saves no MACs" in decision.reason
    assert all(d.rank == p.full_rank for p, d in zip([p for p in plans if p.eligible], UniformRank("full").decide(plans).layers.values()))


def test_mac_budget_strategy_meets_its_target_and_apply_writes_the_costs():
    from dsrewrite.decide import MacBudget, apply_decisions
    from dsrewrite.report import compute_totals

    plans = _plans(SAMPLES / "vgg_small.onnx")
    decisions = MacBudget(0.4).decide(plans)
    assert decisions.notes[0].startswith("--target-macs 0.4")
    apply_decisions(plans, decisions)
    assert compute_totals(plans).eligible_macs_ratio <= 0.4
    assert all(p.weight_error is not None and p.form for p in plans if p.rewritten)


def test_never_slower_reverts_what_does_not_pay(monkeypatch):
    from dsrewrite.decide import NeverSlower, UniformRank
    from dsrewrite.measure import RankTimings

    plans = _plans(SAMPLES / "vgg_small.onnx")
    eligible = [p for p in plans if p.eligible]
    slow = eligible[0].output

    class Timer:
        def at_ranks(self, plans, ranks, forms=None):
            return {p.output: RankTimings(1.0, {ranks[p.output]: ("concat", 2.0 if p.output == slow else 0.5)}) for p in plans}

    class Measured:
        timer = Timer()
        where = "onnxruntime"

        def describe(self, timings):
            return f"{len(timings)} conv(s) timed"

    decisions = NeverSlower(UniformRank(1)).decide(plans, Measured())
    assert decisions.layers[slow].rank is None and "no faster" in decisions.layers[slow].reason
    assert all(decisions.layers[p.output].rank == 1 for p in eligible[1:])
    assert decisions.layers[eligible[1].output].latency_ms == (1.0, 0.5)


def test_saved_plan_strategy_names_unknown_convs_and_leaves_the_rest():
    from dsrewrite.decide import SavedPlan

    plans = _plans(SAMPLES / "vgg_small.onnx")
    document = {"schema": "dsrewrite.plan/1", "layers": [{"output": "ghost", "status": "rewritten", "rank": 1}]}
    decisions = SavedPlan.from_document(document).decide(plans)
    assert "1 conv(s) this model does not have" in decisions.notes[0]
    assert decisions.default_reason == "not in the plan"
