"""Data report: PNG figures and one self-contained ``index.html`` from ``DATA_DIR/report.json``.

    python -m data_processing.report --data DATA_DIR --out DIR

Reads only the report the prepare stage already writes (fields in ``docs/data.md``); matplotlib only,
no jax and nothing from ``train/``. Plotting functions return the plotted series for tests.
"""

from __future__ import annotations

import argparse
import json
from html import escape
from pathlib import Path
from typing import Any

import matplotlib

from data_processing.html_page import img, page, table

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load_report(data_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(data_dir) / "report.json").read_text())


def _save(fig, path: Path | None) -> None:
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    plt.close(fig)


def language_series(report: dict[str, Any]) -> dict[str, dict[str, dict[str, int]]]:
    """{language: {"ingested"|"train"|"validation": {"files", "bytes"}}} from ``report["languages"]``."""
    out = {}
    for lang, t in report.get("languages", {}).items():
        out[lang] = {k: {"files": int(t.get(k, {}).get("files", 0)), "bytes": int(t.get(k, {}).get("bytes", 0))}
                     for k in ("ingested", "train", "validation")}
    return out


def plot_languages(report: dict[str, Any], path: Path | None = None) -> dict[str, dict[str, list]]:
    """Grouped bars of files and bytes per language (ingested / train / validation)."""
    langs = language_series(report)
    names = list(langs)
    fig, axes = plt.subplots(1, 2, figsize=(11, max(3, 0.35 * len(names) + 1.5)))
    data: dict[str, dict[str, list]] = {}
    for ax, unit in zip(axes, ("files", "bytes"), strict=True):
        data[unit] = {}
        h = 0.27
        for j, stage in enumerate(("ingested", "train", "validation")):
            vals = [langs[n][stage][unit] for n in names]
            data[unit][stage] = vals
            ax.barh([i + (j - 1) * h for i in range(len(names))], vals, height=h, label=stage)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names)
        ax.invert_yaxis()
        ax.set_xlabel(unit)
        ax.set_title(f"{unit} per language")
        ax.legend(fontsize=8)
    _save(fig, path)
    data["languages"] = names
    return data


def dropped_series(report: dict[str, Any]) -> dict[str, dict[str, int]]:
    """{stage:reason: {"files", "bytes"}} for everything removed: ingest skips, filter drops, files holding
    benchmark problems (``decontaminate:{benchmark}``), exact and near dups."""
    out: dict[str, dict[str, int]] = {}
    for reason, v in report.get("ingest", {}).get("skipped", {}).items():
        out[f"ingest:{reason}"] = {"files": int(v.get("files", 0)), "bytes": int(v.get("bytes", 0))}
    for reason, v in report.get("filters", {}).get("dropped", {}).items():
        out[f"filter:{reason}"] = {"files": int(v.get("files", 0)), "bytes": int(v.get("bytes", 0))}
    for name, v in report.get("decontamination", {}).get("benchmarks", {}).items():
        out[f"decontaminate:{name}"] = {"files": int(v.get("files_removed", 0)),
                                        "bytes": int(v.get("bytes_removed", 0))}
    dedup = report.get("dedup", {})
    if dedup:
        ex, nr = dedup.get("exact", {}), dedup.get("near", {})
        out["dedup:exact"] = {"files": int(ex.get("removed_files", 0)), "bytes": int(ex.get("removed_bytes", 0))}
        out["dedup:near"] = {"files": int(nr.get("removed_files", 0)), "bytes": int(nr.get("removed_bytes", 0))}
    return out


def decontamination_rows(report: dict[str, Any]) -> tuple[list[list[Any]], list[list[Any]]]:
    """Table rows of the decontamination section: per benchmark (problems, files and bytes
    removed) and per removed file (repository, path, benchmark, task ids, test, n-gram share)."""
    dec = report.get("decontamination", {})
    per_benchmark = [[name, v.get("problems"), v.get("files_removed"), v.get("bytes_removed")]
                     for name, v in dec.get("benchmarks", {}).items()]
    removed = [[r.get("repo"), r.get("path"), r.get("benchmark"), ", ".join(r.get("task_ids", [])), r.get("match"),
                r.get("ngram_score")] for r in dec.get("removed", [])]
    return per_benchmark, removed


def plot_dropped(report: dict[str, Any], path: Path | None = None) -> dict[str, dict[str, int]]:
    """Horizontal bars: files and bytes removed per stage and reason."""
    drops = dropped_series(report)
    names = list(drops)
    fig, axes = plt.subplots(1, 2, figsize=(11, max(3, 0.35 * len(names) + 1.5)))
    for ax, unit in zip(axes, ("files", "bytes"), strict=True):
        vals = [drops[n][unit] for n in names]
        ax.barh(range(len(names)), vals, color=["C0" if n.startswith("ingest") else "C1" if n.startswith("filter")
                                                else "C2" if n.startswith("decontaminate") else "C3" for n in names])
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(unit)
        ax.set_title(f"dropped {unit} by reason")
    if not names:
        axes[0].text(0.5, 0.5, "nothing dropped", ha="center", va="center", transform=axes[0].transAxes)
    _save(fig, path)
    return drops


def cluster_histogram(report: dict[str, Any]) -> tuple[list[int], list[int]]:
    """(cluster sizes, number of clusters of that size), sorted by size."""
    hist = report.get("dedup", {}).get("near", {}).get("cluster_size_histogram", {}) or {}
    pairs = sorted((int(k), int(v)) for k, v in hist.items())
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_clusters(report: dict[str, Any], path: Path | None = None) -> tuple[list[int], list[int]]:
    """Near-duplicate cluster-size histogram (log count axis)."""
    sizes, counts = cluster_histogram(report)
    fig, ax = plt.subplots(figsize=(7, 4))
    if sizes:
        ax.bar([str(s) for s in sizes], counts, color="C3")
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no near-duplicate clusters", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("cluster size (files)")
    ax.set_ylabel("clusters")
    ax.set_title("Near-duplicate cluster sizes")
    _save(fig, path)
    return sizes, counts


def plot_split(report: dict[str, Any], path: Path | None = None) -> dict[str, dict[str, int]]:
    """Train/validation files, bytes and repositories."""
    split = {side: {k: int(report.get("split", {}).get(side, {}).get(k, 0)) for k in ("files", "bytes", "repositories")}
             for side in ("train", "validation")}
    fig, axes = plt.subplots(1, 3, figsize=(10, 3))
    for ax, unit in zip(axes, ("files", "bytes", "repositories"), strict=True):
        ax.bar(["train", "validation"], [split["train"][unit], split["validation"][unit]], color=["C0", "C2"])
        ax.set_title(unit)
    _save(fig, path)
    return split


FIGURES = ["languages.png", "dropped.png", "dedup_clusters.png", "split.png"]


def write_report(data_dir: str | Path, out: str | Path) -> Path:
    """Write the data figures and ``index.html`` into ``out``; returns the page's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rep = load_report(data_dir)
    plot_languages(rep, out / "languages.png")
    drops = plot_dropped(rep, out / "dropped.png")
    plot_clusters(rep, out / "dedup_clusters.png")
    split = plot_split(rep, out / "split.png")

    langs = language_series(rep)
    lang_rows = [[n, t["ingested"]["files"], t["ingested"]["bytes"], t["train"]["files"], t["train"]["bytes"],
                  t["validation"]["files"], t["validation"]["bytes"]] for n, t in langs.items()]
    largest = rep.get("dedup", {}).get("near", {}).get("largest_clusters", []) or []
    cluster_rows = [[c.get("size"), c.get("survivor"), ", ".join(c.get("examples", []))] for c in largest]
    ingest = rep.get("ingest", {})
    sections = [
        ("Overview", table(["files seen", "kept by ingest", "after filters", "after dedup", "train", "validation"],
                            [[ingest.get("files_seen"), ingest.get("files_kept"),
                              rep.get("filters", {}).get("kept", {}).get("files"),
                              rep.get("dedup", {}).get("output", {}).get("files"),
                              split["train"]["files"], split["validation"]["files"]]])),
        ("Languages", img("languages.png") + table(
            ["language", "ingested files", "ingested bytes", "train files", "train bytes", "validation files",
             "validation bytes"], lang_rows)),
        ("Dropped", img("dropped.png") + table(["stage:reason", "files", "bytes"],
                                                 [[k, v["files"], v["bytes"]] for k, v in drops.items()])),
        ("Licenses", _licenses_html(rep)),
        ("Redaction (secrets and personal data)", _redaction_html(rep)),
        ("Decontamination", _decontamination_html(rep)),
        ("Dedup clusters", img("dedup_clusters.png") + table(["size", "survivor", "removed examples"],
                                                                cluster_rows)),
        ("Train / validation split", img("split.png") + table(
            ["split", "files", "bytes", "repositories"], [[s, *split[s].values()] for s in ("train", "validation")])),
    ]
    title = f"codeneo data report: {Path(data_dir)}"
    index = out / "index.html"
    index.write_text(page(title, sections))
    return index


def license_rows(report: dict[str, Any]) -> tuple[list[list[Any]], list[list[Any]]]:
    """Table rows of the license section: per decision and per license value (files, bytes)."""
    lic = report.get("licenses", {})
    by_decision = [[k, v.get("files", 0), v.get("bytes", 0)] for k, v in lic.get("by_decision", {}).items()]
    by_license = [[k, v.get("decision", ""), v.get("files", 0), v.get("bytes", 0)]
                  for k, v in lic.get("by_license", {}).items()]
    return by_decision, by_license


def _licenses_html(rep: dict[str, Any]) -> str:
    """The license section: the policy, then counts per decision and per license."""
    if "licenses" not in rep:
        return "<p>not recorded (a report written before the stage existed)</p>"
    by_decision, by_license = license_rows(rep)
    policy = rep["licenses"].get("policy", "any")
    return (f"<p>policy: {escape(str(policy))}</p>" + table(["decision", "files", "bytes"], by_decision)
            + table(["license", "decision", "files", "bytes"], by_license))


def _redaction_html(rep: dict[str, Any]) -> str:
    """The redaction section: off, or placeholders written per kind and files changed."""
    red = rep.get("redact", {})
    if not red.get("enabled"):
        return "<p>off (or a report written before the stage existed)</p>"
    rows = [[kind, n] for kind, n in red.get("redacted", {}).items()]
    return (table(["files scanned", "files changed", "placeholders written"],
                  [[red.get("files"), red.get("files_changed"), red.get("redacted_total")]])
            + table(["kind", "redacted"], rows))


def _decontamination_html(rep: dict[str, Any]) -> str:
    """The decontamination section: off, or the per-benchmark and removed-file tables."""
    if not rep.get("decontamination", {}).get("enabled"):
        return "<p>off (or a report written before the stage existed)</p>"
    per_benchmark, removed = decontamination_rows(rep)
    return (table(["benchmark", "problems", "files removed", "bytes removed"], per_benchmark)
            + table(["repository", "file", "benchmark", "task ids", "match", "n-gram share"], removed))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="DATA_DIR holding report.json (from data_processing.prepare)")
    p.add_argument("--out", required=True, help="output folder for the PNGs and index.html")
    args = p.parse_args(argv)
    print(write_report(args.data, args.out))


if __name__ == "__main__":
    main()
