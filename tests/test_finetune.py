"""Distillation fine-tuning: what is trained, against what, the losses, the write-back and the missing-stack error.

The light tests run without the training stack (a stand-in trainer checks the plumbing from the rewrite to the
written model); the tests that train for real need torch and onnx2torch and are marked ``slow``.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import onnx
import pytest
from conftest import SAMPLES, conv_model, dsrewrite_cli, random_input, run
from onnx import TensorProto, helper, numpy_helper

import dsrewrite
from dsrewrite import finetune, finetune_torch
from dsrewrite.errors import UsageError

HAS_STACK = all(importlib.util.find_spec(name) is not None for name in finetune.STACK_MODULES)
needs_stack = pytest.mark.skipif(not HAS_STACK, reason="the finetune extra (torch, onnx2torch) is not installed")


def vgg_feeds(count: int = 8, seed: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"input": rng.standard_normal((1, 3, 64, 64)).astype(np.float32)} for _ in range(count)]


def small_net(seed: int = 0) -> onnx.ModelProto:
    """x (1, 8, 10, 10) → Conv 3×3 → Relu → Conv 3×3 → Relu → GlobalAveragePool → Flatten → Gemm → logits."""
    rng = np.random.default_rng(seed)

    def tensor(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32), name)

    weights = [tensor("w1", 12, 8, 3, 3), tensor("b1", 12), tensor("w2", 12, 12, 3, 3), tensor("fc", 12, 5)]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 10, 10])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 5])], initializer=weights,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def small_feeds(count: int = 8, seed: int = 3) -> list[dict[str, np.ndarray]]:
    """Inputs from a 6-dimensional subspace: data with structure, so what training learns holds out (on white
    noise a few dozen feeds leave nothing to generalise from)."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(99).standard_normal((6, 8, 10, 10)).astype(np.float32)
    return [{"x": np.tensordot(rng.standard_normal(6).astype(np.float32), basis, 1)[None]} for _ in range(count)]


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# -- without the stack ----------------------------------------------------------------------------


def test_missing_stack_is_one_error_line_naming_the_extra(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(UsageError, match=r'pip install "dsrewrite\[finetune\]"'):
        finetune.require_stack()
    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, input=np.zeros((2, 3, 64, 64), np.float32))
    code, out, err = dsrewrite_cli(SAMPLES / "vgg_small.onnx", "-o", tmp_path / "slim.onnx", "--rank", "1",
                                   "--calibration", feeds, "--finetune-steps", "3")  # fmt: skip
    assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert "dsrewrite[finetune]" in err and "Traceback" not in out + err
    assert not (tmp_path / "slim.onnx").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--finetune-steps", "3"], "--calibration"),
        (["--finetune-seconds", "-1", "--calibration", "FEEDS"], "--finetune-seconds"),
        (["--finetune-steps", "0", "--calibration", "FEEDS"], "--finetune-steps"),
        (["--finetune-lr", "0", "--finetune-steps", "2", "--calibration", "FEEDS"], "--finetune-lr"),
    ],
)
def test_bad_finetune_options_exit_2(tmp_path, args, message):
    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, input=np.zeros((2, 3, 64, 64), np.float32))
    args = [str(feeds) if a == "FEEDS" else a for a in args]
    code, out, err = dsrewrite_cli(SAMPLES / "vgg_small.onnx", "-o", tmp_path / "slim.onnx", "--rank", "1", *args)
    assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert message in err
    assert not (tmp_path / "slim.onnx").exists()


def test_losses_are_zero_at_the_original_and_scale_free():
    rng = np.random.default_rng(0)
    teacher = rng.standard_normal((4, 10))
    assert finetune.normalised_mse(teacher, teacher, teacher.var()) == 0.0
    # Predicting the mean costs exactly 1 in normalised MSE, whatever the tensor's scale.
    for scale in (1e-3, 1.0, 1e3):
        t = teacher * scale
        assert finetune.normalised_mse(np.full_like(t, t.mean()), t, t.var()) == pytest.approx(1.0)
    assert finetune.softened_kl(teacher, teacher) == pytest.approx(0.0, abs=1e-12)
    # KL is invariant to a constant shift of the logits and positive otherwise.
    assert finetune.softened_kl(teacher + 5.0, teacher) == pytest.approx(0.0, abs=1e-9)
    assert finetune.softened_kl(teacher[:, ::-1], teacher) > 0


def test_softmax_outputs_are_distilled_on_their_logits_with_kl():
    nodes = [
        helper.make_node("Flatten", ["x"], ["flat"]),
        helper.make_node("Softmax", ["flat"], ["prob"], axis=-1),
        helper.make_node("Relu", ["flat"], ["other"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 2, 2])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("other", TensorProto.FLOAT, None)],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    prob = finetune.loss_target(model, "prob")
    assert (prob.tensor, prob.loss, prob.name) == ("flat", finetune.LOSS_KL, "prob")
    other = finetune.loss_target(model, "other")
    assert (other.tensor, other.loss) == ("other", finetune.LOSS_MSE)


def test_an_exporters_softmax_behind_an_identity_at_opset_12_is_found():
    """PP-OCR's ends: Softmax(axis=2) on a rank-3 tensor at opset 12 (the last axis), or Softmax then Identity."""
    nodes = [
        helper.make_node("Relu", ["x"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["prob"], axis=2),
        helper.make_node("Identity", ["prob"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "t", 7])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", "t", 7])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    target = finetune.loss_target(model, "out")
    assert (target.tensor, target.loss, target.name) == ("logits", finetune.LOSS_KL, "out")
    # Not the last axis at opset 12 (softmax over the flattened trailing dims): no KL over one axis.
    model.graph.node[1].CopyFrom(helper.make_node("Softmax", ["logits"], ["prob"], axis=1))
    assert finetune.loss_target(model, "out").loss == finetune.LOSS_MSE


def test_targets_stop_at_the_first_op_the_stack_cannot_take():
    """conv → Relu → TopK (not differentiable here) → output: the loss is put on the Relu output, and a conv past
    the TopK is reported as not covered."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "w2")
    k = numpy_helper.from_array(np.array([2], np.int64), "k")
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("TopK", ["r1", "k"], ["top", "idx"], axis=1),
        helper.make_node("Conv", ["top", "w2"], ["y"], name="conv2"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=[w1, w2, k],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    plan = finetune.choose_targets(model, {"c1": ["w1"], "y": ["w2"]}, supported={"Conv", "Relu"})
    assert plan is not None and plan.subgraph
    assert [t.tensor for t in plan.targets] == ["r1"]
    assert plan.covered == ["c1"] and plan.uncovered == ["y"] and plan.trainable == ["w1"]
    assert plan.blocked_by == ["TopK"]
    # With every op supported, the loss is on the model's output.
    whole = finetune.choose_targets(model, {"c1": ["w1"], "y": ["w2"]}, supported={"Conv", "Relu", "TopK"})
    assert not whole.subgraph and [t.tensor for t in whole.targets] == ["y"]


def test_convertible_copy_keeps_the_function_and_the_initializer_names():
    model = conv_model(in_channels=3, out_channels=5, spatial=(11, 13), strides=(2, 2), auto_pad="SAME_UPPER",
                       weight_as_constant_node=True)  # fmt: skip
    copy = finetune.convertible_copy(model, {"x": (1, 3, 11, 13)})
    assert "Constant" not in [n.op_type for n in copy.graph.node]
    assert not any(a.name == "auto_pad" for n in copy.graph.node for a in n.attribute)
    conv = next(n for n in copy.graph.node if n.op_type == "Conv")
    assert conv.input[1] in {t.name for t in copy.graph.initializer}
    feeds = {"x": random_input((1, 3, 11, 13))}
    np.testing.assert_allclose(run(copy, feeds)[0], run(model, feeds)[0], rtol=1e-6, atol=1e-6)


def test_write_back_replaces_by_name_and_refuses_a_wrong_shape():
    model = conv_model()
    name = model.graph.initializer[0].name
    old = initializers(model)
    new = finetune.write_back(model, {name: old[name] * 2})
    np.testing.assert_array_equal(initializers(new)[name], old[name] * 2)
    assert initializers(model)[name].tolist() == old[name].tolist()  # the input model is not touched
    with pytest.raises(ValueError, match="shape"):
        finetune.write_back(model, {name: old[name][:1]})
    with pytest.raises(ValueError, match="no initializer"):
        finetune.write_back(model, {"nope": old[name]})


class StandInTrainer:
    """Records what the stage hands the trainer and returns chosen weights, so the plumbing is tested without
    torch: scale every trainable weight by ``factor``."""

    def __init__(self, factor: float, improves: bool = True):
        self.factor, self.improves, self.calls = factor, improves, []

    def train(self, student, teacher, trainable, targets, feeds, held_out, settings, progress=None, hints=()):
        self.calls.append({"trainable": list(trainable), "targets": list(targets), "feeds": len(feeds), "hints": list(hints),
                           "held_out": held_out, "settings": settings, "student_outputs": [o.name for o in student.graph.output]})  # fmt: skip
        values = initializers(student)
        return finetune_torch.TrainResult(
            weights={name: values[name] * self.factor for name in trainable}, steps=5, seconds=0.1,
            loss_before=1.0, loss_after=0.5 if self.improves else 2.0, held_out_before=1.0, held_out_after=0.5,
            best_step=5 if self.improves else 0, trained=list(trainable),
        )  # fmt: skip


@pytest.fixture
def stand_in(monkeypatch):
    def install(trainer: StandInTrainer):
        monkeypatch.setattr(finetune, "require_stack", lambda: None)
        monkeypatch.setattr(finetune_torch, "stack_label", lambda: "stand-in")
        monkeypatch.setattr(finetune_torch, "supported_ops", lambda model: {n.op_type for n in model.graph.node})
        monkeypatch.setattr(finetune_torch, "train", trainer.train)
        return trainer

    return install


def test_trained_weights_reach_the_written_model_and_nothing_else_changes(stand_in):
    trainer = stand_in(StandInTrainer(factor=1.5))
    original = small_net()
    common = dict(rank=1, calibration=small_feeds(16), benchmark=False, latency_aware=False)
    plain = dsrewrite.rewrite(original, **common)
    tuned = dsrewrite.rewrite(original, **common, finetune_steps=5, finetune_lr=1e-3)
    (call,) = trainer.calls
    # Only the emitted depthwise/pointwise weights and biases are trained; the Gemm and untouched weights are not.
    emitted_convs = [n for n in plain.model.graph.node if n.op_type == "Conv"]
    owned = {name for n in emitted_convs for name in n.input[1:3] if name}
    assert set(call["trainable"]) == owned
    # The loss is on the model's output, with each rewritten conv's output as a layer hint.
    assert call["hints"] == ["c1", "c2"] and call["student_outputs"] == ["logits", "c1", "c2"]
    assert call["feeds"] == 16 and call["held_out"] == 2
    assert call["settings"].steps == 5 and call["settings"].learning_rate == 1e-3 and call["settings"].seed == 0
    before, after = initializers(plain.model), initializers(tuned.model)
    assert before.keys() == after.keys()
    for name in before:
        np.testing.assert_allclose(after[name], before[name] * (1.5 if name in owned else 1.0), rtol=1e-6)
    summary = tuned.report.finetune
    assert summary["ran"] and summary["written_back"] and summary["covered_convs"] == len(emitted_convs) // 2
    assert any(note.startswith("fine-tuned") for note in tuned.report.notes)
    assert tuned.report.to_dict()["finetune"]["steps"] == 5
    # The written model is verified like any other (verification ran on the fine-tuned weights).
    assert tuned.report.verification is not None


def test_a_fine_tuning_that_does_not_lower_the_loss_keeps_the_closed_form_fit(stand_in):
    stand_in(StandInTrainer(factor=3.0, improves=False))
    original = small_net()
    common = dict(rank=1, calibration=small_feeds(8), benchmark=False, latency_aware=False, verify=False)
    plain = dsrewrite.rewrite(original, **common)
    tuned = dsrewrite.rewrite(original, **common, finetune_steps=5)
    for name, value in initializers(plain.model).items():
        np.testing.assert_array_equal(initializers(tuned.model)[name], value)
    assert not tuned.report.finetune["written_back"]
    assert any("closed-form fit is kept" in note for note in tuned.report.notes)


def test_dry_run_and_no_rewritten_conv_do_not_train(stand_in):
    trainer = stand_in(StandInTrainer(factor=2.0))
    original = small_net()
    dsrewrite.rewrite(original, rank=1, calibration=small_feeds(4), dry_run=True, finetune_steps=3, benchmark=False)
    result = dsrewrite.rewrite(original, rank=1, exclude=("*",), calibration=small_feeds(4), finetune_steps=3,
                               benchmark=False, latency_aware=False)  # fmt: skip
    assert trainer.calls == []
    assert any("fine-tuning skipped" in note for note in result.report.notes)


class ConvScalingTrainer(StandInTrainer):
    """Scales only the weights whose names start with one of the keys of ``scales[call]``, each by its factor
    (a later call: the last dict)."""

    def __init__(self, *scales: dict[str, float]):
        super().__init__(factor=1.0)
        self.scales = scales

    def train(self, student, teacher, trainable, targets, feeds, held_out, settings, progress=None, hints=()):
        result = super().train(student, teacher, trainable, targets, feeds, held_out, settings, progress, hints)
        scales = self.scales[min(len(self.calls), len(self.scales)) - 1]
        for name in result.weights:
            result.weights[name] = result.weights[name] * next((f for p, f in scales.items() if name.startswith(p)), 1.0)
        return result


def test_the_output_guard_judges_the_fine_tuned_weights_not_the_fits(stand_in):
    """With fine-tuning the guard waits for the trained factors: a conv that training made worse is left alone,
    and the conv it keeps ships its trained weights (no refit discards them), trained again without the other."""
    from test_output_effect import feeds, two_branch_model  # noqa: PLC0415
    from test_output_guard import relative_mse  # noqa: PLC0415

    model = two_branch_model()  # conv_a's errors reach the output 100x louder than conv_b's
    common = dict(rank=1, calibration=feeds(8), latency_aware=False, benchmark=False)
    fitted = dsrewrite.rewrite(model, **common, max_output_error=1e9)
    bound = fitted.report.output_guard["error_all_rewrites"] / 10  # the fits of both are over it, conv_b's alone not
    # Training leaves conv_b's weights a hair different and makes conv_a's pointwise conv far worse.
    trainer = stand_in(ConvScalingTrainer({"conv_b/": 1.001, "conv_a/pw": 300.0}))
    tuned = dsrewrite.rewrite(model, **common, max_output_error=bound, finetune_steps=8)
    record = tuned.report.output_guard
    assert record["factors"] == "fine-tuned" and record["reverted"] == ["conv_a"]
    assert record["error_all_rewrites"] > bound >= record["error_kept"] > 0
    layers = {layer.node: layer for layer in tuned.report.layers}
    assert layers["conv_a"].status == "skipped" and layers["conv_b"].status == "rewritten"
    # conv_b, trained alongside conv_a, is trained again alone from its trained weights, for a quarter of the steps.
    first, again = trainer.calls
    assert all(name.startswith("conv_b/") for name in again["trainable"]) and again["settings"].steps == 2
    tuning = tuned.report.finetune
    assert tuning["left_alone_by_output_guard"] == 1 and tuning["retrained"]["written_back"] and tuning["steps"] == 5
    assert any(note.startswith("trained again after the output guard left 1 conv(s) alone: fine-tuned 1 rewritten conv(s)")
               for note in tuned.report.notes)  # fmt: skip
    # conv_a is back as it was; conv_b carries its trained weights (the fits times 1.001, twice), not a refit.
    convs = {n.name: n for n in tuned.model.graph.node if n.op_type == "Conv"}
    assert "conv_a" in convs and not any(name.startswith("conv_a/") for name in convs)
    before, after = initializers(fitted.model), initializers(tuned.model)
    for name in (i for n in convs.values() if n.name.startswith("conv_b/") for i in n.input[1:]):
        np.testing.assert_allclose(after[name], before[name] * 1.001**2, rtol=1e-6)
    # The kept error is what the delivered model does, and the report has one emission's pass results.
    assert math.isclose(relative_mse(model, tuned.model, feeds(8)), record["error_kept"], rel_tol=1e-3)
    assert [p["name"] for p in tuned.report.data()["passes"]].count("decompose_conv") == 1
    assert any("keep their fine-tuned weights" in note for note in tuned.report.notes)


def test_what_the_retraining_moves_past_the_bound_is_left_alone_too(stand_in):
    from test_output_effect import feeds, two_branch_model  # noqa: PLC0415

    model = two_branch_model()
    common = dict(rank=1, calibration=feeds(8), latency_aware=False, benchmark=False)
    bound = dsrewrite.rewrite(model, **common, max_output_error=1e9).report.output_guard["error_all_rewrites"] / 10
    stand_in(ConvScalingTrainer({"conv_a/pw": 300.0}, {"conv_b/pw": 300.0}))
    tuned = dsrewrite.rewrite(model, **common, max_output_error=bound, finetune_steps=4)
    record = tuned.report.output_guard
    assert record["reverted"] == ["conv_a", "conv_b"] and record["error_kept"] == 0.0
    assert [n.name for n in tuned.model.graph.node if n.op_type == "Conv"] == ["conv_a", "conv_b"]
    assert [p["name"] for p in tuned.report.data()["passes"]].count("decompose_conv") == 1


def test_trained_weights_over_the_bound_give_way_to_fits_within_it(stand_in):
    from test_output_effect import feeds, two_branch_model  # noqa: PLC0415

    model = two_branch_model()
    common = dict(rank=1, calibration=feeds(8), latency_aware=False, benchmark=False)
    fitted = dsrewrite.rewrite(model, **common, max_output_error=1e9)
    bound = 1.05 * fitted.report.output_guard["worst_part"]["error"]  # every feature's fit within it
    stand_in(ConvScalingTrainer({"conv_a/pw": 2.0}))
    tuned = dsrewrite.rewrite(model, **common, max_output_error=bound, finetune_steps=4)
    record = tuned.report.output_guard
    assert record["factors"].startswith("fitted") and record["reverted"] == []
    assert record["error_all_rewrites"] > bound > record["error_kept"]
    assert record["error_kept"] == pytest.approx(fitted.report.output_guard["error_all_rewrites"], rel=1e-6)
    assert not tuned.report.finetune["written_back"]
    assert any("the fits are written instead" in note for note in tuned.report.notes)
    for name, value in initializers(fitted.model).items():
        np.testing.assert_array_equal(initializers(tuned.model)[name], value)


def test_when_fine_tuning_writes_nothing_back_the_guard_refits_as_without_it(stand_in):
    from test_output_effect import feeds, two_branch_model  # noqa: PLC0415

    model = two_branch_model()
    common = dict(rank=1, calibration=feeds(8), latency_aware=False, benchmark=False)
    bound = dsrewrite.rewrite(model, **common, max_output_error=1e9).report.output_guard["error_all_rewrites"] / 10
    plain = dsrewrite.rewrite(model, **common, max_output_error=bound)
    stand_in(StandInTrainer(factor=3.0, improves=False))
    tuned = dsrewrite.rewrite(model, **common, max_output_error=bound, finetune_steps=5)
    assert tuned.report.output_guard["factors"] == "fitted" and tuned.report.output_guard["reverted"] == ["conv_a"]
    assert tuned.report.output_guard["error_kept"] == plain.report.output_guard["error_kept"]
    for name, value in initializers(plain.model).items():
        np.testing.assert_array_equal(initializers(tuned.model)[name], value)


# -- with the stack (slow) -----------------------------------------------------------------------


@pytest.mark.slow
@needs_stack
def test_training_lowers_the_loss_is_reproducible_and_verifies():
    original = small_net()
    feeds = small_feeds(64)
    common = dict(rank=1, calibration=feeds, benchmark=False, latency_aware=False, finetune_steps=40,
                  finetune_lr=1e-2, finetune_threads=1)  # fmt: skip
    first = dsrewrite.rewrite(original, **common)
    second = dsrewrite.rewrite(original, **common)
    summary = first.report.finetune
    assert summary["ran"] and summary["written_back"] and summary["steps"] == 40
    assert summary["loss_after"] < 0.9 * summary["loss_before"]
    assert summary["held_out_loss_after"] < 0.9 * summary["held_out_loss_before"]
    assert first.model.SerializeToString() == second.model.SerializeToString()  # same inputs and seed
    # The reported loss is the normalised MSE of the written model's outputs, as onnxruntime computes them.
    teacher = np.concatenate([run(original, f)[0] for f in feeds])
    student = np.concatenate([run(first.model, f)[0] for f in feeds])
    assert finetune.normalised_mse(student, teacher, teacher.var()) == pytest.approx(summary["loss_after"], rel=0.05)


@pytest.mark.slow
@needs_stack
def test_full_rank_fine_tuning_stays_exact():
    """At full rank the closed-form fit is exact, so there is nothing to lower and the model is kept."""
    original = onnx.load(str(SAMPLES / "vgg_small.onnx"))
    feeds = vgg_feeds(8)
    result = dsrewrite.rewrite(original, rank=9, calibration=feeds, benchmark=False, latency_aware=False,
                               finetune_steps=5, finetune_threads=1)  # fmt: skip
    for f in feeds[:2]:
        np.testing.assert_allclose(run(result.model, f)[0], run(original, f)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@needs_stack
def test_same_upper_and_constant_weights_convert_and_train():
    model = conv_model(in_channels=8, out_channels=8, spatial=(12, 12), strides=(2, 2), auto_pad="SAME_UPPER",
                       weight_as_constant_node=True, seed=4)  # fmt: skip
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((1, 8, 12, 12)).astype(np.float32)} for _ in range(8)]
    result = dsrewrite.rewrite(model, rank=1, calibration=feeds, benchmark=False, latency_aware=False,
                               finetune_steps=10, finetune_lr=1e-2, finetune_threads=1)  # fmt: skip
    summary = result.report.finetune
    assert summary["ran"] and summary["covered_convs"] == 1 and not summary["subgraph"], summary


@pytest.mark.parametrize("loss, expected", [("auto", "mse"), ("kl", "kl"), ("mse", "mse")])
def test_the_loss_option_sets_every_targets_loss(stand_in, loss, expected):
    trainer = stand_in(StandInTrainer(factor=1.0, improves=False))
    dsrewrite.rewrite(small_net(), rank=1, calibration=small_feeds(8), benchmark=False, latency_aware=False,
                      verify=False, finetune_steps=2, finetune_loss=loss)  # fmt: skip
    (call,) = trainer.calls
    assert [(t.tensor, t.loss) for t in call["targets"]] == [("logits", expected)]


def test_an_unknown_loss_is_a_usage_error():
    with pytest.raises(UsageError, match="--finetune-loss"):
        dsrewrite.rewrite(small_net(), rank=1, calibration=small_feeds(2), finetune_steps=2, finetune_loss="l1")


def test_a_conversion_that_disagrees_past_a_conv_distils_to_the_convs_it_gets_right(stand_in):
    """When the converted model computes the outputs differently from onnxruntime but conv1's output right, the
    loss moves to conv1's output and conv2 keeps its closed-form fit."""

    class Disagreeing(StandInTrainer):
        def train(self, student, *args, **kwargs):
            if not self.calls:
                self.calls.append(None)
                raise finetune_torch.Disagreement("the converted model computes r2 differently", agreeing=["c1", "logits"])
            return super().train(student, *args, **kwargs)

    trainer = stand_in(Disagreeing(factor=1.0))
    result = dsrewrite.rewrite(small_net(), rank=1, calibration=small_feeds(8), benchmark=False, latency_aware=False,
                               verify=False, finetune_steps=2)  # fmt: skip
    second = trainer.calls[1]
    assert [t.tensor for t in second["targets"]] == ["c1"] and second["hints"] == []
    assert set(second["trainable"]) == {"conv1/dw0/W", "conv1/pw/W", "conv1/pw/B"}
    summary = result.report.finetune
    assert summary["subgraph"] and summary["uncovered_convs"] == ["c2"] and "r2" in summary["disagreement"]
    assert any("distilled to c1" in note for note in result.report.notes)


def test_shifted_inputs_move_per_sample_with_edges_repeated():
    rng = np.random.default_rng(3)
    image = rng.standard_normal((6, 2, 16, 24)).astype(np.float32)
    mask = image[:, :1] * 2  # a second input of the same size moves with the first
    moved, moved_mask = finetune_torch._shifted([image, mask], np.random.default_rng(0))
    assert moved.shape == image.shape and moved.dtype == image.dtype
    assert np.array_equal(moved_mask, moved[:, :1] * 2)
    for sample, out in zip(image, moved):
        # Some move within the reach (2 rows, 3 columns) reproduces the sample away from the repeated edges.
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-3, 4)
                   if np.array_equal(out[:, 2 + dy : 14 + dy, 3 + dx : 21 + dx], sample[:, 2:14, 3:21])]  # fmt: skip
        assert matches
        dy, dx = matches[0]
        if dy > 0:  # the rows moved in at the top repeat the sample's first row (moved with it)
            assert np.array_equal(out[:, :dy], np.repeat(out[:, dy : dy + 1], dy, axis=1))
    assert not np.array_equal(moved, image)
    # The same seed moves the same way.
    again = finetune_torch._shifted([image, mask], np.random.default_rng(0))[0]
    assert np.array_equal(again, moved)


@pytest.mark.parametrize(
    "inputs",
    [
        [np.zeros((2, 3, 8), np.float32)],  # a sequence, not an image
        [np.zeros((2, 3, 8, 8), np.int64)],  # token ids
        [np.zeros((2, 3, 8, 8), np.float32), np.zeros((2, 1, 4, 4), np.float32)],  # different sizes
    ],
)
def test_inputs_that_are_not_one_image_size_are_not_shifted(inputs):
    out = finetune_torch._shifted(inputs, np.random.default_rng(0))
    assert all(a is b for a, b in zip(out, inputs))
