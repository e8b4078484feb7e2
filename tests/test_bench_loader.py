"""The loader benchmark runs end to end on its smallest corpus and reports its JSON fields."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_loader_smallest_path():
    out = subprocess.run(
        [
            sys.executable,
            "bench/loader.py",
            "--quick",
            "--mb",
            "0.3",
            "--vocab-size",
            "500",
            "--block-size",
            "128",
            "--batch-size",
            "4",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=1200,  # a bound against a hang only
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in (
        "tokens_per_second",
        "peer_tokens_per_second",
        "speedup",
        "cold_tokens_per_second",
        "cached_tokens_per_second",
        "cached_speedup",
        "cache_build_tokens_per_second",
        "peer_cached_tokens_per_second",
        "cpu_count",
        "load_avg_1m_before",
        "num_workers",
        "block_size",
        "mb",
    ):
        assert key in result, key
    assert result["tokens_per_second"] > 0 and result["peer_tokens_per_second"] > 0
    assert result["cold_tokens_per_second"] == result["tokens_per_second"]
    assert result["peer_cached_tokens_per_second"] > 0 and result["cache_build_tokens_per_second"] > 0
    # Reading the cache skips the tokenizer (and the worker process start): it must be faster.
    assert result["cached_tokens_per_second"] > result["cold_tokens_per_second"]
    assert result["block_size"] == 128


@pytest.mark.slow
def test_bench_loader_stages_smallest_path():
    out = subprocess.run(
        [sys.executable, "bench/loader_stages.py", "--mb", "0.3", "--vocab-size", "500"],
        cwd=ROOT, check=True, capture_output=True, text=True, timeout=1200,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    stages = {"read_zstd_lines", "docstream_json_shuffle", "tokenizer", "ids_to_numpy", "pack"}
    assert set(result["cpu_seconds"]) >= stages
    assert result["tokens"] > 0 and result["tokenizer_tokens_per_cpu_second"] > 0
    assert abs(sum(result["share"].values()) - 1.0) < 0.01
