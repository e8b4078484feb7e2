"""Convergence benchmark: codeneo against Hugging Face's run_clm recipe, same model, data, tokens and recipe.

    python bench/convergence.py --quick        # tiny GPT-Neo, a few minutes on 2 CPU cores
    python bench/convergence.py                # configs/tiny.yaml's full recipe (1200 steps)
    python bench/convergence.py --config configs/gpt_neo_125m.yaml --steps 2000   # on a GPU machine

Both sides train the architecture of ``--config`` from scratch on the same train shards (the Python
standard library's source by default, prepared and tokenized here) with the same recipe: AdamW
(lr, betas, eps, weight decay on matrices), linear warmup then cosine to 10% of the peak, gradient
clip, the same batch size x block size and the same number of steps, so the same number of
predicted training tokens.

* ours: ``python -m train`` (only through its command line) with ``--set`` overrides, checkpoints
  at ``--points`` evenly spaced steps, each exported with ``python -m train.export``;
* the peer: run_clm's pipeline in PyTorch: ``datasets`` (tokenize, EOS after every document,
  ``group_texts`` into rows of block_size + 1 tokens, inputs [:-1], labels [1:]),
  ``GPTNeoForCausalLM`` from the same config, ``transformers.Trainer`` (random sampler,
  ``cosine_with_min_lr``), fp32 on CPU (CUDA and bf16 when torch sees a GPU and the config is bf16);
  the weights are snapshotted at the same steps.

One evaluator scores every snapshot of both: a PyTorch loop over the same held-out tokens (the
validation shards' documents, EOS-joined, cut into rows of block_size + 1), mean next-token loss in
nats. The last printed line is one JSON object (see ``main``); a PNG plots held-out loss against
training tokens for both.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from itertools import chain, pairwise
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The quick run: configs/tiny.yaml's architecture, a fixed slice of the corpus, a short recipe.
QUICK = {"steps": 100, "batch_size": 8, "block_size": 128, "warmup": 10, "points": 4, "eval_tokens": 100_000,
         "corpus_bytes": 8_000_000, "tokenizer_bytes": 5_000_000, "log_every": 10}
FULL = {"points": 5, "eval_tokens": 1_000_000, "corpus_bytes": None, "tokenizer_bytes": 20_000_000,
        "log_every": 10}


class BenchError(RuntimeError):
    """A problem worth one line (bad option, failed sub-command); the message names it."""


def log(msg: str) -> None:
    """One progress line on stderr (stdout's last line is the JSON result)."""
    print(f"[convergence] {msg}", file=sys.stderr, flush=True)


def run_cmd(cmd: list[str], what: str, tag: str, watch=None) -> float:
    """Run ``cmd`` from the repository root, its output lines echoed to stderr with ``tag``, and
    ``watch()`` called every few seconds while it runs (progress); returns the wall seconds. A
    non-zero exit raises ``BenchError`` with the last lines."""
    log(f"{what}: {shlex.join(cmd)}")
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []

    def echo():
        for line in proc.stdout:
            tail.append(line.rstrip())
            del tail[:-30]
            print(f"[{tag}] {line.rstrip()}", file=sys.stderr, flush=True)

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    while proc.poll() is None:
        time.sleep(0.2 if watch is None else 5.0)
        if watch is not None:
            watch()
    reader.join()
    if proc.returncode:
        raise BenchError(f"{what} failed (exit {proc.returncode}): " + " | ".join(tail[-8:]))
    return time.perf_counter() - t


# ---------------------------------------------------------------------------------------------
# Corpus, tokenizer, recipe


def prepare_corpus(work: Path, corpus_bytes: int | None) -> Path:
    """``python -m data_processing.prepare`` on the stdlib (capped at ``corpus_bytes``), cached in ``work``."""
    data = work / f"data-{corpus_bytes or 'all'}"
    if not (data / "report.json").exists():
        cmd = [sys.executable, "-m", "data_processing.prepare", "--out", str(data)]
        run_cmd(cmd + (["--max-bytes", str(corpus_bytes)] if corpus_bytes else []), "prepare corpus", "prepare")
    return data


def train_tokenizer(work: Path, data: Path, vocab_size: int, max_bytes: int) -> Path:
    """One byte-level BPE on the train shards, cached in ``work`` (as the quickstart trains it)."""
    tok = work / f"tokenizer-{data.name}-{vocab_size}"
    if not (tok / "tokenizer.json").exists():
        cmd = [sys.executable, "-m", "tokenizer.train_tokenizer", "--data", str(data / "train"),
               "--vocab-size", str(vocab_size), "--out", str(tok), "--max-bytes", str(max_bytes), "--no-progress"]
        run_cmd(cmd, "train tokenizer", "tokenizer")
    return tok


def recipe_overrides(args, preset: dict, data: Path, tok: Path, vocab_size: int) -> list[str]:
    """The ``--set`` overrides shared by both sides (the recipe); the user's ``--set`` come last."""
    import yaml

    base = yaml.safe_load(Path(args.config).read_text()) or {}
    steps = args.steps or preset.get("steps") or base.get("train", {}).get("max_steps", 0)
    warmup = args.warmup if args.warmup is not None else preset.get(
        "warmup", base.get("schedule", {}).get("warmup_steps", 0))
    sets = [f"model.vocab_size={vocab_size}", f"data.train_dir={data / 'train'}",
            f"data.validation_dir={data / 'validation'}", f"tokenizer.path={tok}",
            f"train.max_steps={steps}", "schedule.decay=cosine", f"schedule.warmup_steps={warmup}",
            f"schedule.decay_steps={max(steps - warmup, 0)}", "schedule.min_lr_ratio=0.1",
            "optimizer.decay_embeddings=true", "optimizer.grad_accum_steps=1", "optimizer.clip_norm=1.0"]
    for key, value in (("train.batch_size", args.batch_size or preset.get("batch_size")),
                       ("data.block_size", args.block_size or preset.get("block_size"))):
        if value:
            sets.append(f"{key}={value}")
    return sets + list(args.set)


def load_recipe(config: str, sets: list[str]):
    """The resolved config both sides train with (``train.config`` only parses and validates)."""
    from train import config as config_lib

    try:
        cfg = config_lib.load(config, sets)
    except config_lib.ConfigError as err:
        raise BenchError(f"--set/--config: {err}") from err
    if cfg.train.batch_size <= 0:
        raise BenchError("--batch-size: the config gives no explicit train.batch_size; pass --batch-size N")
    return cfg


def checkpoint_steps(steps: int, points: int) -> list[int]:
    """``points`` evenly spaced steps ending at ``steps``."""
    return [steps * (i + 1) // points for i in range(points)]


# ---------------------------------------------------------------------------------------------
# Ours: the trainer's command line


def run_ours(args, cfg, sets: list[str], work: Path, points: list[int], log_every: int) -> dict:
    """Train with ``python -m train`` (checkpoints every ``points[0]`` steps), export every point."""
    run_dir = work / "ours"
    shutil.rmtree(run_dir, ignore_errors=True)
    every = points[0]
    ours_sets = sets + [f"run.output_dir={run_dir}", f"train.save_every={every}",
                        f"checkpoint.keep={len(points) + 1}", "train.eval_every=0", f"train.log_every={log_every}",
                        "logging.wandb_mode=disabled", "logging.progress=false", "checkpoint.keep_best="]
    cmd = [sys.executable, "-m", "train", "--config", args.config]
    for s in ours_sets:
        cmd += ["--set", s]
    train_s = run_cmd(cmd, "ours: train", "ours", watch=ours_progress(run_dir / "metrics.jsonl", cfg.train.max_steps))
    records = read_metrics(run_dir / "metrics.jsonl")
    skip = tuple(step * cfg.train.batch_size * cfg.data.block_size for step in points)
    t = time.perf_counter()
    folders = {}
    for step in points:
        out = work / "ours-hf" / f"step-{step}"
        shutil.rmtree(out, ignore_errors=True)
        run_cmd([sys.executable, "-m", "train.export", "--run", str(run_dir), "--step", str(step), "--out", str(out)],
                f"ours: export step {step}", "export")
        folders[step] = out
    return {"folders": folders, "train_s": train_s, "export_s": time.perf_counter() - t,
            "tokens": records[-1]["tokens"], "steps": records[-1]["step"],
            "train_loss": records[-1]["loss"], "tokens_per_second": steady_rate(flush_marks(records), skip),
            "tokens_per_second_with_saves": steady_rate(flush_marks(records))}


def read_metrics(path: Path) -> list[dict]:
    """The training records of ours' ``metrics.jsonl`` (those with tokens and a timestamp)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            continue
    return [r for r in records if "tokens" in r and "elapsed_s" in r and "loss" in r]


def ours_progress(path: Path, max_steps: int):
    """A ``watch`` for ``run_cmd``: one line per new metrics flush of ours (step, loss, rate)."""
    seen = {"step": 0}

    def watch():
        records = read_metrics(path)
        if records and records[-1]["step"] > seen["step"]:
            r = records[-1]
            seen["step"] = r["step"]
            log(f"ours: step {r['step']}/{max_steps} loss {r['loss']:.4f} lr {r.get('learning_rate', 0):.2e} "
                f"{round(r.get('tokens_per_second', 0))} tok/s")

    return watch


def flush_marks(records: list[dict]) -> list[tuple[int, float]]:
    """(tokens, seconds) at each metrics flush of ours: the records of one flush share its time, and
    only the last of them (the most tokens) was done by then."""
    done: dict[float, int] = {}
    for r in records:
        done[r["elapsed_s"]] = max(done.get(r["elapsed_s"], 0), r["tokens"])
    return [(tokens, seconds) for seconds, tokens in done.items()]


def steady_rate(marks: list[tuple[int, float]], skip_after: tuple[int, ...] = ()) -> float | None:
    """Tokens/s of training steps only: over the intervals between consecutive (tokens, seconds)
    marks with distinct times, from the first mark (start-up and compilation come before it) to the
    last, leaving out each interval that starts at a token count in ``skip_after`` (the checkpoint
    points: ours writes a checkpoint there, the peer copies its weights, and neither is a training
    step)."""
    marks = sorted(set(marks))
    tokens = seconds = 0.0
    for (t0, s0), (t1, s1) in pairwise(marks):
        if t0 in skip_after or s1 <= s0:
            continue
        tokens += t1 - t0
        seconds += s1 - s0
    return tokens / seconds if seconds > 0 else None


# ---------------------------------------------------------------------------------------------
# The peer: run_clm's pipeline (datasets + transformers.Trainer, PyTorch)


def shard_texts(folder: Path) -> list[str]:
    """The ``text`` of every record of the shards in ``folder``, in file then line order."""
    from data_processing.shards import iter_records

    paths = sorted(p for p in folder.iterdir() if p.name.endswith((".jsonl.zst", ".jsonl.gz", ".jsonl")))
    return [r["text"] for p in paths for r in iter_records(p)]


def peer_dataset(data: Path, tokenizer, block_size: int):
    """run_clm's preprocessing with ``datasets``: tokenize, EOS after each document, ``group_texts``
    into rows of block_size + 1 tokens (inputs [:-1], labels [1:], like ours)."""
    import datasets

    raw = datasets.Dataset.from_dict({"text": shard_texts(data / "train")})
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        return {"ids": [ids + [eos] for ids in tokenizer(batch["text"])["input_ids"]]}

    def group_texts(batch):
        stream = list(chain.from_iterable(batch["ids"]))
        n = len(stream) // (block_size + 1) * (block_size + 1)
        rows = [stream[i: i + block_size + 1] for i in range(0, n, block_size + 1)]
        return {"input_ids": [r[:-1] for r in rows], "labels": [r[1:] for r in rows]}

    tokenized = raw.map(tokenize, batched=True, remove_columns=["text"], desc="tokenize")
    return tokenized.map(group_texts, batched=True, remove_columns=["ids"], desc="group_texts")


def peer_collator(features):
    """``default_data_collator`` that also passes the labels as ``shift_labels``: they are already
    shifted (row[1:]), so the model's loss must not shift them again."""
    from transformers import default_data_collator

    batch = default_data_collator(features)
    batch["shift_labels"] = batch["labels"]
    return batch


def make_callback(points: list[int], tokens_per_step: int, max_steps: int):
    """A ``TrainerCallback`` that snapshots the weights at ``points``, timestamps every step and
    prints a progress line (loss, rate) at every Trainer log."""
    from transformers import TrainerCallback

    class Snapshots(TrainerCallback):
        def __init__(self):
            self.snaps, self.marks, self.loss = {}, [], None

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kw):
            self.marks.append((state.global_step * tokens_per_step, time.perf_counter() - self.t0))
            if state.global_step in points:
                self.snaps[state.global_step] = {k: v.detach().to("cpu", copy=True)
                                                 for k, v in model.state_dict().items()}

        def on_log(self, args, state, control, logs=None, **kw):
            if "loss" not in (logs or {}):
                return
            self.loss = logs["loss"]
            recent = self.marks[-args.logging_steps - 1:]
            rate = steady_rate(recent) if len(recent) > 1 else None
            log(f"peer: step {state.global_step}/{max_steps} loss {self.loss:.4f} "
                f"lr {logs.get('learning_rate', 0):.2e} {'-' if rate is None else round(rate)} tok/s")

    return Snapshots()


def run_peer(cfg, data: Path, tok: Path, work: Path, points: list[int], log_every: int) -> dict:
    """Train the same GPT-Neo with ``transformers.Trainer`` and save its weights at ``points``."""
    import torch
    from transformers import AutoTokenizer, GPTNeoConfig, GPTNeoForCausalLM, Trainer, TrainingArguments

    from train.interop.convert import hf_config_dict

    t = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(tok)
    train_set = peer_dataset(data, tokenizer, cfg.data.block_size)
    prep_s = time.perf_counter() - t
    log(f"peer: {len(train_set)} rows of {cfg.data.block_size + 1} tokens in {prep_s:.1f} s")
    cuda = torch.cuda.is_available()
    hf = hf_config_dict(cfg.model, eos_token_id=tokenizer.eos_token_id)
    hf.pop("model_type")
    torch.manual_seed(cfg.train.seed)
    model = GPTNeoForCausalLM(GPTNeoConfig(**hf))
    steps, o = cfg.train.max_steps, cfg.optimizer
    targs = TrainingArguments(
        output_dir=str(work / "peer-trainer"), max_steps=steps, per_device_train_batch_size=cfg.train.batch_size,
        learning_rate=o.learning_rate, adam_beta1=o.b1, adam_beta2=o.b2, adam_epsilon=o.eps,
        weight_decay=o.weight_decay, max_grad_norm=o.clip_norm, warmup_steps=cfg.schedule.warmup_steps,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": cfg.schedule.min_lr_ratio},
        logging_steps=log_every, save_strategy="no", report_to="none", seed=cfg.train.seed,
        data_seed=cfg.train.seed, remove_unused_columns=False, dataloader_drop_last=True, disable_tqdm=True,
        use_cpu=not cuda, bf16=cuda and cfg.model.compute_dtype == "bfloat16", include_num_input_tokens_seen=True,
    )
    callback = make_callback(points, cfg.train.batch_size * cfg.data.block_size, steps)
    t = time.perf_counter()
    trainer = Trainer(model=model, args=targs, train_dataset=train_set, data_collator=peer_collator,
                      callbacks=[callback])
    out = trainer.train()
    train_s = time.perf_counter() - t
    skip = tuple(step * cfg.train.batch_size * cfg.data.block_size for step in points)
    folders = {}
    for step, state in callback.snaps.items():
        model.load_state_dict(state)
        folders[step] = work / "peer-hf" / f"step-{step}"
        model.save_pretrained(folders[step])
        tokenizer.save_pretrained(folders[step])
    return {"folders": folders, "train_s": train_s, "data_prep_s": prep_s,
            "tokens": int(trainer.state.num_input_tokens_seen),
            "steps": trainer.state.global_step, "train_loss": callback.loss, "trainer_train_loss": out.training_loss,
            "tokens_per_second": steady_rate(callback.marks[log_every - 1:], skip),
            "tokens_per_second_with_saves": steady_rate(callback.marks[log_every - 1:]),
            "device": "cuda" if cuda else "cpu",
            "train_rows": len(train_set)}


# ---------------------------------------------------------------------------------------------
# One evaluator for both


def heldout_rows(data: Path, tok: Path, block_size: int, n_tokens: int):
    """The first ``n_tokens`` predicted tokens of the validation shards (documents EOS-joined, rows of
    block_size + 1) as a LongTensor [rows, block_size + 1]."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok)
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    need = math.ceil(n_tokens / block_size) * (block_size + 1)
    for text in shard_texts(data / "validation"):
        stream += tokenizer(text)["input_ids"] + [eos]
        if len(stream) >= need:
            break
    rows = len(stream[:need]) // (block_size + 1)
    if rows == 0:
        raise BenchError("--eval-tokens: the validation shards hold less than one row of held-out tokens")
    return torch.tensor(stream[: rows * (block_size + 1)]).view(rows, block_size + 1)


def heldout_loss(folder: Path, rows, batch_size: int = 32) -> float:
    """Mean next-token cross-entropy (nats) of the Hugging Face model in ``folder`` on ``rows``."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            x = rows[i: i + batch_size].to(device)
            logits = model(input_ids=x[:, :-1]).logits.float()
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
            count += x[:, 1:].numel()
    return total / count


def score(side: dict, rows, tokens_per_step: int, name: str) -> list[dict]:
    """Held-out loss of every saved point of one side, with the training tokens it had seen."""
    t = time.perf_counter()
    curve = []
    for step, folder in sorted(side["folders"].items()):
        loss = heldout_loss(folder, rows)
        curve.append({"step": step, "tokens": step * tokens_per_step, "heldout_loss": round(loss, 4)})
        log(f"{name}: step {step} held-out loss {loss:.4f} nats")
    side["eval_s"] = time.perf_counter() - t
    return curve


def plot(curves: dict[str, list[dict]], path: Path, title: str) -> None:
    """PNG of held-out loss against training tokens, one line per side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot([p["tokens"] for p in curve], [p["heldout_loss"] for p in curve], marker="o", label=name)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short recipe on a corpus slice (minutes on 2 cores)")
    p.add_argument("--config", default="configs/tiny.yaml", help="architecture and recipe (YAML of python -m train)")
    p.add_argument("--set", action="append", default=[], metavar="K=V", help="extra override for both sides")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: preset or config)")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default: preset or config)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step")
    p.add_argument("--block-size", type=int, default=None, help="predicted tokens per sequence")
    p.add_argument("--points", type=int, default=None, help="evenly spaced checkpoints scored per side")
    p.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens scored per checkpoint")
    p.add_argument("--corpus-bytes", type=int, default=None, help="cap on the stdlib bytes prepared (0 = all)")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE tokens trained here")
    p.add_argument("--data", default=None, help="prepared DATA_DIR (train/, validation/) instead of preparing one")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder instead of training one")
    p.add_argument("--order", choices=["ours-first", "peer-first"], default="ours-first",
                   help="which side trains first (with --seeds, they take turns from there)")
    p.add_argument("--seeds", type=int, default=1,
                   help="runs with seeds train.seed, +1, ...: figures are means over them (seed noise)")
    p.add_argument("--work", default="runs/convergence", help="work folder (corpus and tokenizer cached there)")
    p.add_argument("--png", default=None, help="plot path (default WORK/convergence.png)")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "block_size", "points", "eval_tokens", "seeds"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise BenchError(f"--{name.replace('_', '-')}: expected a positive integer, got {value}")
    if args.warmup is not None and args.warmup < 0:
        raise BenchError(f"--warmup: expected >= 0, got {args.warmup}")
    if args.corpus_bytes is not None and args.corpus_bytes < 0:
        raise BenchError(f"--corpus-bytes: expected >= 0 (0 = all), got {args.corpus_bytes}")
    if args.vocab_size < 256:
        raise BenchError(f"--vocab-size: expected at least 256 (byte-level BPE), got {args.vocab_size}")
    for name in ("data", "tokenizer"):
        if getattr(args, name) and not Path(getattr(args, name)).is_dir():
            raise BenchError(f"--{name}: no such folder {getattr(args, name)}")
    if not Path(args.config).is_file():
        raise BenchError(f"--config: no such file {args.config}")
    return args


def machine() -> dict:
    """Where the benchmark ran."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": cores, "python": platform.python_version()}


def side_summary(side: dict, curve: list[dict]) -> dict:
    """The JSON figures of one side."""
    rate = side["tokens_per_second"]
    keep = ("tokens", "steps", "train_s", "export_s", "eval_s", "data_prep_s", "device", "train_rows")
    out = {k: (round(side[k], 2) if isinstance(side[k], float) else side[k]) for k in keep if k in side}
    out.update({"final_heldout_loss": curve[-1]["heldout_loss"], "points": curve,
                "tokens_per_second": None if rate is None else round(rate, 1),
                "tokens_per_second_with_saves": (None if side.get("tokens_per_second_with_saves") is None
                                                 else round(side["tokens_per_second_with_saves"], 1)),
                "tokens_per_second_end_to_end": round(side["tokens"] / side["train_s"], 1),
                "final_train_loss": None if side["train_loss"] is None else round(side["train_loss"], 4)})
    return out


def _mean(values: list):
    """Mean of numbers (an int when every value is the same int, e.g. token counts); None if any is."""
    if any(v is None for v in values):
        return None
    mean = sum(values) / len(values)
    return int(mean) if all(isinstance(v, int) for v in values) and mean.is_integer() else round(mean, 4)


def mean_side(runs: list[dict]) -> dict:
    """One side's figures averaged over seeds (the held-out curve point by point); one run: its figures."""
    out = {}
    for key, value in runs[0].items():
        if key == "points":
            out[key] = [{**p, "heldout_loss": _mean([r["points"][i]["heldout_loss"] for r in runs])}
                        for i, p in enumerate(value)]
        elif value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
            out[key] = _mean([r[key] for r in runs])
        else:
            out[key] = value
    return out


def summarize_runs(runs: list[dict]) -> dict:
    """``runs`` (one per seed: ``seed``, ``order``, ``ours``, ``peer`` side summaries) -> the result's
    figures: mean sides, ``loss_gap`` (mean of ours - peer final held-out loss) and its sample standard
    deviation, ``speedup`` (mean of per-run ours/peer steady tokens/s) and its minimum, and one line per run."""
    per_run = []
    for run in runs:
        ours, peer = run["ours"], run["peer"]
        rates = ours["tokens_per_second"], peer["tokens_per_second"]
        per_run.append({"seed": run["seed"], "order": run["order"], "ours_heldout_loss": ours["final_heldout_loss"],
                        "peer_heldout_loss": peer["final_heldout_loss"],
                        "loss_gap": round(ours["final_heldout_loss"] - peer["final_heldout_loss"], 4),
                        "ours_tokens_per_second": rates[0], "peer_tokens_per_second": rates[1],
                        "speedup": round(rates[0] / rates[1], 3) if all(rates) else None})
    gaps = [r["loss_gap"] for r in per_run]
    gap = sum(gaps) / len(gaps)
    sd = (math.sqrt(sum((g - gap) ** 2 for g in gaps) / (len(gaps) - 1)) if len(gaps) > 1 else None)
    speedups = [r["speedup"] for r in per_run]
    known = None not in speedups
    return {"ours": mean_side([r["ours"] for r in runs]), "peer": mean_side([r["peer"] for r in runs]),
            "loss_gap": round(gap, 4), "loss_gap_sd": None if sd is None else round(sd, 4),
            "speedup": round(sum(speedups) / len(speedups), 3) if known else None,
            "speedup_min": min(speedups) if known else None, "runs": per_run}


def run_seed(args, sets: list[str], data: Path, tok: Path, work: Path, rows, points: list[int], log_every: int,
             seed: int, order: list[str]) -> dict:
    """Train and score both sides with ``train.seed=seed`` (weights and data order of both), ``order``
    saying which side trains first; returns both side summaries."""
    seed_sets = sets + [f"train.seed={seed}"]
    cfg = load_recipe(args.config, seed_sets)
    log(f"seed {seed}: {' then '.join(order)}")
    runners = {"ours": lambda: run_ours(args, cfg, seed_sets, work, points, log_every),
               "peer": lambda: run_peer(cfg, data, tok, work, points, log_every)}
    sides = {name: runners[name]() for name in order}
    tokens_per_step = cfg.train.batch_size * cfg.data.block_size
    curves = {name: score(sides[name], rows, tokens_per_step, name) for name in ("ours", "peer")}
    return {"seed": seed, "order": order, **{n: side_summary(sides[n], curves[n]) for n in ("ours", "peer")}}


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; prints progress on stderr and one JSON object as stdout's last line:
    ``ours``/``peer`` (held-out loss per point and final, tokens/s steady and end to end, seconds;
    with ``--seeds N`` the means over the N runs), ``loss_gap`` (ours - peer, nats; mean over seeds)
    and ``loss_gap_sd``, ``speedup`` (ours/peer steady tokens/s; mean over seeds) and ``speedup_min``,
    ``runs`` (one line per seed), ``order`` (the first run's), ``recipe``, ``machine``, ``load_avg``,
    ``command``, ``date``, ``wall_s``, ``png``."""
    args = parse_args(argv)
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    preset = QUICK if args.quick else FULL
    work = (ROOT / args.work) if not Path(args.work).is_absolute() else Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    corpus_bytes = preset["corpus_bytes"] if args.corpus_bytes is None else (args.corpus_bytes or None)
    data = Path(args.data).resolve() if args.data else prepare_corpus(work, corpus_bytes)
    tok = (Path(args.tokenizer).resolve() if args.tokenizer
           else train_tokenizer(work, data, args.vocab_size, preset["tokenizer_bytes"]))
    from transformers import AutoTokenizer

    vocab_size = len(AutoTokenizer.from_pretrained(tok))
    sets = recipe_overrides(args, preset, data, tok, vocab_size)
    cfg = load_recipe(args.config, sets)
    points_n = args.points or preset["points"]
    if cfg.train.max_steps < points_n:
        raise BenchError(f"--steps: {cfg.train.max_steps} steps cannot hold {points_n} checkpoints (--points)")
    if cfg.train.max_steps % points_n:
        raise BenchError(f"--points: {points_n} does not divide --steps {cfg.train.max_steps} (evenly spaced points)")
    points = checkpoint_steps(cfg.train.max_steps, points_n)
    # Flushes between checkpoints: the steady rate leaves out the intervals that start at one, so
    # logging only at the checkpoints would leave no interval to time.
    log_every = min(preset["log_every"], max(1, points[0] // 2))
    tokens_per_step = cfg.train.batch_size * cfg.data.block_size
    log(f"recipe: {cfg.train.max_steps} steps x {cfg.train.batch_size} x {cfg.data.block_size} = "
        f"{cfg.train.max_steps * tokens_per_step} training tokens; points {points}; seeds {args.seeds}")
    eval_tokens = args.eval_tokens or preset["eval_tokens"]
    rows = heldout_rows(data, tok, cfg.data.block_size, eval_tokens)
    log(f"evaluator: {rows.shape[0]} held-out rows, {rows.shape[0] * cfg.data.block_size} predicted tokens")

    first = ["ours", "peer"] if args.order == "ours-first" else ["peer", "ours"]
    # The sides take turns going first from one seed to the next, so neither always runs on a
    # box the other has just warmed (or left busy).
    runs = [run_seed(args, sets, data, tok, work, rows, points, log_every, cfg.train.seed + i,
                     first if i % 2 == 0 else first[::-1]) for i in range(args.seeds)]
    summary = summarize_runs(runs)
    png = Path(args.png) if args.png else work / "convergence.png"
    plot({"codeneo (ours)": summary["ours"]["points"], "HF run_clm + Trainer (peer)": summary["peer"]["points"]}, png,
         f"{Path(args.config).name}: {cfg.train.max_steps} steps x {cfg.train.batch_size} x {cfg.data.block_size}"
         + (f", mean of {args.seeds} seeds" if args.seeds > 1 else ""))
    import torch
    import transformers

    result = {
        **summary, "order": first, "heldout_tokens": int(rows.shape[0] * cfg.data.block_size),
        "recipe": {"config": args.config, "steps": cfg.train.max_steps, "batch_size": cfg.train.batch_size,
                   "block_size": cfg.data.block_size, "training_tokens": cfg.train.max_steps * tokens_per_step,
                   "learning_rate": cfg.optimizer.learning_rate, "b1": cfg.optimizer.b1, "b2": cfg.optimizer.b2,
                   "eps": cfg.optimizer.eps, "weight_decay": cfg.optimizer.weight_decay,
                   "clip_norm": cfg.optimizer.clip_norm, "warmup_steps": cfg.schedule.warmup_steps,
                   "min_lr_ratio": cfg.schedule.min_lr_ratio, "vocab_size": vocab_size, "seed": cfg.train.seed,
                   "seeds": [run["seed"] for run in runs], "overrides": sets},
        "machine": machine(), "load_avg": {"before": [round(x, 2) for x in load_before],
                                           "after": [round(x, 2) for x in os.getloadavg()]},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "command": shlex.join([sys.executable, "bench/convergence.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "wall_s": round(time.perf_counter() - t0, 1), "png": str(png),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    try:
        main()
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
