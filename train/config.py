"""Typed configuration: one frozen dataclass per section, loaded from YAML, overridable with
``--set section.key=value``, validated at load, and saved verbatim into every run directory.

Every field is declared with ``setting(default, rule)`` and a one-line comment: the ``Rule``
beside the default is the one place that says which values the field allows (MaxText style), and
``check_fields`` applies all of them at load. A wrong key, a wrong type, a value outside its rule
(NaN and infinities included) or an impossible combination raises ``ConfigError`` whose one-line
message names the key and what it allows. Nothing here imports JAX.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data_processing.mixture import weights_problem
from data_processing.tokens import padded_vocab_size


class ConfigError(ValueError):
    """A configuration problem; the message starts with the offending key."""


EVAL_METRICS = ("eval_loss", "perplexity")  # what an evaluation reports; checkpoint.keep_best picks one


@dataclass(frozen=True)
class Rule:
    """The allowed values of one field: a test, and the words that say what it allows."""

    test: Callable[[Any], bool]
    allowed: str  # completes "expected ...", e.g. "an integer >= 1"
    choices: tuple[Any, ...] = ()  # the closed set of values, for rules that have one

    def check(self, key: str, value: Any) -> None:
        """Raise a one-line ``ConfigError`` naming ``key`` unless ``value`` is allowed."""
        if not self.test(value):
            raise ConfigError(f"{key}: expected {self.allowed}, got {value!r}")


def at_least(low: int) -> Rule:
    """Integers >= ``low``."""
    return Rule(lambda v: v >= low, f"an integer >= {low}")


def int_range(low: int, high: int) -> Rule:
    """Integers in [low, high)."""
    return Rule(lambda v: low <= v < high, f"an integer in [{low}, {high})")


def greater(low: float) -> Rule:
    """Finite numbers > ``low`` (NaN and infinities are refused by every number rule)."""
    return Rule(lambda v: math.isfinite(v) and v > low, f"a finite number > {low}")


def non_negative() -> Rule:
    """Finite numbers >= 0."""
    return Rule(lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def fraction(*, closed: bool = True) -> Rule:
    """Numbers in [0, 1] (``closed``) or [0, 1)."""
    if closed:
        return Rule(lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
    return Rule(lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")


def one_of(*choices: str) -> Rule:
    """One of a closed set of strings."""
    shown = ", ".join(repr(c) for c in choices)
    return Rule(lambda v: v in choices, f"one of {shown}", choices)


def items_of(*choices: str) -> Rule:
    """A non-empty list whose items are each one of ``choices``."""
    return Rule(lambda v: len(v) > 0 and all(x in choices for x in v),
                f"a non-empty list of {', '.join(repr(c) for c in choices)}", choices)


def non_empty() -> Rule:
    """Any string but the empty one."""
    return Rule(lambda v: v != "", "a non-empty string")


def anything() -> Rule:
    """Every value of the field's type (booleans, free-form names and paths); the type itself is
    checked when the YAML is read."""
    return Rule(lambda v: True, "any value of its type")


def mesh_axis() -> Rule:
    """A mesh axis size: a positive integer, or -1 for all remaining devices."""
    return Rule(lambda v: v == -1 or v >= 1, "an integer >= 1, or -1 (all remaining devices)")


def host_port_or_empty() -> Rule:
    """Empty, or ``HOST:PORT`` with a port in 1..65535."""

    def test(v: str) -> bool:
        host, sep, port = v.rpartition(":")
        return v == "" or (bool(sep) and bool(host) and port.isdigit() and 1 <= int(port) <= 65535)

    return Rule(test, "empty or HOST:PORT with a port in 1..65535")


def mixture_weights() -> Rule:
    """A language mixture: ``{language: weight}`` (see ``data_processing.mixture.weights_problem``)."""
    allowed = ("a mapping of language: weight with finite weights >= 0, named weights summing to at most 1 "
               "(the rest is shared by natural share) or an explicit other: and a positive sum")
    return Rule(lambda v: weights_problem(v) is None, allowed)


def setting(default: Any, rule: Rule) -> Any:
    """A config field: its default and, in the field's metadata, the ``Rule`` of its allowed
    values, checked at load (``check_fields``). A mapping default is copied for every instance."""
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"rule": rule})
    return field(default=default, metadata={"rule": rule})


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = setting("runs/tiny", non_empty())  # run directory: config.yaml, metrics.jsonl, checkpoints/
    name: str = setting("", anything())  # run name for wandb and reports; empty means the output folder's name


@dataclass(frozen=True)
class ModelConfig:
    # "gpt_neo" (no score scaling, local+global) or "gpt2" (scaled, all global)
    family: str = setting("gpt_neo", one_of("gpt_neo", "gpt2"))
    vocab_size: int = setting(50257, at_least(0))  # real vocabulary incl. added tokens; 0 = take it from the tokenizer
    vocab_multiple: int = setting(128, at_least(1))  # embedding rows are padded to a multiple of this for speed
    max_position_embeddings: int = setting(2048, at_least(1))  # learned positions
    hidden_size: int = setting(768, at_least(1))  # model width D
    num_layers: int = setting(12, at_least(1))  # transformer blocks
    num_heads: int = setting(12, at_least(1))  # attention heads; must divide hidden_size
    intermediate_size: int = setting(0, at_least(0))  # MLP width; 0 means 4 * hidden_size
    # pattern repeated over the layers
    attention_layers: tuple[str, ...] = setting(("global", "local"), items_of("global", "local"))
    window_size: int = setting(256, at_least(1))  # local layers attend to the last window_size positions (incl. self)
    activation: str = setting("gelu_new", one_of("gelu_new", "gelu", "relu"))  # gelu_new = tanh approximation
    layer_norm_epsilon: float = setting(1e-5, greater(0))  # LayerNorm epsilon
    tie_word_embeddings: bool = setting(True, anything())  # output layer shares the input embedding
    initializer_range: float = setting(0.02, greater(0))  # stddev of the normal initialiser
    embed_dropout: float = setting(0.0, fraction(closed=False))  # dropout after the embeddings
    attention_dropout: float = setting(0.0, fraction(closed=False))  # dropout on attention probabilities
    resid_dropout: float = setting(0.0, fraction(closed=False))  # dropout on attention and MLP outputs
    # activations/matmuls; master weights stay param_dtype
    compute_dtype: str = setting("bfloat16", one_of("float32", "bfloat16", "float16"))
    param_dtype: str = setting("float32", one_of("float32", "bfloat16"))  # master weights and optimizer state
    # the residual stream: compute (= compute_dtype) or float32 (as PyTorch autocast keeps it)
    residual_dtype: str = setting("compute", one_of("compute", "float32"))
    # einsum, blocked (local layers by window blocks), dot_product (XLA), cudnn
    attention_impl: str = setting("blocked", one_of("einsum", "blocked", "dot_product", "cudnn"))
    # rematerialisation of blocks: none, full, dots (save matmul outputs)
    remat: str = setting("none", one_of("none", "full", "dots"))
    # >0: output layer fused with the loss, this many positions at a time (bounds fp32 logits)
    loss_chunk_size: int = setting(0, at_least(0))
    init_from: str = setting("", anything())  # local Hugging Face folder to start from (fine-tuning); empty = scratch

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
    train_dir: str = setting("data/train", non_empty())  # training shards: a folder, glob or fsspec URL
    validation_dir: str = setting("data/validation", non_empty())  # validation shards
    block_size: int = setting(128, at_least(1))  # tokens per training example (the loader packs block_size + 1)
    shuffle_buffer: int = setting(1000, at_least(1))  # documents held in the seeded shuffle buffer; 1 = no shuffle
    # streaming loader: shards read at once, mixed line by line before the shuffle buffer; 1 = one after another
    stream_interleave: int = setting(16, at_least(1))
    num_workers: int = setting(1, at_least(1))  # tokenizer worker processes
    tokenize_batch: int = setting(256, at_least(1))  # documents per tokenizer call
    prefetch: int = setting(2, at_least(1))  # batches prepared ahead of the step
    skip_bad: bool = setting(False, anything())  # count and skip unreadable records instead of stopping
    # held-out tokens per evaluation, drawn with train.seed across all validation shards
    eval_tokens: int = setting(262144, at_least(1))
    # concat: EOS-joined stream cut into blocks; windows: per-file sliding windows
    packing: str = setting("concat", one_of("concat", "windows"))
    # windows packing: tokens between window starts; 0 = block_size (no label overlap); at most block_size
    window_stride: int = setting(0, at_least(0))
    control_codes: bool = setting(False, anything())  # prepend each document's language token (<|python|>, ...)
    # fraction of row segments (global order) or documents (streaming) rearranged for fill-in-the-middle
    fim_rate: float = setting(0.0, fraction())
    fim_spm_rate: float = setting(0.0, fraction())  # of the fill-in-the-middle segments, the fraction in SPM order
    # pre-tokenized shards, built on the first start; auto = RUN_DIR/token_cache; empty = off
    token_cache: str = setting("auto", anything())
    # global: one seeded order over the token cache, the same for any host count; stream: streaming loader
    order: str = setting("global", one_of("global", "stream"))
    # hosts read whole shards (shards), every P-th line (lines), or shards if >= hosts
    host_split: str = setting("auto", one_of("auto", "shards", "lines"))
    # sample training rows by language with these weights ({python: 0.5, javascript: 0.2}; the rest by
    # natural share, other: 0.0 drops the unnamed); global order only; empty = the corpus as it is
    mixture: dict[str, float] = setting({}, mixture_weights())


@dataclass(frozen=True)
class TokenizerConfig:
    path: str = setting("", anything())  # tokenizer folder (tokenizer.json); empty = the model.init_from folder


@dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = setting(3e-5, greater(0))  # peak learning rate reached after warmup
    b1: float = setting(0.9, fraction(closed=False))  # AdamW first-moment decay
    b2: float = setting(0.95, fraction(closed=False))  # AdamW second-moment decay
    eps: float = setting(1e-8, greater(0))  # AdamW epsilon
    weight_decay: float = setting(0.1, non_negative())  # decoupled weight decay on matrices
    decay_embeddings: bool = setting(False, anything())  # also apply weight decay to wte/wpe
    clip_norm: float = setting(1.0, non_negative())  # global gradient-norm clip; 0 disables
    # micro-batches per optimizer step (batch_size is split among them); 0 = batch_size / (per-device x data devices)
    grad_accum_steps: int = setting(1, at_least(0))


@dataclass(frozen=True)
class ScheduleConfig:
    warmup_steps: int = setting(2500, at_least(0))  # linear warmup from 0 to the peak
    decay_steps: int = setting(25000, at_least(0))  # steps of decay after warmup; constant at the floor afterwards
    decay: str = setting("linear", one_of("linear", "cosine", "constant"))  # shape of the decay
    min_lr_ratio: float = setting(0.0, fraction())  # floor as a fraction of the peak learning rate
    # accept more than 5% of the post-warmup steps below 1% of the peak (refused otherwise)
    allow_low_lr: bool = setting(False, anything())


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = setting(100000, at_least(0))  # optimizer steps
    batch_size: int = setting(0, at_least(0))  # global batch in sequences; 0 means per_device_batch_size * devices
    per_device_batch_size: int = setting(8, at_least(1))  # used when batch_size is 0
    # parameter init, dropout and data order (numpy seeds must be >= 0; JAX keys take 32 bits)
    seed: int = setting(0, int_range(0, 2**32))
    save_every: int = setting(1000, at_least(1))  # checkpoint interval in steps
    eval_every: int = setting(1000, at_least(0))  # evaluation interval in steps; 0 disables
    eval_at_start: bool = setting(False, anything())  # also evaluate the initial model (step 0) of a fresh run
    log_every: int = setting(10, at_least(1))  # metrics interval in steps
    humaneval_every: int = setting(0, at_least(0))  # HumanEval quick check interval; 0 disables
    humaneval_tasks: int = setting(20, at_least(1))  # problems sampled (seeded) for each in-training HumanEval check
    humaneval_samples: int = setting(1, at_least(1))  # completions per problem in that check (pass@k, k <= samples)


@dataclass(frozen=True)
class MeshConfig:
    data: int = setting(-1, mesh_axis())  # data-parallel axis size; -1 takes all remaining devices
    fsdp: int = setting(1, mesh_axis())  # parameter-sharded data-parallel axis size
    tensor: int = setting(1, mesh_axis())  # tensor-parallel axis size (heads, MLP, vocab)
    # multi-host: host:port of process 0; empty = auto-detect/single
    coordinator_address: str = setting("", host_port_or_empty())
    num_processes: int = setting(0, at_least(0))  # multi-host: number of processes; 0 = auto-detect
    process_id: int = setting(-1, at_least(-1))  # multi-host: this process; -1 = auto-detect
    # multi-host: give up joining the coordinator after this many seconds
    init_timeout_s: int = setting(300, at_least(1))


@dataclass(frozen=True)
class CheckpointConfig:
    keep: int = setting(3, at_least(1))  # most recent checkpoints kept
    async_save: bool = setting(True, anything())  # write checkpoints in the background while training continues
    # metric to also keep the best (lowest) checkpoint by; empty = off
    keep_best: str = setting("", one_of("", *EVAL_METRICS))


@dataclass(frozen=True)
class LoggingConfig:
    # offline (no account needed), online, or disabled
    wandb_mode: str = setting("offline", one_of("offline", "online", "disabled"))
    wandb_project: str = setting("codeneo", non_empty())  # wandb project name
    progress: bool = setting(True, anything())  # show a progress bar on the console


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


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


def field_rules() -> dict[str, Rule | None]:
    """``{"section.key": Rule}`` for every field of every section (None: a field without a rule)."""
    rules: dict[str, Rule | None] = {}
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory):  # type: ignore[misc]
            rules[f"{section.name}.{f.name}"] = f.metadata.get("rule")
    return rules


# The closed sets of values, by key (benchmarks sweep over them).
CHOICES = {key: rule.choices for key, rule in field_rules().items() if rule is not None and rule.choices}


def check_fields(cfg: Config) -> None:
    """Check every field against its ``Rule``; the first bad one raises ``ConfigError``."""
    for key, rule in field_rules().items():
        if rule is not None:
            section, name = key.split(".")
            rule.check(key, getattr(getattr(cfg, section), name))


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a field's type annotation; returns the value in that type."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        (item_type, _) = typing.get_args(annotation)
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, item_type = typing.get_args(annotation)
        out = {str(k).lower(): _coerce(v, item_type, f"{key}.{k}") for k, v in value.items()}
        if len(out) != len(value):
            raise ConfigError(f"{key}: expected distinct keys ignoring case, got {value!r}")
        return out
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
    """Every field against its rule, then the checks that need more than one field.
    Device-count checks live in ``validate_for_devices``."""
    check_fields(cfg)
    m, d = cfg.model, cfg.data
    if d.mixture and d.order == "stream":
        raise ConfigError("data.mixture: applies to the global data order only (data.order is stream); remove "
                          "the mixture or use the global order")
    if d.window_stride > d.block_size:
        raise ConfigError(f"data.window_stride: expected 0..block_size ({d.block_size}), got {d.window_stride}")
    if m.hidden_size % m.num_heads:
        raise ConfigError(
            f"model.num_heads: {m.num_heads} heads do not divide model.hidden_size={m.hidden_size}"
        )
    if m.family == "gpt2" and "local" in m.attention_layers:
        raise ConfigError("model.attention_layers: GPT-2 has only global attention layers")
    if d.block_size > m.max_position_embeddings:
        raise ConfigError(
            f"data.block_size: {d.block_size} exceeds model.max_position_embeddings="
            f"{m.max_position_embeddings}"
        )
    if m.attention_impl in ("dot_product", "cudnn") and m.attention_dropout > 0:
        raise ConfigError("model.attention_dropout: jax.nn.dot_product_attention has no dropout; "
                          "use model.attention_impl einsum or blocked, or attention_dropout 0")
    if m.attention_impl == "cudnn" and m.compute_dtype == "float32":
        raise ConfigError("model.attention_impl: cudnn (flash attention) needs compute_dtype bfloat16 or "
                          "float16, got float32")
    mesh = cfg.mesh
    if mesh.fsdp == -1 and mesh.data == -1:
        raise ConfigError("mesh.fsdp: only one mesh axis may be -1")
    if m.num_heads % max(mesh.tensor, 1):
        raise ConfigError(f"mesh.tensor: {mesh.tensor} does not divide model.num_heads={m.num_heads}")
    if m.mlp_width % max(mesh.tensor, 1):
        raise ConfigError(f"mesh.tensor: {mesh.tensor} does not divide the MLP width {m.mlp_width}")
    if mesh.num_processes and mesh.process_id >= mesh.num_processes:
        raise ConfigError(f"mesh.process_id: expected -1 (auto) or 0..{mesh.num_processes - 1} "
                          f"(mesh.num_processes={mesh.num_processes}), got {mesh.process_id}")
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
        raise ConfigError(f"train.batch_size: expected a multiple of optimizer.grad_accum_steps={accum}, got {batch}")
    if (batch // accum) % dp:
        raise ConfigError(
            f"train.batch_size: expected a multiple of {dp * accum} (data-parallel size {dp} = mesh.data x "
            f"mesh.fsdp on {device_count} devices, x optimizer.grad_accum_steps={accum}), got {batch}"
        )
    return data, fsdp, tensor


def _tokenizer_follows_init_from(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """A ``model.init_from`` given by ``--set`` brings its folder's tokenizer: the file's
    ``tokenizer.path`` was written for the file's model, so it is dropped unless ``--set`` gives
    one too (a config written for that model, with both keys, keeps its own)."""
    def get(d: dict, section: str, key: str):
        return (d.get(section) or {}).get(key) if isinstance(d.get(section) or {}, dict) else None

    new_model = get(after, "model", "init_from")
    if not new_model or new_model == get(before, "model", "init_from"):
        return after
    if get(after, "tokenizer", "path") != get(before, "tokenizer", "path"):
        return after  # tokenizer.path given on the command line
    return {**after, "tokenizer": {**(after.get("tokenizer") or {}), "path": ""}}


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
    data = _tokenizer_follows_init_from(data, apply_overrides(data, overrides or []))
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
