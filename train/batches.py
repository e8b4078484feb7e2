"""``python -m train.batches --config C [--set k=v ...] --steps N --out FILE.jsonl``: the first N
global training batches exactly as the trainer consumes them, one JSON line per row: ``step``
(1-based, as in metrics.jsonl), ``row``, ``tokens`` (ids; -1 = padding) and ``text`` (decoded);
with ``data.mixture`` (every row from one language) also ``language``.

It builds the run's loader the way ``python -m train`` does (same tokenizer, token cache, data
order, seed and global batch), as one process: the global order gives every process count the
same global batches, so this is what a multi-host run steps on too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from train import config as C


def write_batches(cfg: C.Config, steps: int, out: str | os.PathLike) -> Path:
    """Write the first ``steps`` global batches of ``cfg``'s run to ``out`` (atomically)."""
    import jax

    from data_processing.tokens import load_tokenizer_file
    from train.interop import vocab
    from train.run import make_train_loader, resolve

    cfg = resolve(vocab.prepare_tokenizer(cfg, cfg.run.output_dir), jax.device_count())
    tokenizer, _ = load_tokenizer_file(cfg.tokenizer.path)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    loader = make_train_loader(cfg)
    try:
        with tmp.open("w") as f:
            for step in range(1, steps + 1):
                languages = _batch_languages(loader)
                for row, tokens in enumerate(next(loader).tolist()):
                    text = tokenizer.decode([t for t in tokens if t >= 0], skip_special_tokens=False)
                    record = {"step": step, "row": row, "tokens": tokens, "text": text}
                    if languages is not None:
                        record["language"] = languages[row]
                    f.write(json.dumps(record) + "\n")
        os.replace(tmp, out)
    finally:
        loader.close()
        tmp.unlink(missing_ok=True)
    return out


def _batch_languages(loader) -> list[str] | None:
    """The language of each row of the loader's next batch, when it has a mixture (else None)."""
    if getattr(loader, "mixture", None) is None:
        return None
    return loader.languages_at(loader.local_positions(loader.position)[0])


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m train.batches", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file (e.g. configs/tiny.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--steps", type=int, default=1, help="global batches to write (default 1)")
    parser.add_argument("--out", required=True, help="output .jsonl file")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps: expected a positive number of batches, got {args.steps}")
    try:
        path = write_batches(C.load(args.config, args.overrides), args.steps, args.out)
    except (C.ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.steps} global batches to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
