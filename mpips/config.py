"""Configuration: one keyword-only dataclass per concern, mapped onto CLI flags and config files.

Every field becomes a flag: ``lr`` -> ``--lr``, ``data_servers`` -> ``--data-servers``.
A ``--config FILE`` in TOML or YAML gives the same keys (dashes or underscores, flat or grouped
under the concern's name: ``[optim] lr = 0.1``); flags given on the command line win::

    mpirun -n 4 python -m mpips.train --optimizer adam --lr 3e-3 --sync ssp --staleness 2
    mpirun -n 6 python -m mpips.train --config run.toml --servers 2
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomllib

from mpips.chunking import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES, MIN_CHUNK_BYTES

__all__ = [
    "CheckpointConfig",
    "CompressionConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "RoleConfig",
    "TrainConfig",
    "build_parser",
    "parse_args",
]


class ConfigError(ValueError):
    """A configuration value or file is invalid; the message says which and why."""


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass(kw_only=True)
class RoleConfig:
    """How the MPI ranks are split into roles."""

    servers: int = _opt(1, "parameter-server ranks; parameters are sharded across them by bytes")
    data_servers: int = _opt(
        1, "data-server ranks streaming batches from HDF5; 0 = workers read their own data"
    )


@dataclass(kw_only=True)
class ModelConfig:
    """Which network to train."""

    model: str = _opt(
        "mlp", "mlp | cnn | gpt | package.module:factory: mpips imports package.module and, after"
        " torch.manual_seed(--seed), calls factory with those of these keywords its signature names (all"
        " with **kwargs): input_shape (tuple of ints, one sample's shape), num_classes (int, the output's"
        " last dimension: classes, regression targets per sample, labels, or vocabulary), task (str) and"
        " target_shape (tuple of ints, one sample's target); it must return an nn.Module with float32,"
        " bfloat16 or float16 parameters (one dtype) whose output for a batch of B samples is B x num_classes"
        " (tokens: B x T x num_classes; regression may match the targets' shape)"
    )
    hidden: int = _opt(128, "MLP hidden width")
    gpt_layers: int = _opt(2, "GPT: transformer blocks")
    gpt_width: int = _opt(128, "GPT: embedding width")
    gpt_heads: int = _opt(4, "GPT: attention heads")
    gpt_context: int = _opt(64, "GPT: context length in bytes")


@dataclass(kw_only=True)
class DataConfig:
    """Where samples come from and how they reach the workers."""

    dataset: str = _opt("digits", "built-in dataset: digits (UCI handwritten digits) | pytext (stdlib sources, bytes)")
    data: str | None = _opt(
        None, "HDF5 data (overrides --dataset): a file made by `python -m mpips.data prepare`, or HDF5 files"
        " read in place, no copy: a path, a quoted glob ('shards/*.h5') or a comma-separated list, each"
        " holding datasets --x-key and --y-key with one row per sample; each file (or chunk-aligned range of"
        " a large one) is a partition"
    )
    val_data: str | None = _opt(None, "held-out HDF5 file(s) for --data read in place (same keys and shapes)")
    x_key: str = _opt("x", "files read in place: the dataset of inputs, (N, *shape)")
    y_key: str = _opt("y", "files read in place: the dataset of targets, (N, *target)")
    task: Literal["auto", "classification", "regression", "multilabel", "tokens"] = _opt(
        "auto", "what the targets are: class indices; float targets; 0/1 per label; next-token ids. auto: a"
        " prepared file's kind, or for files read in place integer y -> classification (integer x and y of"
        " one shape -> tokens), float y -> regression"
    )
    num_classes: int | None = _opt(
        None, "files read in place: classes (classification) or vocabulary (tokens); default largest + 1"
    )
    batch_size: int = _opt(32, "samples per worker per step")
    prefetch: int = _opt(2, "batches each worker keeps in flight from its data server")
    replicas: int = _opt(1, "data servers holding each partition")
    cache_mb: float = _opt(256.0, "per data server read cache bound, MB")
    data_dir: str | None = _opt(None, "where built-in datasets are materialised as HDF5 (default ~/.cache/mpips)")


@dataclass(kw_only=True)
class OptimConfig:
    """The server-side optimizer; it runs on each server over its own shard."""

    optimizer: Literal["sgd", "momentum", "nesterov", "adam", "adamw"] = _opt("adam", "update rule")
    lr: float = _opt(3e-3, "peak learning rate")
    momentum: float = _opt(0.9, "momentum for momentum / nesterov")
    weight_decay: float = _opt(0.0, "L2 (sgd, adam) or decoupled (adamw) weight decay")
    lr_schedule: Literal["constant", "step", "cosine"] = _opt("constant", "learning-rate schedule after warm-up")
    warmup_steps: int = _opt(0, "linear warm-up steps")
    step_size: int = _opt(100, "step schedule: multiply lr by --gamma every this many steps")
    gamma: float = _opt(0.1, "step schedule factor")
    clip_grad_norm: float = _opt(
        0.0, "clip the gradient the servers apply as torch.nn.utils.clip_grad_norm_(params, C) before"
        " optimizer.step(), by the norm over the whole model (all servers) of what they decode: bsp the step's mean,"
        " asp/ssp each push (with a codec, the decoded gradient); 0 = off")
    asp_scale: float | None = _opt(None, "asp/ssp: learning-rate scale of each applied gradient (default 1/workers)")
    staleness_lr: bool = _opt(
        True, "asp/ssp: divide a gradient's learning rate by its staleness, the updates applied since"
        " its worker pulled, in steps (staleness-aware async SGD, Zhang et al. 2016)"
    )
    dc_lambda: float = _opt(
        0.0, "asp/ssp: delay compensation (DC-ASGD-a, Zheng et al. 2017): a server corrects each gradient"
        " towards the parameters it is applied to, g + l g*g*(w_now - w_pulled), l this value over the running"
        " root mean square of the gradients (the paper's 2.0); the server keeps its shard's last 4 W + 1"
        " versions; 0 = off"
    )
    lookahead: float = _opt(
        2.0, "asp/ssp: workers pull the parameters extrapolated along the servers' last update, by this many"
        " times W - 1 updates (the staleness of a gradient when W workers run in step), so each gradient is"
        " computed near where it will be applied (a look-ahead, as in DANA, Hakimi et al. 2019); the servers keep"
        " the optimizer's own values for checkpoints and the final model (8 more bytes per parameter); 0 = off;"
        " no effect in bsp"
    )
    implicit_momentum: bool = _opt(
        False, "asp/ssp: take the momentum asynchrony adds, 1 - 1/W (Mitliagkas et al. 2016), off the servers'"
        " optimizer: SGD's momentum or Adam's beta1 (0.9) becomes max(0, it - (1 - 1/W)); the optimizer of"
        " --optimizer (an own loop's registered optimizer keeps the betas it pushes); no effect in bsp"
    )
    max_bad_grads: int = _opt(10, "abort after this many dropped NaN/Inf gradients; 0 = never")


@dataclass(kw_only=True)
class TrainConfig:
    """The training run."""

    epochs: float = _opt(30.0, "epochs over the training split (ignored when --steps is set)")
    steps: int | None = _opt(None, "global steps to train; overrides --epochs")
    sync: Literal["bsp", "asp", "ssp"] = _opt("bsp", "bsp = synchronous; asp = fully async; ssp = bounded staleness")
    staleness: int = _opt(2, "ssp: no worker runs more than this many steps ahead of the slowest")
    backup_workers: int = _opt(
        0, "bsp: apply a step once all but this many workers' gradients of it are in (the first to arrive,"
        " so not the same sum on every run); a later gradient of an applied step is dropped and counted, and"
        " its worker skips to the newest version (backup workers, Chen et al. 2016). 0 = wait for every"
        " worker, summed in worker order"
    )
    seed: int = _opt(0, "seeds model initialisation and the sample order")
    loss: str = _opt(
        "auto", "auto (the task's) | cross_entropy | mse | huber | bce | next_token | package.module:function, a"
        " callable (output, target) -> scalar tensor, the batch mean. Held-out metrics follow the task:"
        " accuracy; mse, mae, r2; f1 (micro); perplexity"
    )
    eval_every: int = _opt(0, "evaluate on the held-out split every N steps (0 = at the end only)")
    final_eval: bool = _opt(True, "evaluate the final model on the held-out split (benchmarks turn it off)")
    save: str | None = _opt(None, "write the final model as a torch state_dict to this file")
    metrics: str | None = _opt(None, "write JSON-lines events (step, eval, end) to this file")
    trace: str | None = _opt(
        None, "write a Chrome trace (open in https://ui.perfetto.dev or chrome://tracing) of what every rank"
        " spends its time on to this JSON file, clocks aligned across ranks; `python -m mpips.report` plots it"
    )
    device: Literal["cpu", "cuda", "auto"] = _opt(
        "cpu", "where workers compute; cuda: one GPU per worker rank of a node (local rank modulo the GPUs"
        " torch sees); servers and data servers stay on the CPU"
    )
    cuda_aware: Literal["auto", "yes", "no"] = _opt(
        "auto", "GPU workers: yes = MPI reads and writes GPU memory directly; no = staged through pinned host"
        " buffers, chunk by chunk on a side stream; auto = direct where the MPI library says it is CUDA-aware"
        " (MPIX_Query_cuda_support, MPIX_GPU_query_support, MPICH_GPU_SUPPORT_ENABLED, MV2_USE_CUDA)"
    )
    precision: Literal["fp32", "bf16", "fp16"] = _opt(
        "fp32", "worker compute: bf16 = torch.autocast to bfloat16 (CPU and CUDA); fp16 = autocast to float16"
        " with a dynamic loss scaler (torch.amp.GradScaler; a step that overflows pushes nothing); servers"
        " keep float32 weights and optimizer state either way"
    )
    pull: Literal["auto", "rma", "message"] = _opt(
        "auto", "how workers pull: one-sided MPI_Get, or messages served by the server; auto picks by MPI library"
    )
    max_inflight: int = _opt(2, "pushes a worker may have outstanding per server")
    chunk_bytes: int = _opt(
        DEFAULT_CHUNK_BYTES, "largest piece of any one transfer (push, pull, final gather, checkpoint write), in"
        f" bytes, {MIN_CHUNK_BYTES} to {MAX_CHUNK_BYTES} (1 GiB): no MPI call carries more, so shards over 2 GiB"
        " train on MPI-3.1 libraries; smaller chunks cost a call each"
    )
    push_during_backward: bool = _opt(
        True, "bsp: a worker sends each chunk of its gradient as soon as backward has produced it (last layers"
        " first), where the gradient is final then (float32 parameters on the CPU; not fp16 loss scaling, not"
        " GPU staging); --no-push-during-backward: after the whole backward. Only pushes longer than one"
        " --chunk-bytes are streamed; asp/ssp push after backward (a streamed push holds the server's one"
        " receive buffer through its worker's backward)"
    )
    pull_ahead: bool = _opt(
        True, "bsp over RMA windows, CPU workers: the servers apply and publish each version in buckets of"
        " --chunk-bytes and a worker pulls each bucket as it comes, each module's forward waiting only for its"
        " own parameters (first layers first); --no-pull-ahead pulls the whole version before forward"
    )
    threads: int = _opt(1, "torch threads per rank")
    log_every: int = _opt(10, "progress line every N steps when not on a terminal")
    dry_run: bool = _opt(False, "print the role map and shard plan, then exit")
    stall_timeout: float = _opt(120.0, "abort when no progress is made for this many seconds")
    debug: bool = _opt(
        False, "bad configuration, dataset or model: print the traceback too (a crash always prints its own)"
    )


@dataclass(kw_only=True)
class CheckpointConfig:
    """Checkpoint and resume."""

    checkpoint_dir: str | None = _opt(None, "directory for checkpoints")
    checkpoint_every: int = _opt(0, "checkpoint every N steps (0 = off)")
    checkpoint_interval: float = _opt(
        0.0, "also checkpoint when this many seconds have passed since the last one (0 = off)"
    )
    keep: int = _opt(3, "keep the newest K complete checkpoints in --checkpoint-dir")
    resume: str | None = _opt(
        None, "resume from this checkpoint file; alone: the newest complete one in --checkpoint-dir"
        " (none yet: start from step 0)", const="latest",
    )


@dataclass(kw_only=True)
class CompressionConfig:
    """Gradient compression on the push path, precision of the pull path (mpips.compression)."""

    compress: Literal["none", "fp16", "bf16", "topk", "randomk", "qsgd", "sign"] = _opt(
        "none", "codec of pushed gradients, per chunk of --chunk-bytes: none = float32; fp16/bf16 = 2 bytes"
        " per value; topk/randomk = the --compress-ratio fraction of entries (largest / seeded random);"
        " qsgd = --qsgd-levels stochastic levels, 1 byte per value; sign = 1 bit per value and a scale"
    )
    compress_ratio: float = _opt(
        0.01, "topk, randomk: fraction of each chunk's entries sent, in (0, 1]; fewer bytes, more to catch up"
    )
    qsgd_levels: int = _opt(8, "qsgd: quantisation levels s, 1 to 127 (more levels: less noise, same bytes)")
    error_feedback: bool | None = _opt(
        None, "add what compression left out of each gradient to the worker's next one (a residual per"
        " worker, kept in checkpoints); default: on for the biased codecs topk and sign, off otherwise"
    )
    pull_codec: Literal["fp32", "bf16", "fp16"] = _opt(
        "fp32", "precision of the parameters workers pull: servers keep float32 weights and optimizer"
        " state and publish a copy in this precision (bf16/fp16 halve the pull bytes)"
    )
    momentum_correction: bool = _opt(
        False, "topk, randomk with --optimizer momentum or nesterov: deep gradient compression's momentum"
        " correction; each worker runs the --momentum on its own gradient, sends the largest entries of"
        " the accumulated velocity and zeroes its momentum where it sent; the servers apply plain SGD"
        " (a velocity and a momentum buffer per worker, kept in checkpoints)"
    )
    sparsity_warmup: int = _opt(
        0, "topk, randomk: deep gradient compression's sparsity warm-up, in steps: the fraction sent starts"
        " near 1 and falls exponentially to --compress-ratio over these steps, ratio ** ((t + 1) /"
        " (STEPS + 1)) at step t (0 = off; the first steps' pushes are larger)"
    )

    def feedback(self) -> bool:
        """Whether error feedback is on (``--error-feedback``, the codec's default, or momentum
        correction, whose velocity is its residual)."""
        if self.momentum_correction:
            return True
        if self.error_feedback is None:
            return self.compress in ("topk", "sign")
        return self.error_feedback

    def worker_momentum(self, optim: OptimConfig) -> tuple[float | None, bool]:
        """(momentum factor, nesterov) that the workers run with --momentum-correction, else (None, False)."""
        if not self.momentum_correction:
            return None, False
        return optim.momentum, optim.optimizer == "nesterov"


@dataclass(kw_only=True)
class Config:
    """All settings of one run, grouped by concern."""

    roles: RoleConfig = field(default_factory=RoleConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)

    def validate(self) -> Config:
        """Check value ranges; raise ConfigError naming the flag."""
        checks = [
            (self.roles.servers >= 1, "--servers must be at least 1"),
            (self.roles.data_servers >= 0, "--data-servers must be 0 or more"),
            (self.data.batch_size >= 1, "--batch-size must be at least 1"),
            (self.data.prefetch >= 1, "--prefetch must be at least 1"),
            (self.data.replicas >= 1, "--replicas must be at least 1"),
            (self.optim.lr > 0, "--lr must be positive"),
            (0 <= self.optim.momentum < 1, "--momentum must be in [0, 1)"),
            (self.optim.weight_decay >= 0, "--weight-decay must be 0 or more"),
            (self.optim.clip_grad_norm >= 0, "--clip-grad-norm must be 0 or more"),
            (self.optim.dc_lambda >= 0, "--dc-lambda must be 0 or more"),
            (self.optim.lookahead >= 0, "--lookahead must be 0 or more"),
            (self.train.epochs > 0, "--epochs must be positive"),
            (self.train.steps is None or self.train.steps >= 1, "--steps must be at least 1"),
            (self.train.staleness >= 0, "--staleness must be 0 or more"),
            (self.train.backup_workers >= 0, "--backup-workers must be 0 or more"),
            (self.train.max_inflight >= 1, "--max-inflight must be at least 1"),
            (MIN_CHUNK_BYTES <= self.train.chunk_bytes <= MAX_CHUNK_BYTES,
             f"--chunk-bytes must be between {MIN_CHUNK_BYTES} (a push header) and {MAX_CHUNK_BYTES} (1 GiB)"),
            (self.train.threads >= 1, "--threads must be at least 1"),
            (self.train.stall_timeout > 0, "--stall-timeout must be positive"),
            (self.checkpoint.checkpoint_every >= 0, "--checkpoint-every must be 0 or more"),
            (self.checkpoint.checkpoint_interval >= 0, "--checkpoint-interval must be 0 or more"),
            (self.checkpoint.keep >= 1, "--keep must be at least 1"),
            (self.checkpoint.checkpoint_dir is not None or not (
                self.checkpoint.checkpoint_every or self.checkpoint.checkpoint_interval),
             "--checkpoint-every / --checkpoint-interval need --checkpoint-dir"),
            (self.data.replicas <= max(1, self.roles.data_servers), "--replicas cannot exceed --data-servers"),
            (self.data.num_classes is None or self.data.num_classes >= 2, "--num-classes must be at least 2"),
            (self.data.val_data is None or self.data.data is not None, "--val-data needs --data"),
            (0 < self.compression.compress_ratio <= 1, "--compress-ratio must be in (0, 1]"),
            (1 <= self.compression.qsgd_levels <= 127, "--qsgd-levels must be between 1 and 127"),
            (self.compression.sparsity_warmup >= 0, "--sparsity-warmup must be 0 or more"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(self._with_value(message))
        c, sparse = self.compression, self.compression.compress in ("topk", "randomk")
        combinations = [
            (not c.sparsity_warmup or sparse,
             f"--sparsity-warmup needs --compress topk or randomk (got --compress {c.compress}): it warms up"
             " the fraction of entries they send"),
            (not c.momentum_correction or sparse,
             f"--momentum-correction needs --compress topk or randomk (got --compress {c.compress}): it zeroes"
             " the momentum of the entries sent (deep gradient compression's momentum factor masking)"),
            (not c.momentum_correction or self.optim.optimizer in ("momentum", "nesterov"),
             f"--momentum-correction moves the momentum of --optimizer momentum or nesterov onto the workers"
             f" (the servers then apply plain SGD); --optimizer {self.optim.optimizer} has none to move"),
            (not c.momentum_correction or c.error_feedback is not False,
             "--momentum-correction keeps what it did not send in its velocity, which is error feedback:"
             " it cannot run with --no-error-feedback"),
        ]
        combinations.append((
            not self.train.backup_workers or self.train.sync == "bsp",
            f"--backup-workers {self.train.backup_workers} needs --sync bsp (got --sync {self.train.sync}): asp and"
            " ssp never wait for a slow worker"))
        for ok, message in combinations:
            if not ok:
                raise ConfigError(message)
        return self

    def server_optim(self) -> OptimConfig:
        """The optimizer settings the servers run: ``optim``, except that with --momentum-correction
        the momentum lives on the workers and the servers apply plain SGD (same lr, schedule,
        weight decay and clipping)."""
        if not self.compression.momentum_correction:
            return self.optim
        return dataclasses.replace(self.optim, optimizer="sgd")

    def _with_value(self, message: str) -> str:
        """``message``, plus the value given when it names one flag: "--lr must be positive (got -1)"."""
        flag = message.split()[0]
        fields = _fields()
        name = flag[2:].replace("-", "_")
        if not flag.startswith("--") or name not in fields or " / " in message:
            return message
        return f"{message} (got {getattr(getattr(self, fields[name][0]), name)!r})"

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


def _concerns() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _fields() -> dict[str, tuple[str, dataclasses.Field, Any]]:
    """Flat map: field name -> (concern, field, resolved type)."""
    out: dict[str, tuple[str, dataclasses.Field, Any]] = {}
    for concern, cls in _concerns().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.name not in out, f"duplicate config key {f.name}"
            out[f.name] = (concern, f, hints[f.name])
    return out


def _scalar_type(tp: Any) -> tuple[Any, tuple[str, ...] | None]:
    """(converter, choices) for a field type such as int, float | None or Literal[...]."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is Literal:
        return str, tuple(typing.get_args(tp))
    if args:  # Optional[X]
        return _scalar_type(args[0])
    return tp, None


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of printing its usage and exiting, so that the
    job reports a bad flag in one line, once (``mpips.errors``), like any other bad input."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        raise ConfigError(f"{message} (see python -m mpips.train --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m mpips.train",
        description="Train a PyTorch model with MPI parameter servers. Launch under mpirun or srun.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", help="TOML or YAML file with the same keys as the flags")
    groups = {name: parser.add_argument_group(name, cls.__doc__) for name, cls in _concerns().items()}
    defaults = Config()
    for name, (concern, f, tp) in _fields().items():
        flag = "--" + name.replace("_", "-")
        default = getattr(getattr(defaults, concern), name)
        conv, choices = _scalar_type(tp)
        if conv is bool:
            groups[concern].add_argument(
                flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                help=f"{f.metadata['help']} (default: {default})",
            )
        else:
            groups[concern].add_argument(
                flag, type=conv, choices=choices, default=argparse.SUPPRESS,
                help=f"{f.metadata['help']} (default: {default})",
                **({"nargs": "?", "const": f.metadata["const"]} if "const" in f.metadata else {}),
            )
    return parser


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML or YAML config file into a flat {field: value} dict (safe loaders only)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text) or {}
        else:
            raw = tomllib.loads(text)
    except Exception as exc:  # yaml and toml raise their own error types
        raise ConfigError(f"config file {path} is not valid {path.suffix[1:].upper()}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    flat: dict[str, Any] = {}
    concerns = _concerns()
    for key, value in raw.items():
        key = str(key).replace("-", "_")
        if key in concerns and isinstance(value, dict):
            flat.update({str(k).replace("-", "_"): v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def from_flat(values: dict[str, Any], base: Config | None = None) -> Config:
    """Apply a flat {field: value} dict onto a Config, checking names and types."""
    cfg = base if base is not None else Config()
    fields = _fields()
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown config key '{key}' (see python -m mpips.train --help)")
        concern, f, tp = fields[key]
        conv, choices = _scalar_type(tp)
        if value is not None:
            try:
                if conv is bool and not isinstance(value, bool):
                    raise ValueError
                if conv is float and isinstance(value, int):
                    value = float(value)
                if not isinstance(value, conv) or isinstance(value, bool) and conv is not bool:
                    raise ValueError
            except ValueError:
                raise ConfigError(
                    f"config key '{key}' must be {conv.__name__}, got {value!r}"
                ) from None
            if choices and value not in choices:
                raise ConfigError(f"config key '{key}' must be one of {', '.join(choices)}, got {value!r}")
        setattr(getattr(cfg, concern), key, value)
    return cfg


def parse_args(argv: list[str] | None = None) -> Config:
    """Parse CLI flags (and --config FILE) into a validated Config."""
    ns = vars(build_parser().parse_args(argv))
    cfg = Config()
    path = ns.pop("config", None)
    if path:
        cfg = from_flat(load_file(path), cfg)
    cfg = from_flat(ns, cfg)
    return cfg.validate()
