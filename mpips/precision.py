"""Mixed precision on workers: ``--precision fp32|bf16|fp16``, and the dtypes of a model's parameters.

- ``fp32``: no autocast; the model computes in its parameters' dtype.
- ``bf16``: forward and loss under ``torch.autocast(device_type, dtype=torch.bfloat16)``, on CUDA
  and on CPU alike. bf16 has float32's exponent range, so no loss scaling.
- ``fp16``: autocast to float16 and a dynamic loss scaler, ``torch.amp.GradScaler`` (scale
  2**16 at first, halved on every step whose gradients overflow, doubled after 2000 clean
  steps). The worker has no optimizer, so the scaler is given a stand-in one over the same
  parameters (``torch.optim.SGD`` with lr 0, never stepped) only so that ``unscale_`` can find
  the gradients; ``update()`` then adjusts the scale.

A step whose unscaled gradient is not finite is skipped, as ``GradScaler.step`` skips
``optimizer.step``: the worker pushes a zero gradient claiming 0 samples (never the NaN/Inf it
got). Servers leave a 0-sample gradient out of the step: in bsp the step's mean is over the
other workers' samples (every worker skipping: the clock advances, nothing changes), in asp/ssp
the push only advances the worker's clock. A skipped step is not a dropped gradient
(``--max-bad-grads`` counts those).

Parameters may be float32, bfloat16 or float16, all trainable ones of one dtype. Servers keep a
float32 master copy and the optimizer state (the shard they receive is widened), workers hold
the model in its own dtype; gradients travel as float32. A float16 model with ``--precision
fp16`` is refused: ``GradScaler`` will not unscale float16 gradients (precision is lost there).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

__all__ = ["PARAM_DTYPES", "PRECISIONS", "Precision", "param_dtype"]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def param_dtype(params: Sequence[torch.Tensor]) -> torch.dtype:
    """The one dtype of ``params`` (float32, bfloat16 or float16).

    Raises:
        ValueError: for another dtype, or a mix; the message lists what was found.
    """
    found = sorted({str(p.dtype).removeprefix("torch.") for p in params})
    dtypes = {p.dtype for p in params}
    if len(dtypes) != 1 or next(iter(dtypes)) not in PARAM_DTYPES:
        raise ValueError(f"trainable parameters must all be float32, bfloat16 or float16, and of one dtype;"
                         f" found {', '.join(found)}")
    return dtypes.pop()


class Precision:
    """One worker's forward/backward under ``--precision``.

    Args:
        mode: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        device: where the model computes.
        dtype: the model's parameter dtype (inputs of floating point are cast to it).
        params: the trainable parameters (fp16: the scaler's stand-in optimizer holds them).

    Raises:
        ValueError: for an unknown mode, or fp16 loss scaling of a float16 model.
    """

    def __init__(self, mode: str, device: torch.device, dtype: torch.dtype, params: Sequence[nn.Parameter] = ()):
        if mode not in PRECISIONS:
            raise ValueError(f"--precision must be fp32, bf16 or fp16, got {mode!r}")
        if mode == "fp16" and dtype == torch.float16:
            raise ValueError("--precision fp16 with a float16 model: torch.amp.GradScaler does not unscale"
                             " float16 gradients; use a float32 model with --precision fp16, or --precision bf16")
        self.mode, self.device, self.dtype = mode, device, dtype
        self.autocast = PRECISIONS[mode]
        self.scaler = torch.amp.GradScaler(device.type) if mode == "fp16" else None
        self._proxy = torch.optim.SGD(list(params), lr=0.0) if self.scaler is not None else None

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """Autocast to the mode's dtype on this device (nothing for fp32)."""
        if self.autocast is None:
            yield
        else:
            with torch.autocast(self.device.type, dtype=self.autocast):
                yield

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """A batch moved to the device; floating point features in the model's dtype."""
        x = x.to(self.device, non_blocking=True)
        return x.to(self.dtype) if x.is_floating_point() and x.dtype != self.dtype else x

    def forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``model``'s output for the batch ``x`` under autocast, floating point outputs in float32
        (the job's loss and metrics then run in float32, as autocast runs its losses)."""
        with self.context():
            out = model(self.inputs(x))
        return out.float() if out.is_floating_point() else out

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, scaled under fp16."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self) -> None:
        """fp16: divide the gradients by the loss scale (in place) and update the scale."""
        if self.scaler is not None:
            self.scaler.unscale_(self._proxy)
            self.scaler.update()

    def state_dict(self) -> dict[str, float]:
        """fp16: the loss scaler's state that changes as it runs, ``scale`` and ``growth_tracker``
        (clean steps since the scale last changed); empty without a scaler. A resumed run that lost
        them would restart at 2**16 and skip again the steps that overflow there."""
        if self.scaler is None:
            return {}
        state = self.scaler.state_dict()
        return {"scale": float(state["scale"]), "growth_tracker": float(state["_growth_tracker"])}

    def load_state_dict(self, state: dict[str, float] | None) -> None:
        """Restore what ``state_dict`` returned; None or empty (no scaler, an older checkpoint):
        the scaler starts afresh."""
        if self.scaler is not None and state:
            full = self.scaler.state_dict()
            full.update(scale=float(state["scale"]), _growth_tracker=int(state["growth_tracker"]))
            self.scaler.load_state_dict(full)

    @property
    def scale(self) -> float:
        """The current loss scale (1.0 without one)."""
        return float(self.scaler.get_scale()) if self.scaler is not None else 1.0
