"""Metrics: JSON lines, one object per logged step, with TRL's names where users know them."""
from __future__ import annotations

from pathlib import Path

import torch


class MetricsLog:
    """Append JSON lines to `path` on the main process. On resume, lines past the resumed step are
    dropped first, so the file reads as one uninterrupted run."""

    def __init__(self, path: Path, enabled: bool = True, resume_step: int | None = None):
        import json

        self.path, self.enabled, self._json = path, enabled, json
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
    print(summary or json.dumps(final))
