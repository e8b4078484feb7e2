"""lm-evaluation-harness against the server: ``local-completions`` (token-id prompts, echo,
logprobs, the remote tokenizer over /tokenize) gives the same acc, bits_per_byte and exact_match
as lm-eval's own ``hf`` model on the exported folder. Offline: tasks in a local YAML over local
JSONL files (``dataset_path: json``, ``--include_path``)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.test_serve import _free_port
from tests.test_trainer import _cfg

CODE = (Path(__file__).parents[1] / "train" / "inference" / "decoding.py").read_text(encoding="utf-8")

TASKS = """
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: {output_type}
{rest}
"""
MC = """doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""
ROLLING = """doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
"""
GEN = """doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
"""


def _tasks(folder, greedy) -> None:
    """Three tasks over snippets of this repository's code. Half the generation targets are the
    model's own greedy line, so exact_match is neither 0 nor 1 by construction."""
    lines = [ln for ln in CODE.splitlines() if len(ln.strip()) > 12][:40]
    mc = [{"question": lines[i], "choices": [" " + lines[i + 1].strip(), " pass", " return None", "\n"],
           "label": i % 4} for i in range(0, 16, 2)]
    rolling = [{"text": CODE[i * 900:(i + 1) * 900 + i * 700]} for i in range(3)]  # the last spans windows
    prompts = [ln + "\n" for ln in lines[20:28]]
    gen = [{"prompt": p, "answer": greedy(p) if i % 2 == 0 else "no such line"} for i, p in enumerate(prompts)]
    for name, docs, output_type, rest in (("mc", mc, "multiple_choice", MC),
                                          ("rolling", rolling, "loglikelihood_rolling", ROLLING),
                                          ("gen", gen, "generate_until", GEN)):
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
        (folder / f"{name}.yaml").write_text(TASKS.format(name=f"codeneo_{name}", path=path, output_type=output_type,
                                                          rest=rest.format()), encoding="utf-8")


def _evaluate(model, model_args, include):
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["codeneo_mc", "codeneo_rolling",
                                                                              "codeneo_gen"],
                                  task_manager=TaskManager(include_path=str(include), include_defaults=False),
                                  log_samples=True, bootstrap_iters=0, random_seed=0)
    return out["results"], out["samples"]


@pytest.mark.slow
def test_lm_eval_local_completions_equals_hf(tiny_corpus, tmp_path):
    from train.inference.decoding import decode_text, generate_ids, load_model
    from train.interop.export import export
    from train.run import train

    train(_cfg(tiny_corpus, tmp_path / "run", "train.max_steps=3", "train.eval_every=0"))
    hf_dir, _ = export(str(tmp_path / "run"), str(tmp_path / "hf"))
    cfg, params, tok = load_model(run_dir=str(tmp_path / "run"))
    positions = cfg.max_position_embeddings
    eos = tok.convert_tokens_to_ids("<|endoftext|>")

    def greedy(prompt):
        ids = generate_ids(cfg, params, [tok.encode(prompt)], max_new_tokens=12, eos_id=eos)[0]
        return decode_text(tok, ids, eos).split("\n")[0]

    include = tmp_path / "tasks"
    include.mkdir()
    _tasks(include, greedy)

    port = _free_port()
    log = open(tmp_path / "server.log", "w+b")  # noqa: SIM115
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "CODENEO_API_KEY": "sk-eval",
           "OPENAI_API_KEY": "sk-eval"}  # lm-eval's local-completions sends OPENAI_API_KEY as the bearer token
    proc = subprocess.Popen([sys.executable, "-m", "train.serve", "--run", str(tmp_path / "run"), "--port", str(port),
                             "--no-warmup"],  # shapes compile on first use: this test is about scores
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            log.seek(0)
            raise RuntimeError(log.read().decode())
        os.environ["OPENAI_API_KEY"] = "sk-eval"
        # API windows are max_length - 2 tokens (one for the generated token, one for context), the
        # hf model's max_length: give both the same rolling windows.
        ours, our_samples = _evaluate("local-completions", {
            "base_url": url + "/v1/completions", "model": "codeneo", "max_length": positions, "auth_token": "sk-eval",
            "tokenizer_backend": "remote", "max_retries": 1}, include)
        theirs, their_samples = _evaluate("hf", {"pretrained": str(hf_dir), "max_length": positions - 2,
                                                 "dtype": "float32", "device": "cpu"}, include)
    finally:
        os.environ.pop("OPENAI_API_KEY", None)
        proc.kill()
        proc.wait(timeout=30)
        log.close()
    assert ours["codeneo_mc"]["acc,none"] == theirs["codeneo_mc"]["acc,none"]
    mc = [float(r[0][0]) for s in our_samples["codeneo_mc"] for r in s["resps"]]
    mc_ref = [float(r[0][0]) for s in their_samples["codeneo_mc"] for r in s["resps"]]
    assert len(mc) == 32 and mc == pytest.approx(mc_ref, rel=1e-4)  # each choice's log likelihood
    bpb, bpb_ref = ours["codeneo_rolling"]["bits_per_byte,none"], theirs["codeneo_rolling"]["bits_per_byte,none"]
    assert bpb == pytest.approx(bpb_ref, rel=1e-3) and bpb > 0
    em, em_ref = ours["codeneo_gen"]["exact_match,none"], theirs["codeneo_gen"]["exact_match,none"]
    assert em == em_ref and 0 < em < 1
    assert [s["filtered_resps"] for s in our_samples["codeneo_gen"]] == \
        [s["filtered_resps"] for s in their_samples["codeneo_gen"]]
