"""Model inspection: parameter table, positional embeddings, attention maps and next-token top-k on a text.

    python -m train.inspect (--run RUN_DIR | --hf HF_DIR) --text TEXT --out DIR [--top-k 5]

Writes PNGs and one self-contained ``index.html``. The attention maps are the model's own
attention probabilities (sown by the einsum attention path), not a re-implementation.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from data_processing.html_page import img, page, table  # noqa: E402
from train.config import ModelConfig  # noqa: E402
from train.core.model import Transformer, init_params  # noqa: E402
from train.core.sharding import LOGICAL_RULES  # noqa: E402


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def paramtable(cfg: ModelConfig, params) -> list[dict[str, Any]]:
    """One row per parameter: name, shape, count, dtype, logical axes and the mesh axes they shard over."""
    boxed = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    specs = {_path_name(p): s for p, s in jax.tree_util.tree_leaves_with_path(
        nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))}
    rules = dict(LOGICAL_RULES)
    rows = []
    for path, x in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(params)):
        name = _path_name(path)
        spec = specs.get(name)
        logical = tuple(spec) if spec is not None else ()
        mesh = tuple(rules.get(a) if a is not None else None for a in logical)
        rows.append({"name": name, "shape": tuple(int(d) for d in x.shape), "count": int(np.prod(x.shape)),
                     "dtype": str(x.dtype),
                     "sharding": ", ".join(f"{a}->{m}" for a, m in zip(logical, mesh, strict=True)) or "replicated"})
    return rows


def positional_embeddings(params, max_positions: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(wpe [P, D], cosine-similarity matrix [P, P]) over the first ``max_positions`` positions."""
    wpe = np.asarray(nn.meta.unbox(params)["wpe"], dtype=np.float32)
    if max_positions:
        wpe = wpe[:max_positions]
    unit = wpe / np.maximum(np.linalg.norm(wpe, axis=1, keepdims=True), 1e-12)
    return wpe, unit @ unit.T


def forward_with_attention(cfg: ModelConfig, params, ids: list[int]) -> tuple[np.ndarray, list[np.ndarray]]:
    """(logits [T, V] over the real vocabulary, [probs [H, T, T] per layer]) from one fp32 forward pass."""
    cfg = dataclasses.replace(cfg, attention_impl="einsum", compute_dtype="float32", remat="none")
    ids_1T = jnp.asarray([ids], jnp.int32)
    logits, state = Transformer(cfg).apply({"params": nn.meta.unbox(params)}, ids_1T, mutable=["intermediates"])
    inter = state["intermediates"]
    attn = [np.asarray(inter[f"h_{i}"]["attn"]["attention_probs"][0][0], dtype=np.float64)
            for i in range(cfg.num_layers)]
    return np.asarray(logits[0, :, :cfg.vocab_size], dtype=np.float64), attn


def top_k(logits_TV: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [T, k], probabilities [T, k]) of the k most likely next tokens at each position."""
    z = logits_TV - logits_TV.max(-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(-1, keepdims=True)
    idx = np.argsort(-p, axis=-1, kind="stable")[:, :k]
    return idx, np.take_along_axis(p, idx, -1)


def plot_positional(wpe: np.ndarray, cos: np.ndarray, path: Path | None = None) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    im = axes[0].imshow(wpe, aspect="auto", cmap="RdBu_r", interpolation="nearest")
    axes[0].set_title("positional embeddings (wpe)")
    axes[0].set_xlabel("dimension")
    axes[0].set_ylabel("position")
    fig.colorbar(im, ax=axes[0])
    im = axes[1].imshow(cos, cmap="viridis", vmin=-1, vmax=1, interpolation="nearest")
    axes[1].set_title("cosine similarity between positions")
    axes[1].set_xlabel("position")
    axes[1].set_ylabel("position")
    fig.colorbar(im, ax=axes[1])
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_attention(probs: np.ndarray, kind: str, layer: int, tokens: list[str], window: int,
                   path: Path | None = None) -> np.ndarray:
    """All heads of one layer side by side; returns the plotted [H, T, T] probabilities."""
    H, T, _ = probs.shape
    fig, axes = plt.subplots(1, H, figsize=(3.2 * H + 1, 3.4 + 0.05 * T), squeeze=False)
    label = f"layer {layer} ({kind}" + (f", window {window})" if kind == "local" else ")")
    for h in range(H):
        ax = axes[0, h]
        ax.imshow(probs[h], cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{label} head {h}", fontsize=8)
        if T <= 48:
            ax.set_xticks(range(T))
            ax.set_xticklabels(tokens, rotation=90, fontsize=6)
            ax.set_yticks(range(T))
            ax.set_yticklabels(tokens, fontsize=6)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return probs


def plot_top_k(tokens: list[str], probs: np.ndarray, labels: list[list[str]], path: Path | None = None) -> None:
    """Stacked bars of the top-k next-token probabilities at each position, top-1 labelled."""
    T, k = probs.shape
    fig, ax = plt.subplots(figsize=(max(6, 0.4 * T + 2), 4))
    bottom = np.zeros(T)
    for j in range(k):
        ax.bar(range(T), probs[:, j], bottom=bottom, label=f"top-{j + 1}")
        bottom += probs[:, j]
    for t in range(T):
        ax.text(t, min(bottom[t], 1.0) + 0.01, labels[t][0], rotation=90, ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(T))
    ax.set_xticklabels(tokens, rotation=90, fontsize=6)
    ax.set_ylim(0, 1.3)
    ax.set_ylabel("probability")
    ax.set_title("top-k next-token probabilities (label: top-1)")
    ax.legend(fontsize=7, ncol=k, loc="upper right")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    plt.close(fig)


def _tok(tokenizer, i: int) -> str:
    return repr(tokenizer.decode([int(i)]))[1:-1]


def inspect_model(cfg: ModelConfig, params, tokenizer, text: str, out: str | Path, k: int = 5,
                  max_positions: int = 512) -> dict[str, Any]:
    """Write every figure and ``index.html`` into ``out``; returns the computed data."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids = tokenizer.encode(text)[: cfg.max_position_embeddings]
    if not ids:
        raise ValueError("--text encodes to no tokens")
    tokens = [_tok(tokenizer, i) for i in ids]
    rows = paramtable(cfg, params)
    wpe, cos = positional_embeddings(params, max_positions)
    plot_positional(wpe, cos, out / "positional.png")
    logits, attn = forward_with_attention(cfg, params, ids)
    kinds = cfg.layer_kinds
    attn_files = []
    for i, probs in enumerate(attn):
        name = f"attention_layer{i}.png"
        plot_attention(probs, kinds[i], i, tokens, cfg.window_size, out / name)
        attn_files.append((i, kinds[i], name))
    top_ids, top_p = top_k(logits, k)
    labels = [[_tok(tokenizer, i) for i in row] for row in top_ids]
    plot_top_k(tokens, top_p, labels, out / "top_k.png")

    total = sum(r["count"] for r in rows)
    param_rows = [[r["name"], str(r["shape"]), r["count"], r["dtype"], r["sharding"]] for r in rows]
    param_rows.append(["total", "", total, "", ""])
    topk_rows = [[t, tokens[t], *[f"{lab} ({p:.3f})" for lab, p in zip(labels[t], top_p[t], strict=True)]]
                 for t in range(len(ids))]
    model_rows = [[f.name, getattr(cfg, f.name)] for f in dataclasses.fields(cfg)]
    sections = [
        ("Model", table(["field", "value"], [[a, str(b)] for a, b in model_rows])),
        ("Parameters", table(["name", "shape", "count", "dtype", "sharding (logical->mesh)"], param_rows)),
        ("Positional embeddings", img("positional.png")),
        ("Attention on the text", "".join(f"<h3>layer {i} ({kind})</h3>{img(n)}" for i, kind, n in attn_files)),
        ("Next-token top-k", img("top_k.png") + table(
            ["position", "token", *[f"top-{j + 1}" for j in range(k)]], topk_rows)),
    ]
    intro = f"<p>Text: <code>{html.escape(text)}</code> ({len(ids)} tokens)</p>"
    (out / "index.html").write_text(page("codeneo model inspection", sections, intro))
    return {"ids": ids, "tokens": tokens, "params": rows, "wpe": wpe, "cos": cos, "attention": attn,
            "logits": logits, "top_ids": top_ids, "top_p": top_p, "page": out / "index.html"}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory (latest checkpoint)")
    src.add_argument("--hf", help="Hugging Face model folder (with its tokenizer)")
    p.add_argument("--text", required=True, help="text to run through the model")
    p.add_argument("--out", required=True, help="output folder for the PNGs and index.html")
    p.add_argument("--top-k", type=int, default=5, help="next-token candidates shown per position")
    p.add_argument("--max-positions", type=int, default=512, help="positions shown in the wpe figures")
    args = p.parse_args(argv)
    from train.inference.decoding import load_model

    cfg, params, tokenizer = load_model(run_dir=args.run, hf_dir=args.hf)
    res = inspect_model(cfg, params, tokenizer, args.text, args.out, k=args.top_k, max_positions=args.max_positions)
    print(res["page"])


if __name__ == "__main__":
    main()
