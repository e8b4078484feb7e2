"""Test-wide environment: 8 simulated CPU devices, no hub access, no wandb account.

These must be set before JAX or transformers are imported, which is why they live here.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Many tests (and their subprocesses, which inherit the environment) compile the same tiny
# train step; a persistent compilation cache shared by pytest-xdist workers saves most of it.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


import sysconfig  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """Real Python files from the standard library as train/validation shards, plus a 512-token
    BPE trained on them: ``(data_dir, tokenizer_dir)``. Built once per test session."""
    from data_processing.shards import write_shard
    from tokenizer.train_tokenizer import save_tokenizer, train_bpe, wrap_fast

    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if 2_000 < p.stat().st_size < 60_000)[:120]
    records = [{"text": p.read_text(encoding="utf-8", errors="replace"),
                "meta": {"repo_name": "stdlib", "file_name": p.name, "language": "Python"}} for p in files]
    write_shard(root / "data" / "train" / "train-00000.jsonl.zst", records[:60])
    write_shard(root / "data" / "train" / "train-00001.jsonl.zst", records[60:110])
    write_shard(root / "data" / "validation" / "validation-00000.jsonl.zst", records[110:])
    tok = train_bpe((r["text"] for r in records[:110]), vocab_size=512, progress=False)
    save_tokenizer(wrap_fast(tok), root / "tokenizer")
    return root / "data", root / "tokenizer"


@pytest.fixture(scope="session")
def spark():
    """One local Spark session (2 cores, small shuffles, no UI) shared by every Spark test of the
    session; a missing PySpark or Java fails these tests with the install command."""
    from data_processing.dedup.spark_util import get_session

    session = get_session("local[2]", {"spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false",
                                       "spark.sql.shuffle.partitions": "2"})
    yield session
    session.stop()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A byte-level BPE (vocab 1000) trained in under a second on some stdlib source."""
    from tests.helpers import byte_level_bpe, stdlib_texts

    tok = byte_level_bpe(stdlib_texts(300_000), 1000)
    out = tmp_path_factory.mktemp("tok")
    tok.save(str(out / "tokenizer.json"))
    return out
