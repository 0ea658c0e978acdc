"""Start-up, once, before any step: does the model build and fit the data, and what the job says.

The dataset checks itself when it is opened (``mpips.data.open_dataset``: checksums, finite
features, labels inside the class count, a plausible class count). Here, every worker builds
the model (``build_model``: a factory that cannot be imported, raises, or returns something
else than an ``nn.Module`` with float32, bfloat16 or float16 parameters is a ``ModelError``; so
is a float16 model with ``--precision fp16``), and the lead worker feeds it two samples of the
dataset under ``torch.no_grad`` (``check_model``: it must accept them and return logits the loss
takes). ``mpips.errors.agree`` then makes every rank, servers and data servers included, raise
the same ``ModelError`` or none. Servers never build it: they take the shard plan and their
initial values from the lead worker.

The rest: what a job decides at start-up (how to pull, its steps, each worker's device, each
server's initial values) and the lines rank 0 prints about it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from mpips.chunking import chunk_count
from mpips.config import CompressionConfig, Config, ConfigError, OptimConfig, TrainConfig
from mpips.cuda_aware import CudaSupport, library_lookup, query
from mpips.data import DatasetHandle, EpochPlan
from mpips.delay import lookahead_lead
from mpips.doctor import find_loaded_libmpi
from mpips.memory import expected_bytes_per_param
from mpips.models import ModelError, build_model, check_model
from mpips.shard import FLOAT_BYTES, ShardPlan
from mpips.tasks import LossFn
from mpips.text import plural
from mpips.transport import HEADER_BYTES

__all__ = ["checked_model", "choose_pull", "cuda_support", "describe_chunks", "describe_codecs", "describe_pipeline",
           "memory_line", "precision_words", "prepare_outputs", "pull_line", "shard_values", "total_steps",
           "worker_device"]


def checked_model(cfg: Config, data: DatasetHandle, builds: bool, checks: bool, model: object = None,
                  loss: LossFn | None = None) -> nn.Module | None:
    """The model, built from ``cfg.train.seed``; None where ``builds`` is False (a data server).

    Args:
        cfg: the job's configuration.
        data: the opened dataset.
        builds: whether this rank needs the model (servers and workers).
        checks: whether this rank runs the forward check (one rank is enough: the lead worker).
        model: an ``nn.Module`` or a factory given to ``mpips.fit`` instead of ``--model``.
        loss: the job's loss, run on the check's output.

    Raises:
        ModelError: naming the model, the samples and what is wrong.
    """
    if not builds:
        return None
    built = build_model(cfg.model, data.spec, cfg.train.seed, model)
    name = cfg.model.model if model is None else getattr(model, "__name__", type(model).__name__)
    dtype = next(p.dtype for p in built.parameters() if p.requires_grad)
    if cfg.train.precision == "fp16" and dtype == torch.float16:
        raise ModelError(f"--model {name!r} has float16 parameters: --precision fp16's loss scaler"
                         " (torch.amp.GradScaler) does not unscale float16 gradients; use --precision fp32 or bf16"
                         " with this model, or a float32 model with --precision fp16")
    if checks:
        x, y = data.sample(2)
        check_model(built, torch.from_numpy(x), torch.from_numpy(y), data.spec, name, data.path or data.name, loss)
    return built


def pull_line(requested: str, chosen: str, used: str) -> str:
    """The start-up line that says how workers pull, printed once the windows have decided it.

    Args:
        requested: ``--pull`` (auto, rma or message).
        chosen: what ``auto`` picked for this MPI library (rma or message).
        used: what the workers use: message where the windows could not be created.
    """
    if used == "rma":
        return "pulls: one-sided MPI_Get from the servers' windows (rma)"
    if chosen == "rma":
        why = "no RMA windows on this MPI transport"
    elif requested == "message":
        why = "--pull message"
    else:
        why = "--pull auto: this MPI library makes no one-sided progress while a server computes"
    return f"pulls: request/reply messages that the servers answer (message; {why})"


def prepare_outputs(cfg: Config) -> None:
    """Before any work: the folders of ``--metrics``, ``--trace`` and ``--save`` exist (made here
    when missing) and can be written, so that no run fails at its end for want of one.

    Raises:
        ConfigError: naming the flag and the folder that cannot be made or written.
    """
    for flag, path in (("--metrics", cfg.train.metrics), ("--trace", cfg.train.trace), ("--save", cfg.train.save)):
        if not path:
            continue
        folder = Path(path).expanduser().resolve().parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{flag} {path}: cannot make the folder {folder} ({exc.strerror})") from None
        if not os.access(folder, os.W_OK):
            raise ConfigError(f"{flag} {path}: the folder {folder} is not writable")


def choose_pull(mode: str) -> str:
    """rma where the MPI library makes passive-target progress on its own, else messages."""
    if mode != "auto":
        return mode
    if "Open MPI" in MPI.Get_library_version() or os.environ.get("MPIR_CVAR_ASYNC_PROGRESS") == "1":
        return "rma"
    return "message"


def describe_chunks(plan: ShardPlan, chunk_bytes: int) -> str:
    """How the largest shard travels, for --dry-run and the start-up lines."""
    largest = max(plan.shard_numel(s) for s in range(plan.servers)) * FLOAT_BYTES
    count = chunk_count(HEADER_BYTES + largest, chunk_bytes)
    return (f"transfers: at most {chunk_bytes:,} bytes per MPI call (--chunk-bytes); the largest shard"
            f" ({largest / 2**20:,.2f} MiB) moves in {count:,} chunk{'s' if count > 1 else ''} per pull and per push")


def describe_codecs(c: CompressionConfig, optim: OptimConfig | None = None) -> str:
    """What pushes and pulls carry (--compress, --pull-codec, the DGC options), for the start-up lines."""
    if c.compress == "none":
        push = "float32 (--compress none)"
    else:
        ratio = f" {c.compress_ratio:g} of each chunk" if c.compress in ("topk", "randomk") else ""
        levels = f" {c.qsgd_levels} levels" if c.compress == "qsgd" else ""
        push = f"{c.compress}{ratio}{levels}, error feedback {'on' if c.feedback() else 'off'}"
        if c.sparsity_warmup:
            push += f", sparsity warm-up over {plural(c.sparsity_warmup, 'step')}"
        momentum, nesterov = c.worker_momentum(optim) if optim is not None else (None, False)
        if momentum is not None:
            push += (f", momentum correction ({'nesterov ' if nesterov else ''}momentum {momentum:g} on the"
                     " workers, plain SGD on the servers)")
    pull = "float32" if c.pull_codec == "fp32" else f"{c.pull_codec} (float32 on the servers)"
    return f"codecs: pushes {push}; pulls {pull}"


def describe_pipeline(t: TrainConfig) -> str:
    """Which overlaps of the engine are on (--push-during-backward, --pull-ahead), for the start-up lines."""
    if t.sync != "bsp":
        return (f"pipeline: none in {t.sync} (pushes after backward, whole versions; --push-during-backward and"
                " --pull-ahead are bsp's)")
    if t.backup_workers:
        return (f"pipeline: none with --backup-workers {t.backup_workers} (pushes after backward, whole versions:"
                " a step takes the first pushes to arrive)")
    on = {True: "on", False: "off"}
    return (f"pipeline: push during backward {on[t.push_during_backward]}, per-bucket apply and pull ahead"
            f" {on[t.pull_ahead]} (CPU workers; pull ahead over RMA windows)")


def total_steps(cfg: Config, plan: EpochPlan) -> int:
    return cfg.train.steps or max(1, math.ceil(cfg.train.epochs * plan.steps_per_epoch))


def memory_line(cfg: Config, plan: ShardPlan, workers: int) -> str:
    """Expected memory of each role (``mpips.memory``), for the start-up lines and --dry-run."""
    largest = max((t.numel for t in plan.tensors), default=0) / max(1, plan.numel)
    per = {role: expected_bytes_per_param(role, cfg.server_optim().optimizer, workers, cfg.train.max_inflight,
                                          cfg.train.sync, cfg.optim.weight_decay, largest,
                                          cfg.compression.pull_codec,
                                          lookahead_lead(cfg.optim.lookahead, cfg.train.sync, workers) > 0)["total"]
           for role in ("server", "worker")}
    shard = max(plan.shard_numel(s) for s in range(plan.servers))
    return (f"memory (expected, above a bare process): server {per['server']:.3g} bytes per parameter of its"
            f" shard ({per['server'] * shard / 2**20:.1f} MiB for the largest), worker {per['worker']:.3g}"
            f" bytes per parameter ({per['worker'] * plan.numel / 2**20:.1f} MiB) + activations")


def shard_values(model: torch.nn.Module, plan: ShardPlan, server: int) -> np.ndarray:
    """float32 [shard elements]: server ``server``'s slice of the model's trainable parameters (the
    float32 master of a bf16/fp16 model)."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    out = np.empty(plan.shard_numel(server), dtype=np.float32)
    for run in plan.server_pieces(server):
        values = params[run.tensor].detach().reshape(-1)[run.tensor_offset : run.tensor_offset + run.length]
        out[run.server_offset : run.server_offset + run.length] = values.float().cpu().numpy()  # bf16/fp16: widened
    return out


def cuda_support() -> CudaSupport:
    """What this process's MPI library says about device buffers (``mpips.cuda_aware.query``)."""
    libmpi = find_loaded_libmpi(Path("/proc/self/maps").read_text())
    return query(library_lookup(libmpi), MPI.Get_library_version().splitlines()[0], os.environ)


def precision_words(mode: str) -> str:
    return {"fp32": "no autocast", "bf16": "torch.autocast to bfloat16",
            "fp16": "torch.autocast to float16, torch.amp.GradScaler loss scaling"}[mode]


def worker_device(name: str, local_rank: int) -> torch.device:
    """The worker's device: with cuda, one GPU per rank of a node, round-robin.

    Several workers on one GPU (more worker ranks on a node than GPUs) share it: each has its
    own CUDA context and streams; the kernels of the others interleave with its own.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device cuda, but torch {torch.__version__} sees no CUDA device on"
                              f" {MPI.Get_processor_name()} (torch.cuda.is_available() is False)")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")
