"""Command line: assemble the option groups into RewriteOptions, call api.rewrite, render, write files.

No rewriting logic lives here. Exit codes: 0 ok (including "nothing to
rewrite"), 1 verification failed (no model written), 2 usage or input error
(one ``error:`` line on stderr, nothing written).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import traceback
import warnings
from dataclasses import replace
from pathlib import Path

import click
from rich.console import Console

from ._version import __version__
from .api import rewrite
from .budget import DEFAULT_MAX_ERROR
from .errors import DsrewriteError, Interrupted, UsageError
from .model_io import atomic_write_text, check_output_path, save_model
from .options import (
    CalibrationSettings,
    DecomposeSettings,
    DeploySettings,
    FinetuneSettings,
    LatencySettings,
    ReportSettings,
    RewriteOptions,
    VerifySettings,
)
from .report import FORMATS as REPORT_FORMATS
from .sensitivity import default_cache_path, load_eval_script
from .signals import signals_raise_interrupted

log = logging.getLogger("dsrewrite")


class RankType(click.ParamType):
    name = "N|full|auto"

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool):
            rank = value
        else:
            text = str(value).strip().lower()
            if text in ("full", "auto"):
                return text
            try:
                rank = int(text)
            except ValueError:
                self.fail(f"must be a positive integer, 'full' or 'auto', not {value!r}", param, ctx)
        if rank < 1:
            self.fail(f"must be a positive integer, 'full' or 'auto', not {value!r}", param, ctx)
        return rank


def parse_input_shape(value: str) -> tuple[str, tuple[int, ...]]:
    """``NAME:D0,D1,...`` -> (name, dims). The name may itself contain colons."""
    if ":" not in value:
        raise UsageError(f"--input-shape must look like NAME:D0,D1,..., got {value!r}")
    name, _, dims_text = value.rpartition(":")
    try:
        dims = tuple(int(d) for d in dims_text.split(","))
    except ValueError:
        raise UsageError(f"--input-shape {value!r}: dims must be comma-separated positive integers") from None
    if not name or any(d < 1 for d in dims):
        raise UsageError(f"--input-shape {value!r}: dims must be comma-separated positive integers")
    return name, dims


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Where to write the rewritten model.")
@click.option("--rank", type=RankType(), default="auto", show_default=True,
              help="Per-channel rank: an integer, 'full' (exact) or 'auto' (smallest within --max-error).")
@click.option("--max-error", type=float, default=DEFAULT_MAX_ERROR, show_default=True,
              help="Per-layer bound on the estimated relative output error (--rank auto).")
@click.option("--max-output-error", type=float, default=None, metavar="F",
              help="With --calibration: all the rewrites at once may move the model's outputs by at most F (KL for "
                   "probability outputs, relative MSE otherwise); convs are left alone, costliest first, until they "
                   "do not. Default: off; with --quantize, the error of the quantization itself. inf: off.")
@click.option("--target-macs", type=float, default=None, metavar="F",
              help="Allocate ranks so the eligible convs keep at most F (0 < F <= 1) of their MACs.")
@click.option("--allocate-by", type=click.Choice(["output", "layer"]), default="output", show_default=True,
              help="With --target-macs and --calibration: allocate on each conv's effect on the model's outputs "
                   "(output) or on each conv's own output error (layer).")
@click.option("--target-latency", type=float, default=None, metavar="F",
              help="Allocate ranks from measured per-conv latencies so the model runs in about F (0 < F <= 1) "
                   "of its time.")
@click.option("--plan", "plan_in", type=click.Path(path_type=Path), default=None, metavar="PATH",
              help="Reapply the per-conv decisions saved by --plan-out.")
@click.option("--plan-out", type=click.Path(path_type=Path), default=None, metavar="PATH",
              help="Save the per-conv decisions (rank, form or skip reason) as JSON. Timed decisions follow the "
                   "machine's load; --plan with this file reproduces them exactly.")
@click.option("--eval-script", type=click.Path(path_type=Path), default=None, metavar="FILE.py",
              help="A Python file defining evaluate(model_path) -> float (higher is better): "
                   "rank decisions then follow measured task sensitivity.")
@click.option("--latency-aware/--no-latency-aware", default=None,
              help="Time each planned rewrite against its conv in onnxruntime, keep the fastest form and never a "
                   "slower conv. Default: on when dsrewrite picks the ranks (--rank auto, --target-macs).")
@click.option("--benchmark/--no-benchmark", default=None,
              help="Measure whole-model latency before and after in onnxruntime (interleaved medians). "
                   "Default: on whenever a model is written.")
@click.option("--threads", type=int, default=1, show_default=True, help="onnxruntime threads for timing.")
@click.option("--in-place-timing/--alone-timing", "in_place_timing", default=True, show_default=True,
              help="Latency-aware decisions from convs timed inside the whole model (profiled), or alone only.")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="Deliver an INT8 model (QDQ, per-channel) via onnxruntime.quantization, calibrated on --calibration; "
                   "rewrite decisions are timed in INT8.")
@click.option("--finetune-seconds", type=float, default=None, metavar="S",
              help="After the fit, distil the new factors against the original model on --calibration for at most S "
                   "seconds (needs the optional extra: pip install \"dsrewrite[finetune]\"). Under an output bound, "
                   "convs the guard then leaves alone cost another S/4 to train the kept ones again.")
@click.option("--finetune-steps", type=int, default=None, metavar="N",
              help="Fine-tune for at most N optimizer steps (with --seed: the same inputs give the same model).")
@click.option("--finetune-lr", type=float, default=FinetuneSettings.learning_rate, show_default=True,
              help="Fine-tuning learning rate (Adam).")
@click.option("--finetune-loss", type=click.Choice(["auto", "kl", "mse"]), default="auto", show_default=True,
              help="Fine-tuning loss on the outputs: auto is KL on a softmax output's logits and MSE otherwise; kl "
                   "treats every output as logits over its last axis (a classifier or CTC head without softmax).")
@click.option("--sweep", is_flag=True, help="Add the MAC/error trade-off curve to the report.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:D0,D1,...",
              help="Fix an input's dims for costing and verification (repeatable).")
@click.option("--include", multiple=True, metavar="GLOB", help="Only rewrite convs whose node name matches (repeatable).")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Never rewrite convs whose node name matches (repeatable).")
@click.option("--calibration", type=click.Path(path_type=Path), default=None, metavar="PATH",
              help="Fit weights to data: an .npz (one array per input, samples on axis 0) or a directory of .npz feeds.")
@click.option("--calibration-samples", type=int, default=None, metavar="N", help="Use at most N calibration samples.")
@click.option("--sequential/--independent", default=True, show_default=True,
              help="With calibration: fit each conv on the inputs of the already-rewritten model (sequential) "
                   "or on the original model's inputs (independent).")
@click.option("--linear-fit", is_flag=True,
              help="With calibration: fit every conv's own output only. By default a conv that feeds an activation "
                   "(Relu, LeakyRelu, PRelu, Clip, HardSwish, HardSigmoid·x, SiLU, Gelu) is fitted so the activated "
                   "output matches, where that measures better; one whose output reaches a depthwise conv with "
                   "nothing nonlinear between is fitted at that depthwise conv's output.")
@click.option("--fold-batchnorm/--no-fold-batchnorm", default=True, show_default=True,
              help="Fold inference BatchNormalization into the preceding conv first (also one exported as a "
                   "per-channel constant Mul/Add).")
@click.option("--passes", "pass_list", default=None, metavar="NAME,...",
              help="The pass list, comma-separated: registry names (fold_batchnorm, decompose_conv, cleanup) or "
                   "package.module:ClassName for your own pass. decompose_conv marks where the rewrite happens. "
                   "Default: fold_batchnorm,decompose_conv,cleanup.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Run both models in onnxruntime and compare outputs.")
@click.option("--atol", type=float, default=None, help="Absolute tolerance; makes verification pass/fail.")
@click.option("--rtol", type=float, default=None, help="Relative tolerance; makes verification pass/fail.")
@click.option("--report", "reports", multiple=True, type=click.Path(path_type=Path), metavar="PATH",
              help="Write the report; format by extension: .json, .md or .html (repeatable).")
@click.option("--top", type=click.IntRange(min=1), default=None, metavar="N", help="Terminal table: only the N convs with the most MACs (report files list all).")
@click.option("--dry-run", is_flag=True, help="Plan and report; write no model.")
@click.option("--overwrite", is_flag=True, help="Allow the output path to be the input model.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random verification inputs.")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors.")
@click.option("-v", "--verbose", count=True, help="Log progress (-v) or details (-vv) to stderr.")
@click.version_option(__version__, "--version", prog_name="dsrewrite")
def command(model, output, rank, max_error, max_output_error, target_macs, allocate_by, target_latency, plan_in, plan_out, eval_script, latency_aware, benchmark,
            threads, in_place_timing, quantize, finetune_seconds, finetune_steps, finetune_lr, finetune_loss, sweep, input_shapes, include, exclude, calibration, calibration_samples, sequential, linear_fit,
            fold_batchnorm, pass_list, verify, atol, rtol, reports, top, dry_run, overwrite, seed, quiet, verbose):  # fmt: skip
    """Rewrite the standard convolutions of MODEL into depthwise + pointwise convolutions."""
    _configure_logging(verbose, quiet)
    if output is None and not dry_run:
        raise UsageError("missing option -o/--output (or use --dry-run)")
    if output is not None:
        check_output_path(output, input_path=model, overwrite=overwrite)
    for path in reports:
        if path.suffix.lower() not in REPORT_FORMATS:
            raise UsageError(f"--report {path}: unknown format; use one of {', '.join(REPORT_FORMATS)}")
        check_output_path(path, input_path=model, overwrite=False)
        if output is not None and path.resolve() == output.resolve():
            raise UsageError(f"--report {path} is also the output model path")
    if plan_out is not None:
        check_output_path(plan_out, input_path=model, overwrite=False)
        taken = [p.resolve() for p in (*reports, *([output] if output is not None else []))]
        if plan_out.resolve() in taken:
            raise UsageError(f"--plan-out {plan_out} is also the output model or a report path")
    evaluate, eval_key = (None, "")
    if eval_script is not None:
        evaluate, eval_key = load_eval_script(eval_script)

    shapes: dict[str, tuple[int, ...]] = {}
    for value in input_shapes:
        name, dims = parse_input_shape(value)
        shapes[name] = dims
    options = RewriteOptions(
        decompose=DecomposeSettings(
            rank=rank, max_error=max_error, include=tuple(include), exclude=tuple(exclude), fold_batchnorm=fold_batchnorm,
            target_macs=target_macs, target_latency=target_latency, plan=plan_in, evaluate=evaluate, eval_key=eval_key,
            sensitivity_cache=default_cache_path() if evaluate is not None else None, allocate_by=allocate_by,
            max_output_error=max_output_error,
        ),
        calibration=CalibrationSettings(data=calibration, samples=calibration_samples, sequential=sequential, linear_fit=linear_fit),
        latency=LatencySettings(
            aware=latency_aware, benchmark=(output is not None and not dry_run) if benchmark is None else benchmark, threads=threads,
            in_place=in_place_timing,
        ),
        verify=VerifySettings(enabled=verify, atol=atol, rtol=rtol),
        report=ReportSettings(sweep=sweep),
        deploy=DeploySettings(quantize=quantize),
        finetune=FinetuneSettings(seconds=finetune_seconds, steps=finetune_steps, learning_rate=finetune_lr, loss=finetune_loss),
        input_shapes=shapes,
        seed=seed,
        dry_run=dry_run,
        passes=tuple(name.strip() for name in pass_list.split(",") if name.strip()) if pass_list is not None else (),
    )  # fmt: skip
    with progress_bars(enabled=not quiet and sys.stderr.isatty()) as progress:
        result = rewrite(model, replace(options, progress=progress))
    report = result.report
    if output is not None and not dry_run and result.ok:
        report.model["output"] = str(output)

    # Pipes and CI logs get a wide table rather than rich's 80-column default.
    console = Console(quiet=quiet, width=None if sys.stdout.isatty() else 160)
    from .report import render_terminal  # noqa: PLC0415 (formatting only when needed)

    render_terminal(report, console, top=top)
    # The model first: a report never names an output that an interrupt kept from being written.
    written = []
    if result.ok and output is not None and not dry_run:
        written = save_model(result.model, output)
    for path in reports:
        report.write(path)
    if plan_out is not None:
        atomic_write_text(plan_out, json.dumps(result.plan_document(), indent=2) + "\n")
    if not result.ok:
        Console(stderr=True).print("[red]error:[/red] verification failed; no model written")
        return 1
    if not quiet:
        for warning in result.warnings:
            sys.stderr.write(f"warning: {warning}\n")
        sys.stderr.flush()
    if written and not quiet:
        console.print(f"Wrote {', '.join(str(p) for p in written)}")
    return 0


@contextlib.contextmanager
def progress_bars(enabled: bool):
    """A ``progress(stage, done, total)`` callback drawing rich bars on stderr, or None."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: PLC0415

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bars:
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int, detail: str = "") -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(stage, total=total)
            bars.update(tasks[stage], completed=done, description=f"{stage} {detail}".rstrip())

        yield update


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the command and map every failure to one line and an exit code.

    While it runs, SIGINT and SIGTERM raise ``Interrupted`` (exit 130 / 143), so
    every clean-up runs and no partial file stays behind; Python warnings go to
    the log (``-v``) instead of onto stderr. A closed stdout (``dsrewrite … | head``)
    only silences the table: the model is still written.
    """
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _PipeSafe(sys.stdout), _PipeSafe(sys.stderr)
    try:
        code = _main(argv)
    finally:
        sys.stdout, sys.stderr = streams
    sys.exit(code)


def _main(argv: list[str] | None) -> int:
    with signals_raise_interrupted(), warnings.catch_warnings():
        warnings.showwarning = lambda message, category, *_args, **_kwargs: log.info(
            "%s: %s", category.__name__, " ".join(str(message).split())
        )
        try:
            # make_context + invoke rather than command.main: click's main catches
            # KeyboardInterrupt and prints a blank line to stderr before we see it.
            args = list(sys.argv[1:] if argv is None else argv)
            with command.make_context("dsrewrite", args) as ctx:
                code = command.invoke(ctx)
            code = code if isinstance(code, int) else 0
        except click.exceptions.Exit as exc:  # --help, --version
            code = exc.exit_code
        except Interrupted as exc:
            _error("interrupted")
            code = exc.exit_code
        except (click.exceptions.Abort, KeyboardInterrupt):
            _error("interrupted")
            code = 130
        except click.UsageError as exc:
            _error(exc.format_message().splitlines()[0] if exc.format_message() else str(exc))
            code = 2
        except click.ClickException as exc:
            _error(exc.format_message())
            code = 2
        except DsrewriteError as exc:
            _error(str(exc))
            code = exc.exit_code
        except MemoryError:
            _error("out of memory")
            code = 2
        except OSError as exc:  # disk full, permissions, a file vanishing mid-run
            log.debug("I/O failure", exc_info=True)
            _error(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else (exc.strerror or str(exc)))
            code = 2
        except Exception as exc:  # never a traceback for the user; -vv shows it
            if logging.getLogger("dsrewrite").isEnabledFor(logging.DEBUG):
                traceback.print_exc()
            _error(f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
            code = 2
    return code


def _error(message: str) -> None:
    """One ``error:`` line on stderr, whatever the message holds."""
    message = " ".join(str(message).split()) or "failed"
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


class _PipeSafe:
    """A text stream that turns into a sink once its reader goes away (EPIPE), instead of raising."""

    def __init__(self, stream):
        self._stream = stream
        self._broken = False

    def write(self, text):
        if not self._broken:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._sink()
        return len(text)

    def flush(self):
        if not self._broken:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._sink()

    def _sink(self):
        self._broken = True
        with contextlib.suppress(OSError, ValueError, AttributeError):  # the final flush at exit must not fail
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING
    if quiet:
        level = logging.ERROR
    elif verbose == 1:
        level = logging.INFO
    elif verbose >= 2:
        level = logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("dsrewrite")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
