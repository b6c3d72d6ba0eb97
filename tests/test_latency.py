"""Latency-aware rewriting: form choice, never a slower conv, the MAC target kept, whole-model benchmark."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SAMPLES, conv_model, ops

import dsrewrite
from dsrewrite import latency
from dsrewrite.measure import ConvTimer


@pytest.fixture
def faked(monkeypatch):
    """Install a fake per-conv timer; the in-model profile then attributes nothing, so the fake decides alone."""

    def install(times_by_candidate):
        monkeypatch.setattr(ConvTimer, "candidates", fake_timer(times_by_candidate))
        monkeypatch.setattr(latency, "node_times", lambda *args, **kwargs: {})

    return install


def fake_timer(times_by_candidate):
    """A stand-in for the microbenchmark: fixed times per candidate key ("original", "rank:form")."""

    def measure(timer, plan, input_shape, ranks, forms=None):
        result = {"original": times_by_candidate(plan, "original")}
        for rank in ranks:
            for form in forms or dsrewrite.plan.valid_forms(rank, plan.group):
                result[f"{rank}:{form}"] = times_by_candidate(plan, f"{rank}:{form}")
        return result

    return measure


def test_the_fastest_form_is_emitted(faked):
    faked(lambda p, c: {"original": 1.0}.get(c, 0.5 if c.endswith("branches") else 0.8))
    model = conv_model(in_channels=8, out_channels=16, pads=(1, 1, 1, 1))
    result = dsrewrite.rewrite(model, rank=3, latency_aware=True, verify=False, latency_cache=None)
    (layer,) = result.report.layers
    assert layer.form == "branches" and ops(result.model).count("Add") == 2
    assert (layer.latency_before_ms, layer.latency_after_ms) == (1.0, 0.5)


def test_a_rewrite_that_is_not_faster_is_skipped_with_the_measurement(faked):
    faked(lambda p, c: 1.0 if c == "original" else 0.99)
    model = conv_model(in_channels=8, out_channels=16, pads=(1, 1, 1, 1))
    result = dsrewrite.rewrite(model, rank=2, latency_aware=True, verify=False, latency_cache=None)
    (layer,) = result.report.layers
    assert layer.status == "skipped" and "no faster" in layer.reason and "0.990 ms vs 1.000 ms" in layer.reason
    assert ops(result.model) == ["Conv"]


def test_under_a_mac_target_slower_ranks_are_reallocated_and_the_target_holds(faked):
    # Rank 4 and above of every conv is "slower" than the original; lower ranks are fast.
    faked(lambda p, c: 1.0 if c == "original" else (2.0 if int(c.split(":")[0]) >= 4 else 0.5))
    result = dsrewrite.rewrite(SAMPLES / "vgg_small.onnx", target_macs=0.6, verify=False, latency_cache=None)
    assert result.report.totals.eligible_macs_ratio <= 0.6
    assert all(layer.rank < 4 for layer in result.report.layers if layer.rewritten)


def test_explicit_ranks_are_not_timed_unless_asked():
    options = dsrewrite.RewriteOptions.of(rank=2)
    assert not options.uses_latency()
    assert dsrewrite.RewriteOptions.of().uses_latency()
    assert dsrewrite.RewriteOptions.of(rank=2, target_macs=0.5).uses_latency()


def test_real_microbenchmark_and_its_cache(tmp_path):
    cache_path = tmp_path / "latency.json"
    model = conv_model(in_channels=16, out_channels=32, spatial=(16, 16), pads=(1, 1, 1, 1))
    timing = dict(latency_aware=True, verify=False, latency_cache=cache_path, in_place_timing=False)
    result = dsrewrite.rewrite(model, rank=1, **timing)
    (layer,) = result.report.layers
    assert layer.latency_before_ms > 0
    entries = json.loads(cache_path.read_text())
    assert len(entries) == 2  # the original conv and the rank-1 rewrite
    # Per-conv timing goes through measure_layer; the in-model check's whole-model runs (which confirm a loss at the
    # core count on a loaded machine) are not cached and do not count here.
    calls = []
    original = latency.measure_layer
    latency.measure_layer = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        again = dsrewrite.rewrite(model, rank=1, **timing)
    finally:
        latency.measure_layer = original
    assert not calls, "cached measurements are reused"
    assert again.report.layers[0].latency_before_ms == layer.latency_before_ms


def fake_profile(conv_ms, rewrite_ms):
    """A stand-in for onnxruntime's profiler: the original conv takes ``conv_ms(threads)``, each node of its
    rewrite ``rewrite_ms(threads)``, every other node 0.01 ms."""

    def node_times(model, feed, *, threads=1, runs=20):
        def ms(node):
            if node.op_type == "Conv" and "/" not in node.name:
                return conv_ms(threads)
            return rewrite_ms(threads) if "/" in node.name else 0.01

        return {node.name: (node.op_type, ms(node)) for node in model.graph.node}

    return node_times


def test_a_rank_slower_alone_but_faster_in_place_is_rewritten(monkeypatch):
    # Alone, rank 1 looks slower; inside the model its two convs take 0.2 ms each against the original's 1.0 ms.
    monkeypatch.setattr(ConvTimer, "candidates", fake_timer(lambda p, c: 1.0 if c == "original" else 2.0))
    monkeypatch.setattr(latency, "node_times", fake_profile(lambda t: 1.0, lambda t: 0.2))
    model = conv_model(in_channels=8, out_channels=16, pads=(1, 1, 1, 1))
    result = dsrewrite.rewrite(model, rank=1, latency_aware=True, verify=False, latency_cache=None)
    (layer,) = result.report.layers
    assert layer.rewritten and (layer.latency_before_ms, layer.latency_after_ms) == (1.0, pytest.approx(0.4))
    assert any("in place in the whole model" in note for note in result.report.notes)
    # Alone-only timing keeps the old verdict.
    alone = dsrewrite.rewrite(model, rank=1, latency_aware=True, verify=False, latency_cache=None, in_place_timing=False)
    assert not alone.report.layers[0].rewritten


def test_a_rank_that_pays_at_threads_but_slows_the_model_at_the_core_count_is_reverted(monkeypatch):
    monkeypatch.setattr(ConvTimer, "candidates", fake_timer(lambda p, c: 1.0 if c == "original" else 0.5))
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(4)), raising=False)  # a 4-core process
    # Faster at 1 thread (0.4 vs 1.0 ms), slower at 4 (1.2 vs 1.0 ms), and the whole model confirms it there.
    monkeypatch.setattr(latency, "node_times", fake_profile(lambda t: 1.0, lambda t: 0.2 if t == 1 else 0.6))
    monkeypatch.setattr(latency, "benchmark_models", lambda *a, threads=1, **k: {"speedup": 0.9})
    model = conv_model(in_channels=8, out_channels=16, pads=(1, 1, 1, 1))
    result = dsrewrite.rewrite(model, rank=1, latency_aware=True, verify=False, latency_cache=None)
    (layer,) = result.report.layers
    # The ladder decides at --threads; the in-model check finds the model slower at 4 threads and reverts it.
    assert not layer.rewritten and "slower in the whole model" in layer.reason and "at 4 thread(s)" in layer.reason
    assert any("profiled at 1 thread(s)" in note for note in result.report.notes)
    assert any("1 and 4 thread(s); a rewrite must pay at 1, the rewrites together at 4" in note for note in result.report.notes)


def test_in_place_ladders_on_a_real_model_time_every_conv_in_place():
    result = dsrewrite.rewrite(SAMPLES / "vgg_small.onnx", target_macs=0.6, verify=False, latency_cache=None)
    timed = [layer for layer in result.report.layers if layer.latency_before_ms is not None]
    assert timed and all(layer.in_model_before_ms is not None or not layer.rewritten for layer in timed)
    assert any("in place in the whole model" in note for note in result.report.notes)
    # Within budget, unless the in-model check reverted a rewrite as slower in place (timings move with load).
    reverted = [layer for layer in result.report.layers if not layer.rewritten and "slower" in (layer.reason or "")]
    assert result.report.totals.eligible_macs_ratio <= 0.6 or reverted


def test_benchmark_reports_measured_and_predicted_speedup():
    result = dsrewrite.rewrite(SAMPLES / "vgg_small.onnx", rank=1, benchmark=True)
    bench = result.report.benchmark
    for key in ("latency_before_ms", "latency_after_ms", "speedup", "predicted_speedup", "conv_time_share", "spread_before_ms"):
        assert bench[key] is not None, key
    assert bench["speedup"] == pytest.approx(bench["latency_before_ms"] / bench["latency_after_ms"])
    assert 0 < bench["conv_time_share"] <= 1
    assert json.loads(result.report.to_json())["benchmark"]["speedup"] > 0


def test_interleaved_timing_returns_every_run():
    model = conv_model()
    sessions = [latency.make_session(model, 1), latency.make_session(model, 1)]
    feed = {"x": np.zeros((1, 4, 9, 9), np.float32)}
    times = latency.interleaved_medians(sessions, feed, min_repeats=7, budget_seconds=0.0)
    assert [len(t) for t in times] == [7, 7]


def test_target_latency_allocates_measured_time(faked, monkeypatch):
    # Every rank r costs r/10 of the original conv's time; the model itself takes as long as its convs.
    faked(lambda p, c: 1.0 if c == "original" else 0.1 * int(c.split(":")[0]))
    monkeypatch.setattr(latency, "interleaved_medians", lambda sessions, feed, **kw: [[6.0]] * len(sessions))
    result = dsrewrite.rewrite(SAMPLES / "vgg_small.onnx", target_latency=0.5, verify=False, latency_cache=None)
    layers = [layer for layer in result.report.layers if layer.rewritten]
    predicted = 6.0 - 6 * 1.0 + sum(0.1 * layer.rank for layer in layers) + sum(
        1.0 for layer in result.report.layers if not layer.rewritten
    )
    assert predicted <= 0.5 * 6.0 + 1e-9
    assert any("--target-latency 0.5" in note for note in result.report.notes)
    with pytest.raises(dsrewrite.UsageError):
        dsrewrite.rewrite(SAMPLES / "vgg_small.onnx", target_latency=0.5, target_macs=0.5)


def test_inefficient_but_faster_ranks_fill_the_mac_budget(faked):
    # Rank 1 pays in time; higher ranks are faster than the conv but save far less time than their MACs say.
    faked(lambda p, c: 1.0 if c == "original" else (0.2 if c.startswith("1:") else 0.9))
    result = dsrewrite.rewrite(SAMPLES / "vgg_small.onnx", target_macs=0.5, verify=False, latency_cache=None)
    ratio = result.report.totals.eligible_macs_ratio
    assert 0.49 <= ratio <= 0.5
    # Rank 1 everywhere would be efficient but costs far more estimated error than the faster higher ranks: the
    # preference for efficient ranks gives way, and the notes say so.
    assert any("every rank faster than its conv was a candidate" in note for note in result.report.notes)
    assert any(layer.rank > 1 for layer in result.report.layers if layer.rewritten)


def test_efficient_ranks_are_preferred_when_they_cost_little_error(monkeypatch):
    from dsrewrite import decide

    monkeypatch.setattr(decide, "EFFICIENCY_ERROR_SLACK", float("inf"))  # any error increase is acceptable
    monkeypatch.setattr(ConvTimer, "candidates", fake_timer(lambda p, c: 1.0 if c == "original" else (0.2 if c.startswith("1:") else 0.9)))
    monkeypatch.setattr(latency, "node_times", lambda *args, **kwargs: {})
    result = dsrewrite.rewrite(SAMPLES / "vgg_small.onnx", target_macs=0.5, verify=False, latency_cache=None)
    assert 0.49 <= result.report.totals.eligible_macs_ratio <= 0.5
    assert any(layer.rank == 1 for layer in result.report.layers if layer.rewritten)
    assert any("were only used to fill the budget's remainder" in note for note in result.report.notes)


def test_the_cli_benchmarks_every_written_model_and_warns_when_slower(tmp_path, tmp_model, monkeypatch):
    from conftest import dsrewrite_cli

    path = tmp_model(conv_model(in_channels=8, out_channels=16, pads=(1, 1, 1, 1)))
    report = tmp_path / "r.json"
    code, _out, _err = dsrewrite_cli(path, "-o", tmp_path / "a.onnx", "--rank", "1", "--report", report)
    assert code == 0
    bench = json.loads(report.read_text())["benchmark"]
    assert bench["speedup"] > 0 and bench["latency_before_ms"] > 0
    code, _out, _err = dsrewrite_cli(path, "-o", tmp_path / "b.onnx", "--rank", "1", "--no-benchmark", "--report", report)
    assert code == 0 and "benchmark" not in json.loads(report.read_text())
    code, _out, _err = dsrewrite_cli(path, "--dry-run", "--rank", "1", "--report", report)
    assert code == 0 and "benchmark" not in json.loads(report.read_text())

    real = latency.benchmark_models

    def slower(*args, **kwargs):
        result = real(*args, **kwargs)
        result["latency_after_ms"] = result["latency_before_ms"] / 0.9
        result["speedup"] = 0.9
        return result

    monkeypatch.setattr(latency, "benchmark_models", slower)
    code, out, err = dsrewrite_cli(path, "-o", tmp_path / "c.onnx", "--rank", "1", "--report", report)
    assert code == 0
    assert err.startswith("warning: the rewritten model is slower than the original") and "--latency-aware" in err
    assert any("slower than the original in onnxruntime (0.90x at 1 thread(s))" in note for note in json.loads(report.read_text())["notes"])


def test_quantize_int8_times_in_int8_and_delivers_a_qdq_model(tmp_path, tmp_model):
    from conftest import dsrewrite_cli

    model = conv_model(in_channels=16, out_channels=32, spatial=(16, 16), pads=(1, 1, 1, 1))
    model.opset_import[0].version = 11  # per-channel QDQ needs 13: converted on the way
    path = tmp_model(model)
    calibration = tmp_path / "calib.npz"
    np.savez(calibration, x=np.random.default_rng(0).standard_normal((8, 1, 16, 16, 16)).astype(np.float32))
    report = tmp_path / "r.json"
    code, _out, err = dsrewrite_cli(
        path, "-o", tmp_path / "q.onnx", "--rank", "1", "--calibration", calibration, "--quantize", "int8", "--report", report
    )
    assert code == 0, err
    data = json.loads(report.read_text())
    quantized = __import__("onnx").load(str(tmp_path / "q.onnx"))
    assert {"QuantizeLinear", "DequantizeLinear"} <= set(ops(quantized))
    assert data["settings"]["quantize"] == "int8" and data["settings"]["latency_aware"]
    (layer,) = data["layers"]
    assert layer["latency_before_ms"] is not None  # timed, in INT8
    bench = data["benchmark"]
    if layer["status"] == "skipped":
        assert "INT8" in layer["reason"]
        # The model written is INT8 alone: not timed against itself (that measures only noise), and said so.
        assert bench["rewritten_convs"] == 0 and "speedup_vs_int8_without_rewrite" not in bench
        assert any(note.startswith("no conv rewritten: the model written is INT8 alone") for note in data["notes"])
    else:
        assert bench["latency_int8_without_rewrite_ms"] > 0 and bench["speedup_vs_int8_without_rewrite"] > 0
        share = bench["conv_time_share_int8_without_rewrite"]
        assert 0.0 < share <= 1.0
        assert bench["predicted_speedup_vs_int8_without_rewrite"] == pytest.approx(1 / ((1 - share) + share * bench["macs_ratio"]))
        ceiling = bench["ceiling_vs_int8_without_rewrite"]
        assert ceiling is None if share == 1.0 else ceiling == pytest.approx(1 / (1 - share))
    (output,) = data["verification"]["outputs"]
    assert -1 <= output["cosine"] <= 1 and output["argmax_agreement"] is None  # a 4-D map holds no decisions


def test_with_nothing_rewritten_int8_alone_is_not_timed_against_itself(tmp_path):
    """The model written is then INT8 alone: the report says so and how little any conv rewrite could gain."""
    model = conv_model(in_channels=16, out_channels=32, spatial=(16, 16), pads=(1, 1, 1, 1))
    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 16, 16, 16)).astype(np.float32)} for i in range(4)]
    result = dsrewrite.rewrite(model, plan={"schema": "dsrewrite.plan/1", "layers": []}, calibration=feeds,
                               quantize="int8", benchmark=True)  # fmt: skip
    bench = result.report.benchmark
    assert bench["rewritten_convs"] == 0 and not any(key.startswith("speedup_vs_int8") for key in bench)
    (note,) = [n for n in result.report.notes if n.startswith("no conv rewritten")]
    assert "INT8 alone" in note and "its conv kernels take" in note and "even at zero time they would make it only" in note


def test_quantize_needs_calibration_data(tmp_path, tmp_model):
    from conftest import dsrewrite_cli

    code, _out, err = dsrewrite_cli(tmp_model(conv_model()), "-o", tmp_path / "q.onnx", "--quantize", "int8")
    assert code == 2 and err.startswith("error: --quantize int8 needs --calibration data")


def test_slowness_is_reported_for_every_thread_count_and_reference():
    from dsrewrite.options import RewriteOptions
    from dsrewrite.stages import slowness_warnings

    bench = {
        "threads": 1, "speedup": 1.3, "speedup_2_threads": 0.9, "speedup_vs_int8_without_rewrite": 0.8,
        "speedup_vs_int8_without_rewrite_2_threads": 1.1, "speedup_vs_predicted": 0.1,
    }  # fmt: skip
    warnings = slowness_warnings(bench, RewriteOptions.of(rank=2))
    assert len(warnings) == 2
    assert "slower than the original in onnxruntime (0.90x at 2 thread(s))" in warnings[0]
    assert "slower than the int8 without rewrite in onnxruntime (0.80x at 1 thread(s))" in warnings[1]
    assert all("--latency-aware" in w for w in warnings)
    aware = slowness_warnings(bench, RewriteOptions.of(rank=2, latency_aware=True))
    assert "pass --threads 2" in aware[0] and "a lower --rank" in aware[1]
    assert "--target-macs" in slowness_warnings(bench, RewriteOptions.of(target_macs=0.5))[1]
    quantized = RewriteOptions.of(rank=2, calibration="c.npz", quantize="int8")
    (only,) = slowness_warnings({"threads": 1, "speedup": 0.5, "speedup_vs_int8_without_rewrite": 1.0}, quantized)
    assert "INT8 itself is slower than float32" in only
    # Nothing rewritten: no conv is to blame, and lowering a rank cannot help.
    (only,) = slowness_warnings({"threads": 1, "speedup": 0.9, "rewritten_convs": 0}, RewriteOptions.of(rank=2, latency_aware=True))
    assert "no conv was rewritten" in only and "--rank" not in only
    (only,) = slowness_warnings({"threads": 1, "speedup": 0.5, "rewritten_convs": 0}, quantized)
    assert "INT8 itself is slower than float32" in only


def test_a_reference_with_a_profiled_conv_share_shows_what_any_rewrite_could_gain_over_it():
    from dsrewrite.report.text import comparisons_text

    bench = {
        "threads": 1, "speedup": 2.1, "speedup_vs_int8_without_rewrite": 0.97, "conv_time_share_int8_without_rewrite": 0.245,
        "ceiling_vs_int8_without_rewrite": 1 / 0.755, "speedup_vs_int8_without_rewrite_2_threads": 1.01,
    }  # fmt: skip
    text = comparisons_text(bench)
    assert "0.97× against the int8 without rewrite (its conv kernels are 24% of its time: convs at zero time 1.32×)" in text
    bench["predicted_speedup_vs_int8_without_rewrite"] = 1.1
    assert "(its conv kernels are 24% of its time: MAC-predicted 1.10×, convs at zero time 1.32×)" in comparisons_text(bench)
    assert text.endswith("1.01× against the int8 without rewrite at 2 threads")  # the ceiling once, at the headline count
    assert "zero time" not in comparisons_text({"speedup": 1.0, "speedup_vs_int8_without_rewrite": 1.0})


def test_amdahl_and_the_thread_counts_a_decision_must_pay_at(monkeypatch):
    from dsrewrite.cores import timed_thread_counts

    assert latency.amdahl(0.5, 0.5) == pytest.approx(1 / 0.75)
    assert latency.amdahl(0.245, 0.0) == pytest.approx(1 / 0.755)  # the conv kernels at zero time
    assert latency.amdahl(1.0, 0.0) is None and latency.amdahl(None, 0.5) is None and latency.amdahl(0.5, None) is None
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(4)), raising=False)
    assert timed_thread_counts(1) == [1, 4] and timed_thread_counts(4) == [4]


def test_profiled_node_times_drop_warm_up_runs_and_resist_a_preempted_run():
    from dsrewrite.latency import _per_run

    runs = [9.0, 5.0] + [1.0] * 9 + [40.0]  # two warm-up runs, then one run preempted by another process
    assert _per_run(runs, total_runs=12, warmup=2) == 1.0
    twice = [x for r in runs for x in (r / 2, r / 2)]  # a node in a loop runs twice per run: per-run sums
    assert _per_run(twice, total_runs=12, warmup=2) == 1.0
    assert _per_run([1.0, 2.0, 3.0], total_runs=2, warmup=0) == 3.0  # uneven (a branch): the mean per run
    times = latency.node_times(conv_model(), {"x": np.zeros((1, 4, 9, 9), np.float32)}, runs=3)
    assert [op for op, _ms in times.values()].count("Conv") == 1 and all(ms >= 0 for _op, ms in times.values())


def test_timing_sessions_stop_spinning_when_a_run_returns():
    """Interleaved sessions must not share the cores with each other's idle spinning workers: three identical
    2-thread sessions timed in turn measured 2.3-3.6x slower than one alone before this."""
    from dsrewrite.verify import session

    model = conv_model()
    for sess in (latency.make_session(model, 2), session(model, threads=2, spin=False)):
        assert sess.get_session_options().get_session_config_entry("session.force_spinning_stop") == "1"
    timed = latency.make_session(model, 2).get_session_options()
    with pytest.raises(RuntimeError):  # not set: workers spin inside a run, as deployed
        timed.get_session_config_entry("session.intra_op.allow_spinning")
    assert session(model, spin=False).get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_interleaved_timing_shuffles_the_order_of_every_round():
    """A run is slowed by what ran before it: no session may always follow the same one."""
    log = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def run(self, _outputs, _feed):
            log.append(self.name)

    sessions = [Recorder(name) for name in "abc"]
    times = latency.interleaved_medians(sessions, {}, warmup=0, min_repeats=60, max_repeats=60, budget_seconds=0.0)
    assert [len(t) for t in times] == [60, 60, 60]
    rounds = [tuple(log[i : i + 3]) for i in range(0, len(log), 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)  # every session once per round
    assert len(set(rounds)) > 3  # and not one fixed order
    predecessors = {(log[i - 1], log[i]) for i in range(1, len(log)) if log[i - 1] != log[i]}
    assert len(predecessors) == 6  # each session followed every other one


def test_in_model_times_follow_fusions_and_layout_names_back_to_the_conv():
    from onnx import TensorProto, helper

    from dsrewrite.in_model import in_model_times

    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
        helper.make_node("Mul", ["c", "s"], ["m"], name="scale"),
        helper.make_node("Relu", ["m"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "W2"], ["d"], name="other"),
        helper.make_node("Add", ["d", "r"], ["y"], name="add"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])], [])
    model = helper.make_model(graph)
    times = {"r_nchwc": ("Conv", 1.0), "y_nchwc": ("Conv", 2.0), "ReorderOutput": ("ReorderOutput", 0.5)}
    per_owner, other = in_model_times(model, times, {"c": "A", "d": "B"})
    assert per_owner == {"A": 1.0, "B": 2.0} and other == 0.5  # Conv+Add fused: the conv not seen on its own
    # A fused QDQ node is named after the node, with a token: owners may be keyed by node name too.
    per_owner, other = in_model_times(model, {"conv_token_3": ("QLinearConv", 4.0)}, {"conv": "A"})
    assert per_owner == {"A": 4.0} and other == 0.0


def test_a_rewrite_slower_in_the_whole_model_is_reverted(faked, monkeypatch):
    faked(lambda p, c: 1.0 if c == "original" else 0.5)  # alone, every rewrite pays
    model = conv_model(in_channels=8, out_channels=16, pads=(1, 1, 1, 1))

    def profile(model, feed, **kwargs):  # inside the model, the rewrite costs more than the conv did
        rewritten = any("/dw" in node.name for node in model.graph.node)
        return {node.name: (node.op_type, 1.0) for node in model.graph.node} if rewritten else {"conv": ("Conv", 1.0)}

    monkeypatch.setattr(latency, "node_times", profile)
    # Alone-only decisions, so the final in-model check is what catches it.
    result = dsrewrite.rewrite(model, rank=2, latency_aware=True, verify=False, latency_cache=None, in_place_timing=False)
    (layer,) = result.report.layers
    assert layer.status == "skipped" and "slower in the whole model" in layer.reason
    # Every form was tried first: branches (5 nodes), concat (4), then multiplier (2 nodes: 2.0 ms, still slower).
    assert (layer.in_model_before_ms, layer.in_model_after_ms) == (1.0, 2.0)
    assert ops(result.model) == ["Conv"]
    assert any("1 of 1 rewritten conv(s) timed inside the whole model" in note and "1 reverted" in note for note in result.report.notes)


def test_the_in_model_check_reverts_a_rewrite_that_loses_at_the_core_count(faked, monkeypatch):
    faked(lambda p, c: 1.0 if c == "original" else 0.5)  # alone (at 1 thread), rank 1 pays
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(4)), raising=False)  # a 4-core process
    # In the whole model: 0.4 vs 1.0 ms at 1 thread, 1.2 vs 1.0 ms at 4; the whole model timed there confirms it.
    monkeypatch.setattr(latency, "node_times", fake_profile(lambda t: 1.0, lambda t: 0.2 if t == 1 else 0.6))
    timed_at = []
    monkeypatch.setattr(latency, "benchmark_models", lambda *a, threads=1, **k: timed_at.append(threads) or {"speedup": 0.9})
    model = conv_model(in_channels=8, out_channels=16, pads=(1, 1, 1, 1))
    result = dsrewrite.rewrite(model, rank=1, latency_aware=True, verify=False, latency_cache=None, in_place_timing=False)
    (layer,) = result.report.layers
    assert not layer.rewritten and "slower in the whole model" in layer.reason and "at 4 thread(s)" in layer.reason
    assert "(1.200 ms vs 1.000 ms" in layer.reason  # the losing count's figures
    assert any("1 and 4 thread(s); a rewrite must pay at 1, the rewrites together at 4" in note for note in result.report.notes)
    assert 4 in timed_at


def test_a_loss_the_profile_shows_at_the_core_count_is_confirmed_on_the_whole_model(faked, monkeypatch):
    faked(lambda p, c: 1.0 if c == "original" else 0.5)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(4)), raising=False)
    monkeypatch.setattr(latency, "node_times", fake_profile(lambda t: 1.0, lambda t: 0.2 if t == 1 else 0.6))
    # The profile at 4 threads says slower; the whole model, timed there, runs 1.08x faster: nothing is reverted.
    monkeypatch.setattr(latency, "benchmark_models", lambda *a, threads=1, **k: {"speedup": 1.08})
    model = conv_model(in_channels=8, out_channels=16, pads=(1, 1, 1, 1))
    result = dsrewrite.rewrite(model, rank=1, latency_aware=True, verify=False, latency_cache=None, in_place_timing=False)
    (layer,) = result.report.layers
    assert layer.rewritten
    assert any("the whole model timed 1.08x at 4 thread(s)" in note and "none was reverted" in note for note in result.report.notes)


def test_a_rewrite_slower_in_place_gets_another_form_before_it_is_reverted(faked, monkeypatch):
    faked(lambda p, c: 1.0 if c == "original" else (0.4 if c.endswith("branches") else 0.5))  # alone: branches
    model = conv_model(in_channels=8, out_channels=16, pads=(1, 1, 1, 1))

    def profile(model, feed, **kwargs):  # in place, the Adds of the branches form are slow; concat pays
        def ms(node):
            return 2.0 if node.op_type == "Add" else 0.1 if "/" in node.name else 1.0

        return {node.name: (node.op_type, ms(node)) for node in model.graph.node}

    monkeypatch.setattr(latency, "node_times", profile)
    result = dsrewrite.rewrite(model, rank=2, latency_aware=True, verify=False, latency_cache=None, in_place_timing=False)
    (layer,) = result.report.layers
    assert layer.rewritten and layer.form == "concat" and "Concat" in ops(result.model)
    assert any("1 given another emission form" in note for note in result.report.notes)


def test_a_mac_budget_that_no_faster_rank_can_meet_says_so(faked):
    faked(lambda p, c: 1.0 if c == "original" else 1.5)  # every rewrite is slower
    result = dsrewrite.rewrite(SAMPLES / "vgg_small.onnx", target_macs=0.5, verify=False, latency_cache=None)
    assert not any(layer.rewritten for layer in result.report.layers)
    assert all("no rank measured faster" in layer.reason for layer in result.report.layers if layer.eligible)
    assert any("cannot be met with ranks that are faster than their convs" in n for n in result.report.notes)


def test_a_quantized_model_that_moves_decisions_gets_a_warning():
    from dsrewrite.options import RewriteOptions
    from dsrewrite.stages import fidelity_warnings
    from dsrewrite.verify import OutputComparison, VerificationResult

    def verification(agreement, cosine):
        output = OutputComparison("logits", [1, 10], 1.0, 0.1, 1.0, cosine, True, 1.0, 1.0, True, agreement)
        return VerificationResult(ran=True, passed=None, outputs=[output])

    quantized = RewriteOptions.of(rank=2, calibration="c.npz", quantize="int8")
    (warning,) = fidelity_warnings(verification(0.83, 0.86), quantized)
    assert "argmax agreement 0.830, cosine 0.860" in warning and "before shipping" in warning
    assert fidelity_warnings(verification(0.99, 0.999), quantized) == []
    assert fidelity_warnings(verification(0.5, 0.5), RewriteOptions.of(rank=2)) == []  # float32: the figures speak


def test_available_cores_follows_the_affinity_mask(monkeypatch):
    import os

    from dsrewrite.cores import available_cores

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert available_cores() == 1  # pinned to one core of a 64-core machine

    def unsupported(pid):
        raise AttributeError

    monkeypatch.setattr(os, "sched_getaffinity", unsupported, raising=False)
    assert available_cores() == 64


def test_at_the_core_count_the_rewrites_are_judged_together():
    from types import SimpleNamespace

    from dsrewrite.stages import _slower_in_place

    a, b, c = (SimpleNamespace(output=name) for name in "abc")
    before = {1: {"a": 1.0, "b": 1.0, "c": 1.0}, 2: {"a": 0.6, "b": 0.6, "c": 0.6}}
    # b is 2% slower at 2 threads, but a and c carry it: nothing goes.
    after = {1: {"a": 0.6, "b": 0.6, "c": 0.6}, 2: {"a": 0.4, "b": 0.612, "c": 0.5}}
    assert _slower_in_place([a, b, c], before, after, 1, [1, 2]) == []
    # Together slower at 2 threads: the worst loser there goes first, and only as many as it takes.
    after[2] = {"a": 0.4, "b": 0.9, "c": 0.61}
    assert _slower_in_place([a, b, c], before, after, 1, [1, 2]) == [(b, 2)]
    after[2]["c"] = 0.8
    assert _slower_in_place([a, b, c], before, after, 1, [1, 2]) == [(b, 2), (c, 2)]
    # At --threads each one must pay on its own.
    after[1]["a"] = 0.99
    assert _slower_in_place([a, b, c], before, after, 1, [1]) == [(a, 1)]


def test_the_benchmark_says_at_which_shape_it_timed_dims_nobody_gave():
    """Dynamic dims that neither --input-shape nor calibration set are timed at a default size: the report says
    so, because the speedup depends on them; with --input-shape it does not need to."""
    model = conv_model(in_channels=8, out_channels=8, spatial=("h", "w"), pads=(1, 1, 1, 1))
    guessed = dsrewrite.rewrite(model, rank=1, benchmark=True).report
    assert guessed.benchmark["input_shapes"] == {"x": [1, 8, 64, 64]}
    assert any(note.startswith("latency measured at x 1x8x64x64: the model leaves those dims dynamic") for note in guessed.notes)
    given = dsrewrite.rewrite(model, rank=1, benchmark=True, input_shapes={"x": [1, 8, 32, 32]}).report
    assert given.benchmark["input_shapes"] == {"x": [1, 8, 32, 32]}
    assert not any(note.startswith("latency measured at") for note in given.notes)
