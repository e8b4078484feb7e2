"""train.report: figures from a synthetic metrics file with known values; the HTML page links only existing files."""

import json
import re
from pathlib import Path

import numpy as np

from tests.helpers import tiny_config
from train import config as C
from train.core.optimizer import learning_rate_schedule
from train.reports import run_report as R


def _fake_run(path: Path, name: str, lr: float, steps: int = 20, eval_every: int = 5) -> Path:
    cfg = tiny_config(f"run.name={name}", f"optimizer.learning_rate={lr}", f"train.max_steps={steps}",
                      "schedule.warmup_steps=4", "schedule.decay_steps=16", "schedule.decay=cosine")
    C.save(cfg, path)
    sched = learning_rate_schedule(cfg.optimizer, cfg.schedule)
    lines = []
    for s in range(1, steps + 1):
        lines.append({"step": s, "loss": 5.0 / s, "learning_rate": float(sched(s - 1)), "grad_norm": 1.0 + s,
                      "tokens": 64 * s, "tokens_per_second": 100.0 * s, "mfu": None if s < 3 else 0.01 * s,
                      "elapsed_s": 0.5 * s})
        if s % eval_every == 0:
            lines.append({"step": s, "eval_loss": 6.0 / s + (1.0 if s == steps else 0.0),
                          "perplexity": float(np.exp(6.0 / s)), "tokens": 64 * s})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def test_series_equal_sources(tmp_path):
    run = R.load_run(_fake_run(tmp_path / "a", "a", 1e-3))
    lr = R.plot_learning_rate([run])["a"]
    sched = learning_rate_schedule(run.cfg.optimizer, run.cfg.schedule)
    np.testing.assert_array_equal(lr["schedule"][0], np.arange(1, 21))
    np.testing.assert_allclose(lr["schedule"][1], [float(sched(s)) for s in range(20)], rtol=0, atol=0)
    assert lr["schedule"][1][0] == 0.0 and max(lr["schedule"][1]) == np.float32(1e-3)
    np.testing.assert_array_equal(lr["logged"][1], lr["schedule"][1])  # logged lr of step s = schedule(s - 1)

    loss = R.plot_loss([run], "tokens")["a"]
    np.testing.assert_array_equal(loss["train"][0], 64 * np.arange(1, 21))
    np.testing.assert_allclose(loss["train"][1], 5.0 / np.arange(1, 21))
    np.testing.assert_array_equal(loss["eval"][0], [320, 640, 960, 1280])

    mfu = R.plot_metric([run], "mfu", "MFU", "MFU")["a"]
    np.testing.assert_array_equal(mfu[0], np.arange(3, 21))  # null MFU values are skipped

    s = R.summary(run)
    assert s["final eval loss"] == 6.0 / 20 + 1.0
    assert s["best eval loss"] == 6.0 / 15 and s["best eval step"] == 15
    assert s["tokens"] == 1280 and s["wall time (s)"] == 10.0 and s["steps"] == 20


def test_figure_data_read_back_from_axes(tmp_path):
    """The line drawn in the figure is the schedule function itself (read back from matplotlib)."""
    import matplotlib.pyplot as plt

    run = R.load_run(_fake_run(tmp_path / "a", "a", 2e-3))
    captured = {}
    orig = plt.close

    def keep(fig=None):
        captured["fig"] = fig

    plt.close = keep
    try:
        R.plot_learning_rate([run])
    finally:
        plt.close = orig
    line = captured["fig"].axes[0].get_lines()[0]
    xy = line.get_xydata()
    sched = learning_rate_schedule(run.cfg.optimizer, run.cfg.schedule)
    np.testing.assert_allclose(xy[:, 1], [float(sched(int(x) - 1)) for x in xy[:, 0]], rtol=1e-7)
    plt.close(captured["fig"])


def test_report_two_runs_html(tmp_path):
    a = _fake_run(tmp_path / "a", "a", 1e-3)
    b = _fake_run(tmp_path / "b", "b", 3e-3)
    out = tmp_path / "report"
    R.main(["--run", str(a), "--run", str(b), "--out", str(out)])
    page = (out / "index.html").read_text()
    refs = re.findall(r"(?:src|href)=['\"]([^'\"]+)['\"]", page)
    assert len(refs) >= 6
    for ref in refs:
        assert not ref.startswith(("http:", "https:", "//")), ref
        assert (out / ref).is_file(), ref
    assert "<script" not in page
    for name, _ in R.FIGURES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    diffs = R.config_differences([R.load_run(a), R.load_run(b)])
    assert diffs["optimizer.learning_rate"] == [1e-3, 3e-3] and diffs["run.name"] == ["a", "b"]
    assert "optimizer.learning_rate" in page


def test_per_language_eval_loss_table(tmp_path):
    """The last evaluation's ``eval_loss/<language>`` values appear per run in the report."""
    a = _fake_run(tmp_path / "a", "a", 1e-3)
    with (a / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 21, "eval_loss": 2.5, "eval_loss/python": 2.25, "eval_loss/c": 3.125}) + "\n")
    assert R.language_losses(R.load_run(a)) == {"c": 3.125, "python": 2.25}
    out = tmp_path / "report"
    R.main(["--run", str(a), "--out", str(out)])
    page = (out / "index.html").read_text()
    assert "Final held-out loss by language" in page and "<td>python</td><td>2.25</td>" in page


def test_mixture_token_counts_table(tmp_path):
    """A run's ``data_mixture.json`` (data.mixture) appears as per-language token counts before and after weighting."""
    a = _fake_run(tmp_path / "a", "a", 1e-3)
    counts = {"python": {"corpus_tokens": 900, "corpus_rows": 9, "natural_share": 0.9, "weight": 0.5, "rows": 40,
                         "tokens": 1280, "epochs": 4.444},
              "go": {"corpus_tokens": 100, "corpus_rows": 1, "natural_share": 0.1, "weight": 0.5, "rows": 40,
                     "tokens": 1280, "epochs": 40.0}}
    (a / "data_mixture.json").write_text(json.dumps({"mixture": {"go": 0.5}, "languages": counts}))
    assert [r[0] for r in R.mixture_rows(R.load_run(a))] == ["go", "python"]
    out = tmp_path / "report"
    R.main(["--run", str(a), "--out", str(out)])
    page = (out / "index.html").read_text()
    assert "Training data by language: a (data.mixture)" in page and "<td>go</td><td>100</td><td>0.1</td>" in page
    b = _fake_run(tmp_path / "b", "b", 1e-3)
    assert R.mixture_rows(R.load_run(b)) == []
