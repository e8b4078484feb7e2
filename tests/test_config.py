import pytest

from train import config as C


def test_shipped_configs_load_and_125m_matches_gpt_neo():
    cfg = C.load("configs/gpt_neo_125m.yaml")
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.num_heads, m.max_position_embeddings) == (12, 768, 12, 2048)
    assert m.layer_kinds == ("global", "local") * 6 and m.window_size == 256
    assert m.activation == "gelu_new" and m.layer_norm_epsilon == 1e-5 and m.tie_word_embeddings
    assert cfg.data.block_size == 2048 and cfg.train.per_device_batch_size == 8
    assert cfg.optimizer.learning_rate == 3e-5 and (cfg.optimizer.b1, cfg.optimizer.b2) == (0.9, 0.95)
    assert cfg.optimizer.weight_decay == 0.1 and cfg.model.compute_dtype == "bfloat16"
    assert (cfg.schedule.warmup_steps, cfg.schedule.decay_steps, cfg.train.max_steps) == (2500, 25000, 100000)
    assert C.load("configs/tiny.yaml").model.hidden_size < 256


def test_overrides_parse_yaml_values():
    cfg = C.load("configs/tiny.yaml", ["train.batch_size=32", "optimizer.learning_rate=3e-4",
                                       "model.attention_layers=[local, global]", "run.name=abc"])
    assert cfg.train.batch_size == 32
    assert cfg.optimizer.learning_rate == pytest.approx(3e-4)
    assert cfg.model.attention_layers == ("local", "global")
    assert cfg.run.name == "abc"


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.bogus=1", "train.bogus"),
        ("nosection.x=1", "nosection"),
        ("train.batch_size=many", "train.batch_size"),
        ("model.num_heads=3", "model.num_heads"),
        ("model.compute_dtype=fp8", "model.compute_dtype"),
        ("model.attention_layers=[global, sparse]", "model.attention_layers"),
        ("data.block_size=100000", "data.block_size"),
        ("logging.progress=maybe", "logging.progress"),
        ("model.attention_impl=cudnn", "model.attention_impl"),  # tiny.yaml computes in fp32
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(C.ConfigError) as err:
        C.load("configs/tiny.yaml", [override])
    assert str(err.value).startswith(key)
    assert "\n" not in str(err.value)


def test_batch_must_divide_data_parallel_size():
    cfg = C.load("configs/tiny.yaml", ["train.batch_size=12"])
    with pytest.raises(C.ConfigError, match="train.batch_size.*data-parallel size 8"):
        C.validate_for_devices(cfg, 8)
    assert C.validate_for_devices(cfg, 4) == (4, 1, 1)
    cfg = C.load("configs/tiny.yaml", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    assert C.validate_for_devices(cfg, 8) == (2, 2, 2)
    with pytest.raises(C.ConfigError, match="^mesh: .* 8 devices, but 4 are available"):
        C.validate_for_devices(cfg, 4)


def test_saved_config_round_trips(tmp_path):
    cfg = C.load("configs/tiny.yaml", ["train.max_steps=7", "model.attention_layers=[local]"])
    path = C.save(cfg, tmp_path / "run")
    again = C.load(path)
    assert again == cfg
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_cli_error_is_one_line(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_size: 100\n  num_heads: 3\n")
    proc = subprocess.run([sys.executable, "-m", "train", "--config", str(bad), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: model.num_heads"), proc.stderr


@pytest.mark.parametrize("name", ["finetune_gpt2", "finetune_gpt_neo"])
def test_finetune_configs_need_init_from_and_follow_autocoder(name):
    with pytest.raises(C.ConfigError, match="^tokenizer.path: .*model.init_from"):
        C.load(f"configs/{name}.yaml")
    cfg = C.load(f"configs/{name}.yaml", ["model.init_from=/models/x"])
    assert cfg.optimizer.learning_rate == 5e-5 and cfg.data.block_size == 256
    assert cfg.train.per_device_batch_size == 4 and cfg.checkpoint.keep_best == "eval_loss"
    assert cfg.schedule.warmup_steps == 0.2 * cfg.train.max_steps


def test_fused_attention_refuses_what_it_cannot_do():
    with pytest.raises(C.ConfigError, match="^model.attention_dropout: .*no dropout"):
        C.load("configs/tiny.yaml", ["model.attention_impl=dot_product", "model.attention_dropout=0.1"])
    cfg = C.load("configs/tiny.yaml", ["model.attention_impl=cudnn", "model.compute_dtype=bfloat16",
                                       "model.vocab_size=256"])
    import jax

    from train.core.model import init_params

    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="^model.attention_impl: cudnn needs a CUDA GPU"):
            init_params(cfg.model, jax.random.PRNGKey(0), seq_len=8)
