"""Typed configuration: one frozen dataclass per section, loaded from YAML, overridable with
``--set section.key=value``, validated at load, and saved verbatim into every run directory.

Every field has a default and a one-line comment. A wrong key, a wrong type or an impossible
combination raises ``ConfigError`` whose message names the key and what was expected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data_processing.tokens import padded_vocab_size


class ConfigError(ValueError):
    """A configuration problem; the message starts with the offending key."""


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = "runs/tiny"  # run directory: config.yaml, metrics.jsonl, checkpoints/
    name: str = ""  # run name for wandb and reports; empty means the output folder's name


@dataclass(frozen=True)
class ModelConfig:
    family: str = "gpt_neo"  # "gpt_neo" (no score scaling, local+global) or "gpt2" (scaled, all global)
    vocab_size: int = 50257  # real vocabulary size incl. added tokens; 0 = take it from the tokenizer
    vocab_multiple: int = 128  # embedding rows are padded to a multiple of this for speed
    max_position_embeddings: int = 2048  # learned positions
    hidden_size: int = 768  # model width D
    num_layers: int = 12  # transformer blocks
    num_heads: int = 12  # attention heads; must divide hidden_size
    intermediate_size: int = 0  # MLP width; 0 means 4 * hidden_size
    attention_layers: tuple[str, ...] = ("global", "local")  # pattern repeated over the layers
    window_size: int = 256  # local layers attend to the last window_size positions (incl. self)
    activation: str = "gelu_new"  # gelu_new (tanh approximation), gelu, relu
    layer_norm_epsilon: float = 1e-5  # LayerNorm epsilon
    tie_word_embeddings: bool = True  # output layer shares the input embedding
    initializer_range: float = 0.02  # stddev of the normal initialiser
    embed_dropout: float = 0.0  # dropout after the embeddings
    attention_dropout: float = 0.0  # dropout on attention probabilities
    resid_dropout: float = 0.0  # dropout on attention and MLP outputs
    compute_dtype: str = "bfloat16"  # activations/matmuls; master weights stay param_dtype
    param_dtype: str = "float32"  # master weights and optimizer state
    residual_dtype: str = "compute"  # the residual stream: compute (= compute_dtype) or float32 (PyTorch autocast)
    attention_impl: str = "blocked"  # einsum, blocked (local layers by window blocks), dot_product (XLA), cudnn
    remat: str = "none"  # rematerialisation of blocks: none, full, dots (save matmul outputs)
    loss_chunk_size: int = 0  # >0: output layer fused with the loss, this many positions at a time (bounds fp32 logits)
    init_from: str = ""  # local Hugging Face folder to start from (fine-tuning); empty = from scratch

    @property
    def mlp_width(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def padded_vocab_size(self) -> int:
        return padded_vocab_size(self.vocab_size, self.vocab_multiple)

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """Attention kind ("global"/"local") of every layer, from the repeated pattern."""
        pattern = self.attention_layers
        return tuple(pattern[i % len(pattern)] for i in range(self.num_layers))


@dataclass(frozen=True)
class DataConfig:
    train_dir: str = "data/train"  # training shards: a folder, glob or fsspec URL
    validation_dir: str = "data/validation"  # validation shards
    block_size: int = 128  # tokens per training example (the loader packs block_size + 1)
    shuffle_buffer: int = 1000  # documents held in the seeded shuffle buffer
    num_workers: int = 1  # tokenizer worker processes
    tokenize_batch: int = 256  # documents per tokenizer call
    prefetch: int = 2  # batches prepared ahead of the step
    skip_bad: bool = False  # count and skip unreadable records instead of stopping
    eval_tokens: int = 262144  # held-out tokens per evaluation, drawn with train.seed across all validation shards
    packing: str = "concat"  # concat: EOS-joined stream cut into blocks; windows: per-file sliding windows
    window_stride: int = 0  # windows packing: tokens between window starts; 0 = block_size (no label overlap)
    control_codes: bool = False  # prepend each document's language token (<|python|>, ...; Autocoder)
    fim_rate: float = 0.0  # fraction of documents rearranged for fill-in-the-middle (Bavarian et al. 2022)
    fim_spm_rate: float = 0.0  # of the fill-in-the-middle documents, the fraction in SPM order
    token_cache: str = "auto"  # pre-tokenized shards (built on first start); auto = RUN_DIR/token_cache; empty = off
    order: str = "global"  # global: one seeded order over the token cache, any host count; stream: streaming loader
    host_split: str = "auto"  # hosts read whole shards (shards), every P-th line (lines), or shards if >= hosts


@dataclass(frozen=True)
class TokenizerConfig:
    path: str = ""  # tokenizer folder (tokenizer.json); empty = the model.init_from folder


@dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 3e-5  # peak learning rate reached after warmup
    b1: float = 0.9  # AdamW first-moment decay
    b2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.1  # decoupled weight decay on matrices
    decay_embeddings: bool = False  # also apply weight decay to wte/wpe
    clip_norm: float = 1.0  # global gradient-norm clip; 0 disables
    grad_accum_steps: int = 1  # micro-batches per step; 0 = batch_size / (per_device_batch_size x data devices)


@dataclass(frozen=True)
class ScheduleConfig:
    warmup_steps: int = 2500  # linear warmup from 0 to the peak
    decay_steps: int = 25000  # steps of decay after warmup; constant at the floor afterwards
    decay: str = "linear"  # linear, cosine or constant
    min_lr_ratio: float = 0.0  # floor as a fraction of the peak learning rate
    allow_low_lr: bool = False  # accept > 5% of the post-warmup steps below 1% of the peak (refused otherwise)


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 100000  # optimizer steps
    batch_size: int = 0  # global batch in sequences; 0 means per_device_batch_size * devices
    per_device_batch_size: int = 8  # used when batch_size is 0
    seed: int = 0  # parameter init, dropout and data order
    save_every: int = 1000  # checkpoint interval in steps
    eval_every: int = 1000  # evaluation interval in steps; 0 disables
    eval_at_start: bool = False  # also evaluate the initial model (step 0) of a fresh run
    log_every: int = 10  # metrics interval in steps
    humaneval_every: int = 0  # HumanEval quick check interval; 0 disables
    humaneval_tasks: int = 20  # problems sampled (seeded) for each in-training HumanEval check
    humaneval_samples: int = 1  # completions per problem in that check (pass@k for k <= samples)


@dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # data-parallel axis size; -1 takes all remaining devices
    fsdp: int = 1  # parameter-sharded data-parallel axis size
    tensor: int = 1  # tensor-parallel axis size (heads, MLP, vocab)
    coordinator_address: str = ""  # multi-host: host:port of process 0; empty = auto-detect/single
    num_processes: int = 0  # multi-host: number of processes; 0 = auto-detect
    process_id: int = -1  # multi-host: this process; -1 = auto-detect
    init_timeout_s: int = 300  # multi-host: give up joining the coordinator after this many seconds


@dataclass(frozen=True)
class CheckpointConfig:
    keep: int = 3  # most recent checkpoints kept
    async_save: bool = True  # write checkpoints in the background while training continues
    keep_best: str = ""  # metric to also keep the best checkpoint by (e.g. eval_loss); empty = off


@dataclass(frozen=True)
class LoggingConfig:
    wandb_mode: str = "offline"  # offline (no account needed), online, or disabled
    wandb_project: str = "codeneo"  # wandb project name
    progress: bool = True  # show a progress bar on the console


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


CHOICES = {
    "model.family": ("gpt_neo", "gpt2"),
    "model.activation": ("gelu_new", "gelu", "relu"),
    "model.compute_dtype": ("float32", "bfloat16", "float16"),
    "model.residual_dtype": ("compute", "float32"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.attention_impl": ("einsum", "blocked", "dot_product", "cudnn"),
    "model.remat": ("none", "full", "dots"),
    "data.packing": ("concat", "windows"),
    "data.host_split": ("auto", "shards", "lines"),
    "data.order": ("global", "stream"),
    "schedule.decay": ("linear", "cosine", "constant"),
    "logging.wandb_mode": ("offline", "online", "disabled"),
}


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a field's type annotation; returns the value in that type."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        (item_type, _) = typing.get_args(annotation)
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: unsupported annotation {annotation}")
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):
            # YAML 1.1 reads "3e-4" (no dot) as a string; accept it as the number it means.
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {annotation}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {data!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(known))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = _build(hints[f.name], data[f.name] or {}, key)
        else:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], key)
    return cls(**kwargs)


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) suitable for YAML/JSON."""

    def plain(x):
        if isinstance(x, tuple):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return plain(dataclasses.asdict(cfg))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings; values are parsed as YAML (``3e-4``, ``[a, b]``)."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected section.key=value")
        path, raw = item.split("=", 1)
        parts = path.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"--set {path}: expected section.key=value (e.g. train.batch_size=16)")
        section, key = parts
        value = yaml.safe_load(raw) if raw.strip() else ""
        if isinstance(value, (int, float)) and not isinstance(value, bool) and raw.strip()[0] in "'\"":
            value = raw.strip()[1:-1]
        sec = data.setdefault(section, {})
        if not isinstance(sec, dict):
            raise ConfigError(f"{section}: expected a mapping of keys")
        sec[key] = value
    return data


def validate(cfg: Config) -> None:
    """Checks that need more than one field. Device-count checks live in ``validate_for_devices``."""
    for key, choices in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")
    m = cfg.model
    positive = {
        "model.vocab_multiple": m.vocab_multiple,
        "model.hidden_size": m.hidden_size,
        "model.num_layers": m.num_layers,
        "model.num_heads": m.num_heads,
        "model.max_position_embeddings": m.max_position_embeddings,
        "model.window_size": m.window_size,
        "data.block_size": cfg.data.block_size,
        "data.num_workers": cfg.data.num_workers,
        "data.tokenize_batch": cfg.data.tokenize_batch,
        "data.eval_tokens": cfg.data.eval_tokens,
        "train.log_every": cfg.train.log_every,
        "train.save_every": cfg.train.save_every,
        "checkpoint.keep": cfg.checkpoint.keep,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: expected a positive integer, got {value}")
    if cfg.optimizer.grad_accum_steps < 0:
        raise ConfigError(f"optimizer.grad_accum_steps: expected >= 0 (0 = from the batch and devices), "
                          f"got {cfg.optimizer.grad_accum_steps}")
    d = cfg.data
    for key in ("fim_rate", "fim_spm_rate"):
        if not 0.0 <= getattr(d, key) <= 1.0:
            raise ConfigError(f"data.{key}: expected a fraction in [0, 1], got {getattr(d, key)}")
    if not 0 <= d.window_stride <= d.block_size:
        raise ConfigError(f"data.window_stride: expected 0..block_size ({d.block_size}), got {d.window_stride}")
    if m.vocab_size < 0:
        raise ConfigError(f"model.vocab_size: expected >= 0 (0 = from the tokenizer), got {m.vocab_size}")
    if m.hidden_size % m.num_heads:
        raise ConfigError(
            f"model.num_heads: {m.num_heads} heads do not divide model.hidden_size={m.hidden_size}"
        )
    bad_kinds = [k for k in m.attention_layers if k not in ("global", "local")]
    if not m.attention_layers or bad_kinds:
        raise ConfigError(
            f"model.attention_layers: expected a list of 'global'/'local', got {m.attention_layers!r}"
        )
    if m.family == "gpt2" and "local" in m.attention_layers:
        raise ConfigError("model.attention_layers: GPT-2 has only global attention layers")
    if cfg.data.block_size > m.max_position_embeddings:
        raise ConfigError(
            f"data.block_size: {cfg.data.block_size} exceeds model.max_position_embeddings="
            f"{m.max_position_embeddings}"
        )
    for key in ("embed_dropout", "attention_dropout", "resid_dropout"):
        if not 0.0 <= getattr(m, key) < 1.0:
            raise ConfigError(f"model.{key}: expected a rate in [0, 1), got {getattr(m, key)}")
    if m.attention_impl in ("dot_product", "cudnn") and m.attention_dropout > 0:
        raise ConfigError("model.attention_dropout: jax.nn.dot_product_attention has no dropout; "
                          "use model.attention_impl einsum or blocked, or attention_dropout 0")
    if m.attention_impl == "cudnn" and m.compute_dtype == "float32":
        raise ConfigError("model.attention_impl: cudnn (flash attention) needs compute_dtype bfloat16 or "
                          "float16, got float32")
    if m.loss_chunk_size < 0:
        raise ConfigError(f"model.loss_chunk_size: expected >= 0, got {m.loss_chunk_size}")
    t = cfg.train
    if t.max_steps < 0:
        raise ConfigError(f"train.max_steps: expected >= 0, got {t.max_steps}")
    if t.batch_size < 0 or t.per_device_batch_size <= 0:
        raise ConfigError("train.batch_size: expected >= 0 (0 = per_device_batch_size x devices)")
    if t.eval_every < 0 or t.humaneval_every < 0:
        raise ConfigError("train.eval_every: expected >= 0 (0 disables)")
    s = cfg.schedule
    if s.warmup_steps < 0 or s.decay_steps < 0:
        raise ConfigError("schedule.warmup_steps: warmup and decay steps must be >= 0")
    if not 0.0 <= s.min_lr_ratio <= 1.0:
        raise ConfigError(f"schedule.min_lr_ratio: expected a fraction in [0, 1], got {s.min_lr_ratio}")
    o = cfg.optimizer
    if o.learning_rate <= 0:
        raise ConfigError(f"optimizer.learning_rate: expected > 0, got {o.learning_rate}")
    if not (0 <= o.b1 < 1 and 0 <= o.b2 < 1):
        raise ConfigError("optimizer.b1: b1 and b2 must lie in [0, 1)")
    for key in ("data", "fsdp", "tensor"):
        value = getattr(cfg.mesh, key)
        if value == 0 or value < -1:
            raise ConfigError(f"mesh.{key}: expected a positive size or -1 (all remaining), got {value}")
    if cfg.mesh.fsdp == -1 and cfg.mesh.data == -1:
        raise ConfigError("mesh.fsdp: only one mesh axis may be -1")
    if m.num_heads % max(cfg.mesh.tensor, 1):
        raise ConfigError(f"mesh.tensor: {cfg.mesh.tensor} does not divide model.num_heads={m.num_heads}")
    if m.mlp_width % max(cfg.mesh.tensor, 1):
        raise ConfigError(f"mesh.tensor: {cfg.mesh.tensor} does not divide the MLP width {m.mlp_width}")
    if not cfg.tokenizer.path and not m.init_from:
        raise ConfigError("tokenizer.path: required (a folder from python -m tokenizer.train_tokenizer) "
                          "unless model.init_from names a Hugging Face folder")


def mesh_shape(cfg: Config, device_count: int) -> tuple[int, int, int]:
    """Resolve (data, fsdp, tensor) for ``device_count`` devices, filling the -1 axis."""
    sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if device_count % fixed:
            raise ConfigError(
                f"mesh: fixed axes ({fixed} devices) do not divide the {device_count} available devices"
            )
        sizes = [device_count // fixed if s == -1 else s for s in sizes]
    if math.prod(sizes) != device_count:
        raise ConfigError(
            f"mesh: data x fsdp x tensor = {'x'.join(map(str, sizes))} = {math.prod(sizes)} devices, "
            f"but {device_count} are available"
        )
    return tuple(sizes)  # type: ignore[return-value]


def global_batch_size(cfg: Config, device_count: int) -> int:
    """Global batch in sequences (explicit, or per-device x devices)."""
    return cfg.train.batch_size or cfg.train.per_device_batch_size * device_count


def grad_accum_steps(cfg: Config, device_count: int) -> int:
    """Micro-batches per step: explicit, or (0) the global batch over per-device x data devices."""
    if cfg.optimizer.grad_accum_steps:
        return cfg.optimizer.grad_accum_steps
    data, fsdp, _ = mesh_shape(cfg, device_count)
    per_step = cfg.train.per_device_batch_size * data * fsdp
    batch = global_batch_size(cfg, device_count)
    if batch % per_step:
        raise ConfigError(f"optimizer.grad_accum_steps: 0 needs train.batch_size ({batch}) to be a multiple of "
                          f"per_device_batch_size x data devices ({per_step})")
    return max(batch // per_step, 1)


def validate_for_devices(cfg: Config, device_count: int) -> tuple[int, int, int]:
    """Checks that depend on the device count; returns the resolved mesh shape."""
    data, fsdp, tensor = mesh_shape(cfg, device_count)
    batch = global_batch_size(cfg, device_count)
    dp = data * fsdp
    accum = grad_accum_steps(cfg, device_count)
    if batch % accum:
        raise ConfigError(f"train.batch_size: {batch} is not divisible by optimizer.grad_accum_steps={accum}")
    if (batch // accum) % dp:
        raise ConfigError(
            f"train.batch_size: micro-batch {batch // accum} is not divisible by the data-parallel size "
            f"{dp} (mesh.data x mesh.fsdp)"
        )
    return data, fsdp, tensor


def load(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults), apply ``--set`` overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(f"{path}: cannot read config ({err.strerror})") from err
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    data = apply_overrides(data, overrides or [])
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def replace(cfg: Config, **sections: dict[str, Any]) -> Config:
    """Copy of ``cfg`` with some fields of some sections replaced, e.g.
    ``replace(cfg, train={"max_steps": 5})``."""
    updates = {name: dataclasses.replace(getattr(cfg, name), **values) for name, values in sections.items()}
    new = dataclasses.replace(cfg, **updates)
    validate(new)
    return new


def dump(cfg: Config) -> str:
    """The whole resolved config as YAML text."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def save(cfg: Config, run_dir: str | os.PathLike) -> Path:
    """Write ``RUN_DIR/config.yaml`` atomically; the run can be repeated from it alone."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / "config.yaml"
    tmp = target.with_suffix(".yaml.tmp")
    tmp.write_text(dump(cfg))
    os.replace(tmp, target)
    return target
