"""What ``rewrite`` can be told: option groups that validate themselves.

Each group holds the options of one concern and checks its own values;
:class:`RewriteOptions` holds the groups plus what they share (input shapes,
seed, dry run, the pass list, progress) and checks the combinations. The CLI
assembles the groups; library callers may pass the same options as flat
keywords (``rewrite(path, rank=2, calibration=feeds)``), which
:meth:`RewriteOptions.of` sorts into their groups.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import onnx

from .budget import DEFAULT_MAX_ERROR
from .cores import available_cores
from .errors import InputError, UsageError
from .verify import FULL_RANK_TOLERANCES


def _fraction(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _default_latency_cache() -> Path:
    from .latency import default_cache_path  # noqa: PLC0415 (keeps option parsing free of onnxruntime)

    return default_cache_path()


ALLOCATE_BY = ("output", "layer")


@dataclass(frozen=True)
class DecomposeSettings:
    """Which convs to rewrite and how ranks are decided."""

    rank: int | str = "auto"
    max_error: float = DEFAULT_MAX_ERROR
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    fold_batchnorm: bool = True
    target_macs: float | None = None  # eligible convs keep at most this fraction of their MACs
    target_latency: float | None = None  # the model should run in at most this fraction of its time
    plan: Any = None  # a saved plan (path or dict) to reapply
    evaluate: Callable[[onnx.ModelProto], float] | None = None  # task score, higher is better
    eval_key: str = ""  # identifies `evaluate` in the sensitivity cache
    sensitivity_cache: str | os.PathLike | None = None
    # What a MAC budget is allocated on with calibration data: "output" (each conv's effect on the model's
    # outputs, output_effect) or "layer" (each conv's own output NMSE).
    allocate_by: str = "output"
    # The most all the fitted rewrites at once may move the model's outputs (output_effect's measure, on
    # calibration feeds); convs are left alone until they do not. None: off, or under --quantize the error of
    # the quantization itself; inf: off.
    max_output_error: float | None = None

    def __post_init__(self):
        # Library callers write include=None or include="conv*": both mean what the CLI's repeatable flag would.
        for name in ("include", "exclude"):
            value = getattr(self, name)
            patterns = () if value is None else (value,) if isinstance(value, str) else tuple(value)
            object.__setattr__(self, name, patterns)

    def validate(self) -> None:
        if self.allocate_by not in ALLOCATE_BY:
            raise UsageError(f"--allocate-by must be one of {', '.join(ALLOCATE_BY)}, not {self.allocate_by!r}")
        rank = self.rank
        if isinstance(rank, bool) or not (rank in ("auto", "full") or (isinstance(rank, int) and rank >= 1)):
            raise UsageError(f"--rank must be a positive integer, 'full' or 'auto', not {rank!r}")
        if not (isinstance(self.max_error, (int, float)) and 0 < self.max_error < float("inf")):
            raise UsageError(f"--max-error must be a positive finite number, not {self.max_error!r}")
        bound = self.max_output_error
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, (int, float)) or not bound > 0):
            raise UsageError(f"--max-output-error must be a positive number (inf: no bound), not {bound!r}")
        if self.target_macs is not None and not _fraction(self.target_macs):
            raise UsageError(f"--target-macs must be in (0, 1], not {self.target_macs!r}")
        if self.target_latency is not None and not _fraction(self.target_latency):
            raise UsageError(f"--target-latency must be in (0, 1], not {self.target_latency!r}")
        if self.target_latency is not None and (self.target_macs is not None or self.plan is not None):
            raise UsageError("--target-latency cannot be combined with --target-macs or --plan")
        if self.target_macs is not None and self.plan is not None:
            raise UsageError("--target-macs and --plan cannot be combined: a plan already fixes every rank")

    def picks_ranks(self) -> bool:
        """Whether dsrewrite chooses the ranks itself (auto or a budget), rather than being told."""
        return self.plan is None and (self.rank == "auto" or self.target_macs is not None or self.target_latency is not None)

    def load_plan(self):
        """The saved plan's decisions; InputError when it cannot be read or is malformed."""
        from .plan import decisions_from_document  # noqa: PLC0415

        plan = self.plan
        if isinstance(plan, (str, os.PathLike)):
            try:
                document = json.loads(Path(plan).read_text())
            except FileNotFoundError:
                raise InputError(f"plan file not found: {plan}") from None
            except (OSError, ValueError) as exc:
                raise InputError(f"cannot read plan file {plan}: {' '.join(str(exc).split())[:200]}") from None
        else:
            document = plan
        try:
            return decisions_from_document(document)
        except ValueError as exc:
            where = plan if isinstance(plan, (str, os.PathLike)) else ""
            raise InputError(f"invalid plan {where}: {exc}".replace("  ", " ")) from None

    def sensitivity_cache_path(self) -> Path | None:
        return Path(self.sensitivity_cache) if self.sensitivity_cache is not None else None


@dataclass(frozen=True)
class CalibrationSettings:
    """Calibration data and how the factors are fitted to it."""

    data: Any = None  # an .npz path, a directory of .npz feeds, or an iterable of {input: array} dicts
    samples: int | None = None
    sequential: bool = True
    linear_fit: bool = False  # fit the conv outputs themselves, not the activated ones or a following depthwise conv's
    distill: Any = None  # a distill.DistillOptions for fine control; overrides `sequential`, `linear_fit` and the seed

    def validate(self) -> None:
        if self.samples is not None and not _positive_int(self.samples):
            raise UsageError(f"--calibration-samples must be a positive integer, not {self.samples!r}")

    def fit_options(self, seed: int):
        from .distill import DistillOptions  # noqa: PLC0415

        return self.distill or DistillOptions(
            sequential=self.sequential, seed=seed, activation_aware=not self.linear_fit, through_depthwise=not self.linear_fit
        )


@dataclass(frozen=True)
class LatencySettings:
    """Timing in onnxruntime. ``aware=None``: time the convs whenever dsrewrite picks the ranks or quantizes."""

    aware: bool | None = None
    benchmark: bool = False
    threads: int = 1
    cache: str | os.PathLike | None = field(default_factory=_default_latency_cache)
    # Decide from timings inside the whole model (dsrewrite.in_model); False: from each conv timed alone only.
    in_place: bool = True

    def validate(self) -> None:
        if not _positive_int(self.threads):
            raise UsageError(f"--threads must be a positive integer, not {self.threads!r}")


@dataclass(frozen=True)
class VerifySettings:
    enabled: bool = True
    atol: float | None = None
    rtol: float | None = None

    def validate(self) -> None:
        for flag, value in (("--atol", self.atol), ("--rtol", self.rtol)):
            if value is not None and not (value >= 0 and value != float("inf")):
                raise UsageError(f"{flag} must be a finite number >= 0, not {value!r}")


@dataclass(frozen=True)
class DeploySettings:
    """The precision the model will run in. ``quantize="int8"``: static QDQ INT8 via onnxruntime.quantization."""

    quantize: str | None = None

    def validate(self) -> None:
        from .quantize import TARGETS  # noqa: PLC0415

        if self.quantize is not None and self.quantize not in TARGETS:
            raise UsageError(f"--quantize must be one of {', '.join(TARGETS)}, not {self.quantize!r}")


FINETUNE_LOSSES = ("auto", "kl", "mse")


@dataclass(frozen=True)
class FinetuneSettings:
    """Distillation fine-tuning after the closed-form fit (the optional ``finetune`` extra: torch + onnx2torch).

    Runs when ``seconds`` or ``steps`` is given; stops at whichever comes first. A step cap with the same seed,
    data and ``threads`` gives the same model; a time budget reports the steps it took (rerun with that cap).
    """

    seconds: float | None = None
    steps: int | None = None
    learning_rate: float = 3e-3  # Adam, relative to each tensor's RMS (finetune_torch: warm-up, cosine decay)
    batch_size: int = 8
    threads: int | None = None  # torch threads; None: every core
    loss: str = "auto"  # auto: KL on a softmax output's logits, else MSE; kl: every output is logits; mse

    @property
    def enabled(self) -> bool:
        return self.seconds is not None or self.steps is not None

    def validate(self) -> None:
        if self.seconds is not None and not (
            isinstance(self.seconds, (int, float)) and not isinstance(self.seconds, bool) and 0 < self.seconds < float("inf")
        ):
            raise UsageError(f"--finetune-seconds must be a positive number, not {self.seconds!r}")
        if self.steps is not None and not _positive_int(self.steps):
            raise UsageError(f"--finetune-steps must be a positive integer, not {self.steps!r}")
        if not (isinstance(self.learning_rate, (int, float)) and 0 < self.learning_rate < float("inf")):
            raise UsageError(f"--finetune-lr must be a positive number, not {self.learning_rate!r}")
        if not _positive_int(self.batch_size):
            raise UsageError(f"--finetune-batch-size must be a positive integer, not {self.batch_size!r}")
        if self.loss not in FINETUNE_LOSSES:
            raise UsageError(f"--finetune-loss must be one of {', '.join(FINETUNE_LOSSES)}, not {self.loss!r}")
        if self.threads is not None and not _positive_int(self.threads):
            raise UsageError(f"fine-tuning threads must be a positive integer, not {self.threads!r}")

    def thread_count(self) -> int:
        return self.threads or available_cores()


@dataclass(frozen=True)
class ReportSettings:
    sweep: bool = False  # add the MAC/error trade-off curve

    def validate(self) -> None:
        pass


# Flat keyword -> (group, field); the flat names are those of the CLI flags and of the JSON report's settings.
FLAT_NAMES: dict[str, tuple[str, str]] = {
    **{name: ("decompose", name) for name in (
        "rank", "max_error", "include", "exclude", "fold_batchnorm", "target_macs", "target_latency", "plan",
        "evaluate", "eval_key", "sensitivity_cache", "allocate_by", "max_output_error",
    )},
    "calibration": ("calibration", "data"), "calibration_samples": ("calibration", "samples"),
    "sequential": ("calibration", "sequential"), "linear_fit": ("calibration", "linear_fit"),
    "distill": ("calibration", "distill"),
    "latency_aware": ("latency", "aware"), "benchmark": ("latency", "benchmark"), "threads": ("latency", "threads"),
    "latency_cache": ("latency", "cache"), "in_place_timing": ("latency", "in_place"),
    "verify": ("verify", "enabled"), "atol": ("verify", "atol"), "rtol": ("verify", "rtol"),
    "sweep": ("report", "sweep"), "quantize": ("deploy", "quantize"),
    "finetune_seconds": ("finetune", "seconds"), "finetune_steps": ("finetune", "steps"),
    "finetune_lr": ("finetune", "learning_rate"), "finetune_batch_size": ("finetune", "batch_size"),
    "finetune_threads": ("finetune", "threads"), "finetune_loss": ("finetune", "loss"),
}  # fmt: skip
# The order of the report's "settings" (kept stable for readers of the JSON).
SETTINGS_ORDER = (
    "rank", "max_error", "include", "exclude", "input_shapes", "fold_batchnorm", "verify", "atol", "rtol", "seed",
    "dry_run", "calibration", "calibration_samples", "sequential", "linear_fit", "distill", "target_macs", "target_latency", "plan",
    "evaluate", "eval_key", "sensitivity_cache", "sweep", "latency_aware", "benchmark", "threads", "latency_cache",
    "in_place_timing", "quantize", "allocate_by", "finetune_seconds", "finetune_steps", "finetune_lr",
    "finetune_batch_size", "finetune_threads", "finetune_loss", "max_output_error",
)  # fmt: skip
GROUPS = {
    "decompose": DecomposeSettings, "calibration": CalibrationSettings, "latency": LatencySettings,
    "verify": VerifySettings, "report": ReportSettings, "deploy": DeploySettings, "finetune": FinetuneSettings,
}  # fmt: skip


@dataclass(frozen=True)
class RewriteOptions:
    """Everything ``rewrite`` can be told, by concern. Build from flat keywords with :meth:`of`."""

    decompose: DecomposeSettings = field(default_factory=DecomposeSettings)
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    latency: LatencySettings = field(default_factory=LatencySettings)
    verify: VerifySettings = field(default_factory=VerifySettings)
    report: ReportSettings = field(default_factory=ReportSettings)
    deploy: DeploySettings = field(default_factory=DeploySettings)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    seed: int = 0
    dry_run: bool = False
    passes: tuple = ()  # the pass list (names or pass objects); empty: dsrewrite.passes.DEFAULT_PASSES
    progress: Callable[[str, int, int], None] | None = None

    @classmethod
    def of(cls, **keywords) -> "RewriteOptions":
        """Options from flat keywords, e.g. ``RewriteOptions.of(rank=2, calibration=feeds, atol=1e-4)``."""
        groups: dict[str, dict] = {name: {} for name in GROUPS}
        shared = {}
        for key, value in keywords.items():
            if key in FLAT_NAMES:
                group, name = FLAT_NAMES[key]
                groups[group][name] = value
            elif key in {f.name for f in fields(cls)} - set(GROUPS):
                shared[key] = value
            else:
                raise TypeError(f"unknown rewrite option {key!r}")
        return cls(**{name: GROUPS[name](**values) for name, values in groups.items()}, **shared)

    def validate(self) -> None:
        for name in GROUPS:
            getattr(self, name).validate()
        for name, dims in self.input_shapes.items():
            if not dims or any((not isinstance(d, int)) or d < 1 for d in dims):
                raise UsageError(f"--input-shape {name}: dims must be positive integers, got {list(dims)}")
        if self.finetune.enabled and self.calibration.data is None:
            raise UsageError("--finetune-seconds/--finetune-steps need --calibration data: the new factors are distilled on it")
        if self.finetune.enabled:  # after the option checks: a wrong option is reported before a missing extra
            from .finetune import require_stack  # noqa: PLC0415

            require_stack()
        bound = self.decompose.max_output_error
        if bound is not None and bound != float("inf") and self.calibration.data is None:
            raise UsageError("--max-output-error needs --calibration data: the outputs are compared on it")
        if self.deploy.quantize is not None and self.calibration.data is None:
            raise UsageError(
                f"--quantize {self.deploy.quantize} needs --calibration data: static quantization calibrates "
                "each activation's range on it"
            )

    def uses_latency(self) -> bool:
        """Whether each conv's rewrite is timed before it is kept."""
        if self.latency.aware is not None:
            return self.latency.aware
        # A quantized deployment always times: what wins in float32 can lose once quantized.
        return self.decompose.picks_ranks() or self.deploy.quantize is not None

    def measures_error_curves(self) -> bool:
        """Whether error curves are measured (calibration, evaluation) rather than read off the kernel spectrum."""
        d = self.decompose
        return (
            d.target_macs is not None or d.target_latency is not None or self.report.sweep or d.evaluate is not None
            or (d.rank == "auto" and self.calibration.data is not None)
        )  # fmt: skip

    def tolerances(self, precision: str = "float32") -> tuple[float | None, float | None]:
        """The tolerances verification applies: the given ones, else the full-rank defaults for the outputs' type."""
        v = self.verify
        if v.atol is None and v.rtol is None and self.decompose.rank == "full":
            return FULL_RANK_TOLERANCES.get(precision, FULL_RANK_TOLERANCES["float32"])
        return v.atol, v.rtol

    def flat(self, name: str):
        """The value of a flat option name (see ``FLAT_NAMES``)."""
        if name in FLAT_NAMES:
            group, attribute = FLAT_NAMES[name]
            return getattr(getattr(self, group), attribute)
        return getattr(self, name)

    def to_settings(self, precision: str = "float32") -> dict[str, Any]:
        """The options as used, flat and JSON-able: the report's ``settings``."""
        d, c = self.decompose, self.calibration
        settings = {name: self.flat(name) for name in SETTINGS_ORDER}
        settings["distill"] = asdict(c.distill) if c.distill else None
        settings["plan"] = _label(d.plan, "<plan>")
        settings["evaluate"] = None if d.evaluate is None else (d.eval_key or "<callable>")
        settings["latency_aware"] = self.uses_latency()
        settings["latency_cache"] = None if self.latency.cache is None else str(self.latency.cache)
        settings["sensitivity_cache"] = None if d.sensitivity_cache is None else str(d.sensitivity_cache)
        settings["input_shapes"] = {k: list(v) for k, v in self.input_shapes.items()}
        settings["include"] = list(d.include)
        settings["exclude"] = list(d.exclude)
        settings["atol"], settings["rtol"] = self.tolerances(precision)
        settings["calibration"] = _label(c.data, "<feeds>")
        if self.finetune.enabled:
            settings["finetune_threads"] = self.finetune.thread_count()
        return settings


def _label(value, placeholder: str) -> str | None:
    """A path as text, None as None, anything else (feeds, a dict) as a placeholder."""
    if isinstance(value, (str, os.PathLike)):
        return str(value)
    return None if value is None else placeholder
