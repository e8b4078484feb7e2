"""Learning-rate schedule and AdamW: pure functions of the config (optax)."""

from __future__ import annotations

import jax
import numpy as np
import optax

from train.config import ConfigError, OptimizerConfig, ScheduleConfig

EMBEDDINGS = ("wte", "wpe", "lm_head")


def learning_rate_schedule(opt: OptimizerConfig, sched: ScheduleConfig) -> optax.Schedule:
    """Linear warmup 0 -> peak over ``warmup_steps``, then linear/cosine decay to
    ``peak * min_lr_ratio`` over ``decay_steps``, constant at the floor afterwards
    (Code Clippy's ``decay_steps`` semantics). The argument is the number of updates done."""
    peak = opt.learning_rate
    floor = peak * sched.min_lr_ratio
    if sched.decay == "constant" or sched.decay_steps == 0:
        decay = optax.constant_schedule(peak if sched.decay == "constant" else floor)
    elif sched.decay == "linear":
        decay = optax.linear_schedule(peak, floor, sched.decay_steps)
    else:
        decay = optax.cosine_decay_schedule(peak, sched.decay_steps, alpha=sched.min_lr_ratio)
    if sched.warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, peak, sched.warmup_steps)
    return optax.join_schedules([warmup, decay], [sched.warmup_steps])


def weight_decay_mask(params, decay_embeddings: bool = False):
    """True for weights that get weight decay: matrices (``kernel``), and the embeddings when
    ``decay_embeddings``; never biases or LayerNorm scales."""

    def wants_decay(path, _):
        name = path[-1].key if hasattr(path[-1], "key") else str(path[-1])
        if name in EMBEDDINGS:
            return decay_embeddings
        return name.endswith("kernel")

    return jax.tree_util.tree_map_with_path(wants_decay, params)


def make_optimizer(opt: OptimizerConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Global-norm clipping followed by AdamW with the decay mask and ``schedule`` (built once,
    by ``learning_rate_schedule``, and shared with the step's logged learning rate)."""
    parts = []
    if opt.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(opt.clip_norm))
    parts.append(
        optax.adamw(
            learning_rate=schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
            mask=lambda p: weight_decay_mask(p, opt.decay_embeddings),
        )
    )
    return optax.chain(*parts)


LOW_LR_FRACTION = 0.01  # "learning rate 0": below 1% of the peak
MAX_LOW_LR_SHARE = 0.05  # of the steps after warmup


def check_schedule(opt: OptimizerConfig, sched: ScheduleConfig, max_steps: int) -> None:
    """Refuse a schedule that would waste the run: more than 5% of the steps after warmup at a
    learning rate below 1% of the peak (e.g. a linear decay to 0 that ends long before
    ``train.max_steps``), unless ``schedule.allow_low_lr``. Raises ``ConfigError`` in one line."""
    steps = np.arange(min(sched.warmup_steps, max_steps), max_steps)
    if sched.allow_low_lr or steps.size == 0:
        return
    lr = np.asarray(jax.device_get(learning_rate_schedule(opt, sched)(steps)))
    low = int(np.sum(lr < LOW_LR_FRACTION * opt.learning_rate))
    if low > MAX_LOW_LR_SHARE * steps.size:
        end = sched.warmup_steps + sched.decay_steps
        raise ConfigError(
            f"schedule.decay_steps: {low} of the {steps.size} steps after warmup ({100 * low / steps.size:.1f}%) "
            f"would run below 1% of the peak learning rate (decay ends at step {end}, train.max_steps is "
            f"{max_steps}, schedule.min_lr_ratio is {sched.min_lr_ratio}): set schedule.decay_steps to "
            f"{max(max_steps - sched.warmup_steps, 0)} (decay until max_steps) or schedule.min_lr_ratio >= "
            f"{LOW_LR_FRACTION} (e.g. 0.1), or schedule.allow_low_lr: true if this is deliberate")
