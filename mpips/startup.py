"""Start-up checks, once, before any step: does the model build, and does it fit the data?

The dataset checks itself when it is opened (``mpips.data.open_dataset``: checksums, finite
features, labels inside the class count, a plausible class count). Here, every server and
worker builds the model (``build_model``: a factory that cannot be imported, raises, or returns
something else than an ``nn.Module`` with float32, bfloat16 or float16 parameters is a
``ModelError``; so is a float16 model with ``--precision fp16``), and the lead worker feeds it
two samples of the dataset under ``torch.no_grad`` (``check_model``: it must accept them and
return logits the loss takes). ``mpips.errors.agree`` then makes every rank, data servers
included, raise the same ``ModelError`` or none.
"""

from __future__ import annotations

import torch
from torch import nn

from mpips.config import Config
from mpips.data import DatasetHandle
from mpips.models import ModelError, build_model, check_model
from mpips.tasks import LossFn

__all__ = ["checked_model", "pull_line"]


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
