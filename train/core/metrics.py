"""Throughput accounting (FLOPs per token, MFU, tokens/s) and metric sinks (metrics.jsonl, wandb).

Model FLOPs follow the PaLM convention (Chowdhery et al. 2022, app. B): 6 x matmul parameters
per token for forward + backward, plus 12 x layers x width x attended length for attention
scores and values. Global layers attend over the whole block, local layers over
min(window, block). Embedding lookups are free; the output projection counts.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from train.config import Config, ModelConfig

# Dense bf16 peak FLOP/s per device (vendor figures, no sparsity).
PEAK_BF16_FLOPS = {
    "H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12, "A100": 312e12, "A10G": 125e12,
    "L4": 121e12, "B200": 2250e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v5p": 459e12, "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in a matmul per token (blocks and the output layer)."""
    D, F, L = cfg.hidden_size, cfg.mlp_width, cfg.num_layers
    return L * (4 * D * D + 2 * D * F) + D * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True) -> float:
    """Model FLOPs per token for one forward (+ backward when ``training``) pass."""
    attended = sum(seq_len if kind == "global" else min(cfg.window_size, seq_len) for kind in cfg.layer_kinds)
    forward = 2 * matmul_params(cfg) + 4 * cfg.hidden_size * attended
    return 3 * forward if training else forward


def device_peak_flops(device) -> float | None:
    """Peak bf16 FLOP/s of ``device`` from its device_kind, or None when unknown (e.g. CPU)."""
    kind = getattr(device, "device_kind", "")
    for name, peak in sorted(PEAK_BF16_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if name.lower() in kind.lower():
            return peak
    env = os.environ.get("CODENEO_PEAK_FLOPS")
    return float(env) if env else None


def peak_flops_source(device) -> str:
    """What MFU is measured against on ``device``: the vendor's dense bf16 figure, the
    ``CODENEO_PEAK_FLOPS`` override, or nothing. A CPU has no figure that bounds what a step can
    reach (a matmul measured at start was exceeded by the step, giving MFU above 100%), so on a
    CPU only tokens/s are reported."""
    kind = getattr(device, "device_kind", "")
    for name in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if name.lower() in kind.lower():
            return f"{name} dense bf16 vendor peak"
    if os.environ.get("CODENEO_PEAK_FLOPS"):
        return "CODENEO_PEAK_FLOPS"
    return "none: no known peak for this device (tokens/s only)"


class Throughput:
    """Tokens/s and MFU over the interval since the last call."""

    def __init__(self, cfg: Config, tokens_per_step: int, num_devices: int, peak_flops_per_device: float | None):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.block_size)
        self.peak = peak_flops_per_device * num_devices if peak_flops_per_device else None
        self._t = time.perf_counter()
        self._steps = 0

    def reset(self) -> None:
        self._t = time.perf_counter()
        self._steps = 0

    def add_steps(self, n: int = 1) -> None:
        self._steps += n

    def rates(self) -> dict[str, float | None]:
        now = time.perf_counter()
        dt = max(now - self._t, 1e-9)
        tps = self._steps * self.tokens_per_step / dt
        self._t, self._steps = now, 0
        mfu = tps * self.flops_per_token / self.peak if self.peak else None
        return {"tokens_per_second": tps, "mfu": mfu}


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` and mirrors to wandb.

    Only process 0 writes (the others get an inactive writer), so a pod run has one log.

    ``resume_step``: the step the run (re)starts from (0 for a fresh start). Every record of a
    step after it, left by an attempt that got further than its last checkpoint before it died,
    is dropped when the writer opens (``truncate_after``), so that the log holds each step's
    records once: those the run keeps, not those it lost. None leaves the file as it is.
    """

    def __init__(self, run_dir: str | os.PathLike, cfg: Config, active: bool = True, *,
                 resume_step: int | None = None):
        self.active = active
        self.path = Path(run_dir) / "metrics.jsonl"
        self._wandb = None
        if not active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        dropped = self.truncate_after(resume_step) if resume_step is not None else 0
        if cfg.logging.wandb_mode != "disabled":
            self._wandb = _start_wandb(run_dir, cfg, replay=dropped > 0)
            if dropped:
                for record in read_metrics(run_dir):
                    self._log_wandb(record)

    def truncate_after(self, step: int) -> int:
        """Drop the records of steps after ``step`` (and a line torn by a crash mid-write) from
        ``metrics.jsonl``; returns how many lines were dropped. A no-op for an inactive writer."""
        if not self.active:
            return 0
        return truncate_metrics(self.path, step)

    def write(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        clean = {k: (None if isinstance(v, float) and v != v else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        self._log_wandb(record)

    def _log_wandb(self, record: dict[str, Any]) -> None:
        if self._wandb is not None and isinstance(record.get("step"), int):
            self._wandb.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=record["step"])

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def truncate_metrics(path: str | os.PathLike, step: int) -> int:
    """Rewrite the metrics file ``path`` without the records whose ``step`` is after ``step``,
    nor lines that are not JSON (the last line of a crash mid-write); returns how many lines
    were dropped. Records without a step are kept. The new file is written beside the old one
    and renamed over it, so a crash here leaves one of the two whole; nothing is rewritten when
    nothing is dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    kept: list[str] = []
    dropped = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            at = record.get("step") if isinstance(record, dict) else None
            if isinstance(at, (int, float)) and at > step:
                dropped += 1
                continue
            kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(kept)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return dropped


def _start_wandb(run_dir, cfg: Config, *, replay: bool):
    """The run's wandb run. ``replay``: an attempt logged steps the run has lost (see
    ``MetricsWriter``), which wandb would keep, since it drops a step logged again. Offline, the
    attempts' directories of this run id move to ``wandb/superseded/`` and the caller replays
    ``metrics.jsonl`` into a new one, so ``wandb sync`` uploads each step once; online, the server
    holds the lost steps, so the run continues under a new id (the old run keeps the lost attempt)."""
    import wandb

    from train.config import to_dict

    run_id = _wandb_id(run_dir)
    if replay and cfg.logging.wandb_mode == "offline":
        _supersede_offline_runs(Path(run_dir) / "wandb", run_id)
    elif replay:
        old, run_id = run_id, _wandb_id(run_dir, renew=True)
        print(f"[train] wandb: steps after the checkpoint were lost; run {old} keeps them, "
              f"this run continues as {run_id} with the kept history replayed", flush=True)
    # Each attempt gets its own folder: wandb names it by the start second, and two attempts
    # started within one second would otherwise write one transaction log over the other.
    attempt = f"attempt{_next_attempt(Path(run_dir) / 'wandb', run_id):03d}"
    return wandb.init(project=cfg.logging.wandb_project, name=cfg.run.name or Path(cfg.run.output_dir).name,
                      dir=str(Path(run_dir)), mode=cfg.logging.wandb_mode, config=to_dict(cfg), resume="allow",
                      id=run_id, settings=wandb.Settings(x_sync_dir_suffix=attempt))


def _next_attempt(wandb_dir: Path, run_id: str) -> int:
    """One more than the attempts of ``run_id`` so far, set aside ones included."""
    return 1 + sum(1 for d in (wandb_dir, wandb_dir / "superseded") for _ in d.glob(f"*run-*-{run_id}*"))


def _supersede_offline_runs(wandb_dir: Path, run_id: str) -> None:
    """Move every offline attempt directory of ``run_id`` into ``wandb_dir/superseded/``."""
    old = sorted(wandb_dir.glob(f"offline-run-*-{run_id}*"))
    if old:
        (wandb_dir / "superseded").mkdir(exist_ok=True)
        for path in old:
            os.replace(path, wandb_dir / "superseded" / path.name)
    latest = wandb_dir / "latest-run"
    if latest.is_symlink() and not latest.exists():
        latest.unlink()


def _wandb_id(run_dir, renew: bool = False) -> str:
    """A stable wandb run id per run directory, so a resumed run continues the same wandb run."""
    path = Path(run_dir) / "wandb_id.txt"
    if path.exists() and not renew:
        return path.read_text().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id)
    return run_id


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a run's ``metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    """``python -m train.metrics --run RUN [--require-falling]``: print the run's evaluations;
    with ``--require-falling`` exit 1 unless the last validation loss is below the first."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m train.metrics", description="a run's validation losses")
    ap.add_argument("--run", required=True, help="run directory")
    ap.add_argument("--require-falling", action="store_true", help="fail unless the validation loss fell")
    args = ap.parse_args(argv)
    evals = [r for r in read_metrics(args.run) if "eval_loss" in r]
    for r in evals:
        print(f"step {r['step']:>5}: eval_loss {r['eval_loss']:.4f}  perplexity {r['perplexity']:.2f}")
    if args.require_falling and not (len(evals) >= 2 and evals[-1]["eval_loss"] < evals[0]["eval_loss"]):
        print(f"error: {args.run}: validation loss did not fall ({len(evals)} evaluations)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
