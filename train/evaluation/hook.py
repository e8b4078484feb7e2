"""HumanEval during training: a hook the run registers when ``train.humaneval_every`` > 0."""

from __future__ import annotations

from train import config as C


def humaneval_check(cfg: C.Config, params, step: int) -> dict[str, float]:
    """A small seeded HumanEval sample (``train.humaneval_tasks`` x ``train.humaneval_samples``),
    greedy for one sample, temperature 0.8 for several; run on process 0."""
    from transformers import AutoTokenizer

    from train.evaluation.code_eval import humaneval_quick
    from train.inference.decoding import completion_fn_from_params

    samples = cfg.train.humaneval_samples
    tok = AutoTokenizer.from_pretrained(cfg.tokenizer.path)
    fn = completion_fn_from_params(cfg.model, params, tok, temperature=0.0 if samples == 1 else 0.8,
                                   top_p=0.95, max_new_tokens=128, seed=step)
    results = humaneval_quick(fn, n_tasks=cfg.train.humaneval_tasks, samples=samples, seed=cfg.train.seed)
    print(f"[humaneval] step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in results.items()), flush=True)
    return results


class HumanEvalHook:
    """``humaneval_check`` on process 0 every ``train.humaneval_every`` steps, logged with the step."""

    def __init__(self, cfg: C.Config, *, is_main: bool):
        self.cfg = cfg
        self.is_main = is_main

    def __call__(self, loop) -> None:
        results = humaneval_check(self.cfg, loop.state.params, loop.step) if self.is_main else {}
        loop.log({"step": loop.step, **results, "tokens": loop.step * loop.tokens_per_step})
