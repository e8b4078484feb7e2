"""Zip the packages a Spark dedup job imports, for ``spark-submit --py-files`` / Dataproc.

    python run_scripts/pack_py_files.py OUT.zip

Only ``data_processing/*.py`` goes in (no caches, no tests, nothing of ``train/``: executors need
numpy, zstandard and pyarrow from their own Python, not JAX). Written to a temporary name and
renamed, like every other output of the project.
"""

from __future__ import annotations

import os
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("data_processing",)


def pack(out: str | os.PathLike) -> list[str]:
    """Write the zip; returns the archive names it holds."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    names = []
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for package in PACKAGES:
            for path in sorted((ROOT / package).rglob("*.py")):
                if "__pycache__" in path.parts:
                    continue
                name = path.relative_to(ROOT).as_posix()
                zf.write(path, name)
                names.append(name)
    os.replace(tmp, out)
    return names


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python run_scripts/pack_py_files.py OUT.zip")
    print(f"{sys.argv[1]}: {len(pack(sys.argv[1]))} files")
