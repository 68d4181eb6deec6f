"""Metrics: JSON lines, one object per logged step, with TRL's names where users know them; with
--report-to, the same numbers to TensorBoard (OUTPUT_DIR/tensorboard) or Weights & Biases as well."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch

REPORT_TO = ("none", "tensorboard", "wandb")
_PACKAGES = {"tensorboard": ("tensorboard", "pip install tensorboard"), "wandb": ("wandb", "pip install wandb")}


def check_report_to(report_to: str) -> None:
    """--report-to names a tracker whose package is installed (both are optional dependencies, imported only
    when asked for); a missing one is a SystemExit that says how to install it, before any work starts."""
    if report_to not in REPORT_TO:
        raise SystemExit(f"--report-to: must be one of {REPORT_TO}, got {report_to!r}")
    if report_to != "none" and importlib.util.find_spec(_PACKAGES[report_to][0]) is None:
        raise SystemExit(f"--report-to {report_to}: the {_PACKAGES[report_to][0]} package is not installed "
                         f"({_PACKAGES[report_to][1]}), or drop the flag (metrics.jsonl is written anyway)")


class _Tracker:
    """Scalars of every record to TensorBoard or W&B, at the record's step (lists, dicts and flags are
    left to metrics.jsonl). On resume TensorBoard drops its events from the resumed step on (purge_step),
    as metrics.jsonl drops its lines."""

    def __init__(self, report_to: str, directory: Path, resume_step: int | None, config: dict | None):
        check_report_to(report_to)
        self.kind = report_to
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(directory / "tensorboard"),
                                        purge_step=None if resume_step is None else resume_step + 1)
        else:
            import os

            import wandb

            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "ava"), dir=str(directory), config=config,
                                  resume="allow" if resume_step is not None else None)

    def write(self, record: dict) -> None:
        step = int(record.get("step", 0))
        scalars = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))
                   and not isinstance(v, bool) and math.isfinite(float(v))}
        if self.kind == "tensorboard":
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()  # a killed run keeps what it logged
        else:
            self.run.log(scalars, step=step)

    def close(self) -> None:
        if self.kind == "tensorboard":
            self.writer.close()
        else:
            self.run.finish()


class MetricsLog:
    """Append JSON lines to `path` on the main process. On resume, lines past the resumed step are
    dropped first, so the file reads as one uninterrupted run. report_to: also send every record's
    scalars to "tensorboard" (event files in path's directory /tensorboard) or "wandb" (project
    $WANDB_PROJECT, default "ava"; `config` is the run's flags)."""

    def __init__(self, path: Path, enabled: bool = True, resume_step: int | None = None, report_to: str = "none",
                 config: dict | None = None):
        import json

        self.path, self.enabled, self._json = path, enabled, json
        self.tracker = _Tracker(report_to, path.parent, resume_step,
                                config) if enabled and report_to != "none" else None
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is None:
                path.write_text("")
            elif path.exists():
                kept = [line for line in path.read_text().splitlines()
                        if line.strip() and json.loads(line).get("step", 0) <= resume_step]
                path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            clean = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in record.items()}
            with self.path.open("a") as handle:
                handle.write(self._json.dumps(clean) + "\n")
            if self.tracker is not None:
                self.tracker.write(clean)

    def close(self) -> None:
        """The end of the run: the tracker's files closed (metrics.jsonl needs nothing)."""
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None


METRIC_NAMES = {"loss": "loss", "accuracy": "rewards/accuracies", "margin": "rewards/margins", "sigma": "ava/sigma"}


def metric_name(term: str) -> str:
    """TRL's names where users know them (rewards/accuracies, rewards/margins), ava/<term> otherwise."""
    return METRIC_NAMES.get(term, f"ava/{term}")


def write_final(final: dict, output_dir: Path, metrics: MetricsLog, step: int, summary: str = "") -> None:
    """Rank 0's end of a run: the peak RSS into `final`, then final.json, the last metrics line, and on
    stdout `summary` (a sentence a person reads; without one, `final` as JSON)."""
    import json
    import resource

    final["peak_rss_gb_rank0"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    (Path(output_dir) / "final.json").write_text(json.dumps(final, indent=2))
    metrics.write({"step": step, "final": True, **final})
    metrics.close()
    print(summary or json.dumps(final))
