"""Peer for bench/train_step.py: FlaxGPTNeoForCausalLM (transformers 4.57.x) loss + grad + optax AdamW step.

Runs inside the peer virtual environment as a worker of bench/train_step.py, so that the two sides
can be timed in alternating rounds: after compiling and warming up it prints one JSON line (compile
time, versions), then for each line ``N`` read on stdin it runs N steps and prints one JSON line
with their times. It exits at the end of stdin."""
import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import transformers
from transformers import FlaxGPTNeoForCausalLM, GPTNeoConfig


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--json-args", required=True)
    a = json.loads(p.parse_args().json_args)
    dtype = jnp.dtype(a["dtype"])
    model = FlaxGPTNeoForCausalLM(GPTNeoConfig(**a["hf_config"]), seed=a["seed"], dtype=dtype)
    tx = optax.chain(*([optax.clip_by_global_norm(a["clip"])] if a["clip"] else []),
                     optax.adamw(a["lr"], b1=a["b1"], b2=a["b2"], eps=a["eps"], weight_decay=a["weight_decay"]))
    params = model.params
    opt_state = tx.init(params)
    batch = jnp.asarray(np.load(a["batch"]))

    def loss_fn(params, tokens):
        logits = model(tokens[:, :-1], params=params, train=False).logits.astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @jax.jit
    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    t = time.perf_counter()
    step.lower(params, opt_state, batch).compile()
    compile_s = time.perf_counter() - t

    def timed(n):
        nonlocal params, opt_state
        times, loss = [], None
        for _ in range(n):
            t = time.perf_counter()
            params, opt_state, loss = step(params, opt_state, batch)
            loss.block_until_ready()  # the only host sync per step, to time it
            times.append(time.perf_counter() - t)
        return times, loss

    timed(a["warmup"])
    print(json.dumps({"compile_time_s": compile_s, "jax_version": jax.__version__,
                      "transformers_version": transformers.__version__}), flush=True)
    for line in sys.stdin:
        times, loss = timed(int(line))
        print(json.dumps({"step_times_s": times, "loss": float(loss)}), flush=True)


if __name__ == "__main__":
    main()
