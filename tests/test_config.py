import pytest

from train import config as C


def test_shipped_configs_load_and_125m_matches_gpt_neo():
    cfg = C.load("configs/gpt_neo_125m.yaml")
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.num_heads, m.max_position_embeddings) == (12, 768, 12, 2048)
    assert m.layer_kinds == ("global", "local") * 6 and m.window_size == 256
    assert m.activation == "gelu_new" and m.layer_norm_epsilon == 1e-5 and m.tie_word_embeddings
    assert cfg.data.block_size == 2048 and cfg.train.per_device_batch_size == 8
    # the from-scratch recipe: GPT-3's 125M row (0.5M tokens a step, cosine to 10% at max_steps)
    assert cfg.optimizer.learning_rate == 6e-4 and cfg.train.batch_size * cfg.data.block_size == 524_288
    assert cfg.schedule.warmup_steps + cfg.schedule.decay_steps == cfg.train.max_steps
    assert (cfg.schedule.decay, cfg.schedule.min_lr_ratio) == ("cosine", 0.1)
    # Code Clippy's card, faithfully, on the same architecture
    cc = C.load("configs/code_clippy_125m.yaml")
    assert C.to_dict(cc)["model"] == C.to_dict(cfg)["model"]
    assert cc.data.block_size == 2048 and cc.train.per_device_batch_size == 8 and cc.train.batch_size == 0
    assert cc.optimizer.learning_rate == 3e-5 and (cc.optimizer.b1, cc.optimizer.b2) == (0.9, 0.95)
    assert cc.optimizer.weight_decay == 0.1 and cc.model.compute_dtype == "bfloat16"
    assert (cc.schedule.warmup_steps, cc.schedule.decay_steps, cc.train.max_steps) == (2500, 25000, 100000)
    assert (cc.schedule.decay, cc.schedule.min_lr_ratio) == ("cosine", 0.1)
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


# -- every field has a rule (issue #23) ---------------------------------------------------------

# Being removed by the tokenizer work of issue #23; deliberately without a rule.

# For every field, values it must refuse (YAML text as after --set): out of its range where it has
# one (NaN and infinities for every number), else a value of the wrong type. A new field fails
# test_every_field_has_a_rule_and_bad_values until it gets a rule and a row here.
BAD_VALUES = {
    "run.output_dir": ["", "[a]"],
    "run.name": ["[a]", "3"],
    "model.family": ["gpt3"],
    "model.vocab_size": ["-1", "1.5"],
    "model.vocab_multiple": ["0", "-128"],
    "model.max_position_embeddings": ["0"],
    "model.hidden_size": ["0", "-64"],
    "model.num_layers": ["0"],
    "model.num_heads": ["0", "-4"],
    "model.intermediate_size": ["-64"],
    "model.attention_layers": ["[]", "[global, sparse]", "global"],
    "model.window_size": ["0"],
    "model.activation": ["swish"],
    "model.layer_norm_epsilon": ["0", "-1e-5", ".nan", ".inf"],
    "model.tie_word_embeddings": ["maybe", "1"],
    "model.initializer_range": ["0", ".nan"],
    "model.embed_dropout": ["1", "-0.1", ".nan"],
    "model.attention_dropout": ["1.5", ".nan"],
    "model.resid_dropout": ["-1", ".inf"],
    "model.compute_dtype": ["fp8"],
    "model.param_dtype": ["float16"],
    "model.residual_dtype": ["bfloat16"],
    "model.attention_impl": ["flash"],
    "model.remat": ["some"],
    "model.loss_chunk_size": ["-1"],
    "model.init_from": ["[a]"],
    "data.train_dir": [""],
    "data.validation_dir": [""],
    "data.block_size": ["0", "-128"],
    "data.shuffle_buffer": ["-1", "0"],
    "data.stream_interleave": ["0", "-16"],
    "data.num_workers": ["0", "-2"],
    "data.tokenize_batch": ["0"],
    "data.prefetch": ["0", "-1"],
    "data.skip_bad": ["yes please"],
    "data.eval_tokens": ["0", "-1"],
    "data.packing": ["pack"],
    "data.window_stride": ["-1", "129"],
    "data.control_codes": ["3"],
    "data.fim_rate": ["1.5", "-0.5", ".nan"],
    "data.fim_spm_rate": ["2", ".nan"],
    "data.token_cache": ["[a]"],
    "data.order": ["random"],
    "data.host_split": ["hosts"],
    "data.mixture": ["{python: -1}", "{python: .nan}", "{python: 0, other: 0}", "{python: 0.7, go: 0.6}"],
    "tokenizer.path": ["[a]"],
    "optimizer.learning_rate": ["0", "-1e-3", ".nan", ".inf"],
    "optimizer.b1": ["1", "-0.1", ".nan"],
    "optimizer.b2": ["1.5", ".nan"],
    "optimizer.eps": ["-1", "0", ".nan"],
    "optimizer.weight_decay": ["-0.1", ".nan"],
    "optimizer.decay_embeddings": ["no thanks"],
    "optimizer.clip_norm": ["-1", ".inf"],
    "optimizer.grad_accum_steps": ["-1"],
    "schedule.warmup_steps": ["-1"],
    "schedule.decay_steps": ["-5"],
    "schedule.decay": ["exponential"],
    "schedule.min_lr_ratio": ["1.5", "-0.1", ".nan"],
    "schedule.allow_low_lr": ["often"],
    "train.max_steps": ["-1"],
    "train.batch_size": ["-8"],
    "train.per_device_batch_size": ["0"],
    "train.seed": ["-1", "4294967296"],
    "train.save_every": ["0"],
    "train.eval_every": ["-1"],
    "train.eval_at_start": ["7"],
    "train.log_every": ["0"],
    "train.humaneval_every": ["-10"],
    "train.humaneval_tasks": ["0"],
    "train.humaneval_samples": ["0"],
    "mesh.data": ["0", "-2"],
    "mesh.fsdp": ["0", "-3"],
    "mesh.tensor": ["0"],
    "mesh.coordinator_address": ["localhost", "host:0", "host:99999", ":1234"],
    "mesh.num_processes": ["-1"],
    "mesh.process_id": ["-2"],
    "mesh.init_timeout_s": ["0"],
    "checkpoint.keep": ["0"],
    "checkpoint.async_save": ["sometimes"],
    "checkpoint.keep_best": ["bleu", "loss"],
    "logging.wandb_mode": ["cloud"],
    "logging.wandb_project": [""],
    "logging.progress": ["2"],
}


def _all_keys() -> list[str]:
    import dataclasses

    return [f"{s.name}.{f.name}" for s in dataclasses.fields(C.Config) for f in dataclasses.fields(s.default_factory)]


def test_every_field_has_a_rule_and_bad_values():
    keys = _all_keys()
    rules = C.field_rules()
    assert [k for k in keys if rules[k] is None] == [], "fields without a rule (config.setting(default, rule))"
    assert sorted(set(keys) - set(BAD_VALUES)) == [], "fields without a row in BAD_VALUES"
    assert sorted(set(BAD_VALUES) - set(keys)) == [], "BAD_VALUES rows for fields that do not exist"
    assert all(BAD_VALUES[k] for k in keys)
    C.check_fields(C.Config())  # every default is allowed by its own rule


@pytest.mark.parametrize("key, raw", [(k, v) for k, vs in BAD_VALUES.items() for v in vs])
def test_bad_value_is_refused_naming_key_and_range(key, raw):
    with pytest.raises(C.ConfigError) as err:
        C.load("configs/tiny.yaml", [f"{key}={raw}"])
    message = str(err.value)
    assert message.startswith(f"{key}: expected "), message
    assert "\n" not in message
    # A value of the right type is out of range: the message states the field's allowed values.
    type_error = any(message.startswith(f"{key}: expected {t}, got") for t in
                     ("a list", "true or false", "an integer", "a number", "a string"))
    assert type_error or C.field_rules()[key].allowed in message or key == "data.window_stride", message


def test_good_edge_values_pass():
    cfg = C.load("configs/tiny.yaml", ["optimizer.clip_norm=0", "optimizer.weight_decay=0", "data.shuffle_buffer=1",
                                       "model.intermediate_size=0", "checkpoint.keep_best=perplexity",
                                       "mesh.coordinator_address=10.0.0.1:1234", "train.seed=4294967295",
                                       "data.window_stride=128", "model.embed_dropout=0.5"])
    assert cfg.optimizer.clip_norm == 0 and cfg.checkpoint.keep_best == "perplexity"


def test_keep_best_choices_are_what_evaluation_reports():
    """checkpoint.keep_best is checked against config.EVAL_METRICS at load; the evaluation must
    report those names (with an empty set it returns them without touching the model), besides
    the token count and the per-language losses."""
    from train.core.hooks import EvalSet, evaluate

    reported = evaluate(None, None, EvalSet([], [], []))
    assert set(C.EVAL_METRICS) <= set(reported) and set(reported) - set(C.EVAL_METRICS) == {"eval_tokens"}
    assert C.CHOICES["checkpoint.keep_best"] == ("", *C.EVAL_METRICS)


def _cli(tmp_path, *args, devices=8):
    import os
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "train", "--config", "configs/tiny.yaml", *args, "--check"],
                          capture_output=True, text=True, env=env)


def test_cli_check_refuses_nan_learning_rate_in_one_line(tmp_path):
    proc = _cli(tmp_path, "--set", "optimizer.learning_rate=.nan")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: optimizer.learning_rate: expected a finite number > 0, got nan"
    assert proc.stdout == ""


def test_cli_check_runs_the_batch_checks_for_the_devices_it_sees(tmp_path):
    proc = _cli(tmp_path, "--set", "train.batch_size=15", devices=2)
    assert proc.returncode == 2, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: train.batch_size: expected a multiple of 2 "), proc.stderr
    assert "got 15" in lines[0]
    proc = _cli(tmp_path, "--set", "train.batch_size=16", devices=2)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("# ok for 2 cpu device(s): mesh data=2 fsdp=1 tensor=1")


def test_validation_imports_no_jax():
    import subprocess
    import sys

    code = ("import sys; from train import config as C; C.load('configs/tiny.yaml', ['train.batch_size=15']); "
            "assert 'jax' not in sys.modules, 'train.config imported jax'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
