"""Run report: PNG figures and one self-contained ``index.html`` from ``metrics.jsonl`` and ``config.yaml``.

    python -m train.report --run RUN_DIR [--run RUN_DIR2 ...] --out DIR

Every plotting function returns the series it plotted, so tests can compare them with their source
(e.g. the learning-rate curve with ``train.optimizer.learning_rate_schedule``).
"""

from __future__ import annotations

import argparse
import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from data_processing.html_page import img, page, table  # noqa: E402
from train import config as C  # noqa: E402
from train.core.metrics import read_metrics  # noqa: E402


@dataclass
class Run:
    name: str
    path: Path
    cfg: C.Config
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    mixture: dict[str, Any] | None = None  # RUN_DIR/data_mixture.json, written at start with data.mixture


def load_run(run_dir: str | Path) -> Run:
    run_dir = Path(run_dir)
    cfg = C.load(run_dir / "config.yaml")
    records = read_metrics(run_dir)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    name = cfg.run.name or run_dir.name
    mixture_file = run_dir / "data_mixture.json"
    mixture = json.loads(mixture_file.read_text()) if mixture_file.is_file() else None
    return Run(name, run_dir, cfg, train, evals, mixture)


def _unique_names(runs: list[Run]) -> None:
    seen: dict[str, int] = {}
    for run in runs:
        n = seen.get(run.name, 0)
        seen[run.name] = n + 1
        if n:
            run.name = f"{run.name} ({n + 1})"


def _series(records: list[dict[str, Any]], x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r[x], r[y]) for r in records if r.get(x) is not None and r.get(y) is not None]
    if not pts:
        return np.zeros(0), np.zeros(0)
    a = np.asarray(pts, dtype=np.float64)
    return a[:, 0], a[:, 1]


def schedule_series(cfg: C.Config, steps: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(step, learning rate) for steps 1..max_steps, from the optimizer's own schedule.

    metrics.jsonl numbers steps from 1 (the step count after the update), and the update that ends
    at step s uses ``schedule(s - 1)`` (optax counts updates from 0); the logged ``learning_rate`` is
    that value, so the curve is ``(s, schedule(s - 1))`` and the logged dots lie on it."""
    from train.core.optimizer import learning_rate_schedule

    if steps is None:
        steps = np.arange(1, cfg.train.max_steps + 1)
    schedule = learning_rate_schedule(cfg.optimizer, cfg.schedule)
    return np.asarray(steps, dtype=np.float64), np.asarray([float(schedule(int(s) - 1)) for s in steps])


def _finish(fig, ax, path: Path | None, title: str, xlabel: str, ylabel: str, log_y: bool = False) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_loss(runs: list[Run], x: str, path: Path | None = None) -> dict[str, dict[str, tuple]]:
    """Train and eval loss against ``x`` ("step" or "tokens") for every run; returns {run: {kind: (x, y)}}."""
    fig, ax = plt.subplots(figsize=(7, 4))
    data: dict[str, dict[str, tuple]] = {}
    for i, run in enumerate(runs):
        color = f"C{i}"
        tx, ty = _series(run.train, x, "loss")
        ex, ey = _series(run.eval, x, "eval_loss")
        data[run.name] = {"train": (tx, ty), "eval": (ex, ey)}
        if tx.size:
            ax.plot(tx, ty, color=color, alpha=0.8, label=f"{run.name} train")
        if ex.size:
            ax.plot(ex, ey, color=color, marker="o", linestyle="--", label=f"{run.name} eval")
    _finish(fig, ax, path, f"Loss vs {'tokens seen' if x == 'tokens' else 'step'}",
            "tokens seen" if x == "tokens" else "step", "loss")
    return data


def plot_learning_rate(runs: list[Run], path: Path | None = None) -> dict[str, dict[str, tuple]]:
    """The configured schedule (0..max_steps) and the logged learning rate of every run."""
    fig, ax = plt.subplots(figsize=(7, 4))
    data: dict[str, dict[str, tuple]] = {}
    for i, run in enumerate(runs):
        sx, sy = schedule_series(run.cfg)
        lx, ly = _series(run.train, "step", "learning_rate")
        data[run.name] = {"schedule": (sx, sy), "logged": (lx, ly)}
        ax.plot(sx, sy, color=f"C{i}", label=f"{run.name} schedule")
        if lx.size:
            ax.plot(lx, ly, color=f"C{i}", marker=".", linestyle="none", label=f"{run.name} logged")
    _finish(fig, ax, path, "Learning-rate schedule", "step", "learning rate")
    return data


def plot_metric(runs: list[Run], key: str, title: str, ylabel: str, path: Path | None = None,
                log_y: bool = False) -> dict[str, tuple]:
    """One training metric (grad_norm, tokens_per_second, mfu) against step; null values are skipped."""
    fig, ax = plt.subplots(figsize=(7, 4))
    data: dict[str, tuple] = {}
    for i, run in enumerate(runs):
        x, y = _series(run.train, "step", key)
        data[run.name] = (x, y)
        if x.size:
            ax.plot(x, y, color=f"C{i}", label=run.name)
    if not any(v[0].size for v in data.values()):
        ax.text(0.5, 0.5, f"no {key} logged", ha="center", va="center", transform=ax.transAxes)
    _finish(fig, ax, path, title, "step", ylabel, log_y=log_y and any(v[0].size for v in data.values()))
    return data


def summary(run: Run) -> dict[str, Any]:
    """Final and best eval loss, perplexity, tokens seen, steps and wall time of one run."""
    evals = [r for r in run.eval if r.get("eval_loss") is not None]
    final = evals[-1] if evals else None
    best = min(evals, key=lambda r: r["eval_loss"]) if evals else None
    last_train = run.train[-1] if run.train else {}
    tokens = max([r.get("tokens") or 0 for r in run.train + run.eval] or [0])
    return {
        "run": run.name,
        "steps": last_train.get("step"),
        "final train loss": last_train.get("loss"),
        "final eval loss": final["eval_loss"] if final else None,
        "final perplexity": final.get("perplexity") if final else None,
        "best eval loss": best["eval_loss"] if best else None,
        "best eval step": best["step"] if best else None,
        "best perplexity": best.get("perplexity") if best else None,
        "tokens": tokens,
        "wall time (s)": last_train.get("elapsed_s"),
    }


def language_losses(run: Run) -> dict[str, float]:
    """The last evaluation's held-out loss per language (``eval_loss/<language>``)."""
    evals = [r for r in run.eval if r.get("eval_loss") is not None]
    if not evals:
        return {}
    return {k.split("/", 1)[1]: v for k, v in sorted(evals[-1].items()) if k.startswith("eval_loss/")}


MIXTURE_HEADER = ["language", "corpus tokens", "natural share", "weight", "run tokens", "epochs"]


def mixture_rows(run: Run) -> list[list[Any]]:
    """Per-language token counts before (the corpus) and after weighting (the run's
    ``train.max_steps`` batches), from ``data_mixture.json``; empty without a mixture."""
    if not run.mixture:
        return []
    return [[language, c["corpus_tokens"], round(c["natural_share"], 4), round(c["weight"], 4), c["tokens"],
             round(c["epochs"], 3)] for language, c in sorted(run.mixture["languages"].items())]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(runs: list[Run]) -> dict[str, list[Any]]:
    """Config keys whose values differ between runs: {dotted.key: [value per run]}."""
    flats = [_flatten(C.to_dict(r.cfg)) for r in runs]
    keys = sorted(set().union(*flats)) if flats else []
    return {k: [f.get(k) for f in flats] for k in keys if len({repr(f.get(k)) for f in flats}) > 1}


FIGURES = [
    ("loss_vs_step.png", "Loss against step"),
    ("loss_vs_tokens.png", "Loss against tokens seen"),
    ("learning_rate.png", "Learning-rate schedule"),
    ("grad_norm.png", "Gradient norm"),
    ("tokens_per_second.png", "Throughput"),
    ("mfu.png", "Model FLOPs utilisation"),
]


def write_report(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Write the figures and ``index.html`` for ``run_dirs`` into ``out``; returns the page's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [load_run(d) for d in run_dirs]
    _unique_names(runs)
    plot_loss(runs, "step", out / "loss_vs_step.png")
    plot_loss(runs, "tokens", out / "loss_vs_tokens.png")
    plot_learning_rate(runs, out / "learning_rate.png")
    plot_metric(runs, "grad_norm", "Gradient norm (before clipping)", "global norm", out / "grad_norm.png", log_y=True)
    plot_metric(runs, "tokens_per_second", "Throughput", "tokens / s", out / "tokens_per_second.png")
    plot_metric(runs, "mfu", "Model FLOPs utilisation", "MFU", out / "mfu.png")

    summaries = [summary(r) for r in runs]
    header = list(summaries[0].keys())
    sections = [("Summary", table(header, [[s[h] for h in header] for s in summaries]))]
    per_language = [language_losses(r) for r in runs]
    languages = sorted(set().union(*per_language))
    if languages:
        rows = [[language, *[losses.get(language) for losses in per_language]] for language in languages]
        sections.append(("Final held-out loss by language", table(["language", *[r.name for r in runs]], rows)))
    for run in runs:
        rows = mixture_rows(run)
        if rows:
            sections.append((f"Training data by language: {run.name} (data.mixture)", table(MIXTURE_HEADER, rows)))
    if len(runs) > 1:
        diffs = config_differences(runs)
        rows = [[k, *v] for k, v in diffs.items()]
        content = table(["config key", *[r.name for r in runs]], rows) if rows else "<p>Identical configs.</p>"
        sections.append(("Config differences", content))
    sections += [(title, img(name)) for name, title in FIGURES]
    runs_list = "".join(f"<li>{html.escape(r.name)}: <code>{html.escape(str(r.path))}</code></li>" for r in runs)
    sections.append(("Runs", f"<ul>{runs_list}</ul>"))
    index = out / "index.html"
    index.write_text(page("codeneo run report: " + ", ".join(r.name for r in runs), sections))
    return index


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", required=True, help="run directory (repeat to overlay runs)")
    p.add_argument("--out", required=True, help="output folder for the PNGs and index.html")
    args = p.parse_args(argv)
    print(write_report(args.run, args.out))


if __name__ == "__main__":
    main()
