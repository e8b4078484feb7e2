"""Shared sample text for the tokenizer tests: real local source files plus edge cases.

The "real local sample" is every top-level ``*.py`` module of the running Python's standard
library (present on any machine that runs the tests), plus synthetic files that make sure tabs,
CRLF line ends, non-ASCII text, emoji and very long lines are always covered.
"""

from __future__ import annotations

import functools
import sysconfig
from pathlib import Path

from data_processing.shards import write_shard

# Top-level stdlib modules only: small enough to stay fast, stable across Python versions.
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(limit_bytes: int = 800_000) -> list[Path]:
    """Sorted top-level stdlib ``*.py`` files, up to ``limit_bytes`` in total."""
    out, total = [], 0
    for path in sorted(STDLIB.glob("*.py")):
        size = path.stat().st_size
        if total + size > limit_bytes:
            continue
        out.append(path)
        total += size
    assert len(out) > 20, f"too few stdlib files under {STDLIB}"
    return out


def edge_case_texts() -> dict[str, str]:
    """Synthetic files covering what stdlib files may lack."""
    return {
        "tabs.py": "class A:\n\tdef f(self):\n\t\tif x:\n\t\t\treturn 1\t# tab\n\t\n",
        "crlf.py": "def f():\r\n    return 1\r\n\r\n\r\nclass B:\r\n        pass\r\n",
        "unicode.py": "s = 'héllo wörld ñ ü ß 中文 日本語 Ελληνικά русский'\n# naïve café\n",
        "emoji.md": "# Title 😀🚀\n\n- item 👍🏽 👨‍👩‍👧 ✔️\n```\nprint('🐍')\n```\n",
        "long_line.js": "var x = [" + ", ".join(str(i) for i in range(20000)) + "];\n" + "a" * 50000 + "\n",
        "mixed_ws.py": "x = 1  \n  \n    y  =  2   \n\t    \t  z\n" + " " * 37 + "end\n   ",
        "leading_space.txt": "  two\n   three\n     five spaces then text",
        "specialish.txt": "text <|endoftext|> more <|endoftext|>\n",
        "control.bin.txt": "".join(chr(i) for i in range(1, 32)) + "\x7f\u00a0\u2028\ufeff",
        "empty_lines.py": "\n\n\n",
    }


def sample_texts() -> dict[str, str]:
    """Every sample file's text, keyed by name."""
    texts = {p.name: p.read_text(encoding="utf-8", errors="strict") for p in stdlib_files()}
    texts.update(edge_case_texts())
    return texts


def write_sample_shards(folder: Path, texts: list[str], per_shard: int = 50) -> Path:
    """Write ``texts`` as ``.jsonl.zst`` shards under ``folder``; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(0, len(texts), per_shard):
        records = [{"text": t, "meta": {"i": i + j}} for j, t in enumerate(texts[i : i + per_shard])]
        write_shard(folder / f"part-{i // per_shard:05d}.jsonl.zst", records)
    return folder


@functools.cache
def _trained_json(vocab_size: int) -> str:
    from tokenizer.train_tokenizer import train_bpe

    # Stdlib only: a 50 kB single "word" (long_line.js) makes BPE training slow, and encoding
    # edge cases correctly must not depend on having trained on them.
    texts = [p.read_text(encoding="utf-8") for p in stdlib_files()]
    return train_bpe([texts], vocab_size=vocab_size, progress=False).to_str()


def small_tokenizer(vocab_size: int = 1000):
    """A fresh (mutable) fast tokenizer trained on the sample; training is cached per process."""
    from tokenizers import Tokenizer

    from tokenizer.train_tokenizer import wrap_fast

    return wrap_fast(Tokenizer.from_str(_trained_json(vocab_size)))
