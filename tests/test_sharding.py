"""Same math on every mesh: 1x1x1, 2x4x1 and 2x2x2 (data x fsdp x tensor) over 8 simulated CPU
devices give the same losses and parameters after 3 steps (fp32). (Data parallelism alone is
covered by the 2-device runs of tests/test_step.py and tests/test_multihost.py.)"""

import jax
import numpy as np
import pytest

from tests.helpers import tiny_config
from train.core import sharding, step

MESHES = [(1, 1, 1), (2, 4, 1), (2, 2, 2)]


def _run(shape, tokens, *overrides, metric="loss"):
    """(the metric per step, final parameters as numpy, final state); metric "all": every metric."""
    cfg = tiny_config(f"mesh.data={shape[0]}", f"mesh.fsdp={shape[1]}", f"mesh.tensor={shape[2]}",
                      "optimizer.learning_rate=1e-3", *overrides)
    mesh = sharding.make_mesh(cfg, jax.devices()[: int(np.prod(shape))])
    compiled = step.compile_steps(cfg, mesh)
    state = compiled.init(jax.random.PRNGKey(0))
    losses = []
    for batch in tokens:
        state, metrics = compiled.train_step(state, sharding.global_batch(batch, mesh))
        losses.append({k: float(v) for k, v in metrics.items()} if metric == "all" else float(metrics[metric]))
    return losses, jax.tree_util.tree_map(np.asarray, state.params), state


@pytest.mark.slow
def test_meshes_agree():
    assert jax.device_count() == 8
    tokens = np.random.RandomState(0).randint(0, 300, (3, 8, 33)).astype(np.int32)
    ref_losses, ref_params, _ = _run(MESHES[0], tokens)
    assert ref_losses[2] < ref_losses[0]  # it is training
    for shape in MESHES[1:]:
        losses, params, state = _run(shape, tokens)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=str(shape))
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(ref_params),
                                strict=True):
            rel = np.linalg.norm(a - b) / np.linalg.norm(b)
            assert rel < 1e-5, (shape, jax.tree_util.keystr(path), rel)
        # parameters really are sharded as the rules say
        kernel = state.params["h_0"]["attn"]["q_proj_kernel"]
        assert kernel.sharding.spec[:2] == ("fsdp" if shape[1] > 1 else "fsdp", "tensor")
        n_shards = len({str(s.index) for s in kernel.addressable_shards})
        assert n_shards == shape[1] * shape[2]


def test_fused_chunked_loss_on_a_sharded_mesh_matches_the_plain_loss():
    """The fused output layer + loss (a scan with hand-written gradients) under data, fsdp and
    tensor sharding: same losses and parameters as the plain loss on one device."""
    tokens = np.random.RandomState(1).randint(0, 300, (3, 8, 33)).astype(np.int32)
    ref, ref_params, _ = _run(MESHES[0], tokens, metric="all")
    got, params, _ = _run(MESHES[2], tokens, "model.loss_chunk_size=10", metric="all")
    for metric in ("loss", "grad_norm"):
        np.testing.assert_allclose([m[metric] for m in got], [m[metric] for m in ref], rtol=1e-5, err_msg=metric)
    # AdamW normalises each update, so a summation-order difference in a near-zero gradient can
    # move one element by a good part of the learning rate; a wrong gradient is off by O(1).
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref_params), strict=True):
        assert np.linalg.norm(a - b) <= 1e-3 * np.linalg.norm(b)


def test_batch_is_split_over_data_axes():
    cfg = tiny_config("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    mesh = sharding.make_mesh(cfg)
    arr = sharding.global_batch(np.arange(8 * 33, dtype=np.int32).reshape(8, 33), mesh)
    rows = {s.index[0].start for s in arr.addressable_shards}
    assert rows == {0, 2, 4, 6}  # 4 data-parallel groups of 2 rows, replicated over tensor
