"""Expected memory per parameter of each role, from the buffers the engine keeps. Pure.

``python -m mpips.train --dry-run`` prints these; ``python -m mpips.bench memory`` measures the
real peak resident memory of a run next to them.
"""

from __future__ import annotations

from mpips.optim import STATE_FACTOR

__all__ = ["expected_bytes_per_param"]

FLOAT = 4  # parameters, gradients and optimizer state are float32


def expected_bytes_per_param(
    role: str, optimizer: str, workers: int, max_inflight: int, sync: str = "bsp", weight_decay: float = 0.0,
    largest_tensor_fraction: float = 0.0, pull_codec: str = "fp32", lookahead: bool = False,
) -> dict[str, float]:
    """Bytes per parameter of a shard (server) or of the model (worker), by what holds them.

    Args:
        role: "server" (per element of its shard) or "worker" (per trainable parameter).
        optimizer: the optimizer's name (its state: ``STATE_FACTOR`` floats per element).
        workers: W, the number of workers (a server receives one push at a time into one buffer,
            plus a first chunk per worker: bounded by --chunk-bytes, left out here).
        max_inflight: pushes a worker keeps in flight per server (one send buffer each; bsp: 1).
        sync: "bsp" adds the server's accumulator of the step's mean gradient.
        weight_decay: non-zero adds torch.optim's temporary ``grad + wd * param``.
        largest_tensor_fraction: the largest parameter tensor's share of all parameters.
        pull_codec: "fp32" (the optimizer updates an exposed buffer in place) or "bf16"/"fp16"
            (a float32 master, and exposed buffers of 2 bytes per parameter).
        lookahead: asp/ssp pulls lead the servers' values (``--lookahead``): a float32 master,
            and its values before the last update.

    Returns:
        {buffer name: bytes per parameter}, plus "total". Activations and the batch are not in it.
    """
    if role == "server":
        # torch.optim's single-tensor SGD steps allocate: nesterov its look-ahead gradient,
        # weight decay grad + wd * param; Adam and AdamW run fused, in place (mpips.optim)
        temporaries = 1 if optimizer == "nesterov" else 0
        temporaries += weight_decay != 0 and optimizer not in ("adam", "adamw")
        parts = {
            "float32 master (bf16/fp16 pulls, --lookahead)": FLOAT if pull_codec != "fp32" or lookahead else 0,
            "values before the last update (--lookahead)": FLOAT if lookahead else 0,
            "two published versions (RMA windows)": 2 * (FLOAT if pull_codec == "fp32" else 2),
            f"{optimizer} state": STATE_FACTOR[optimizer] * FLOAT,
            "receive buffer (one push at a time)": FLOAT,
            "bsp accumulator": FLOAT if sync == "bsp" else 0,
            "optimizer step temporaries": temporaries * FLOAT,
        }
    elif role == "worker":
        parts = {
            "parameters": FLOAT,
            "gradient": FLOAT,
            "send buffers (--max-inflight; bsp: 1)": (1 if sync == "bsp" else max_inflight) * FLOAT,
            # autograd computes a tensor's gradient, then adds it into .grad (our flat buffer)
            "backward's gradient of the largest tensor": largest_tensor_fraction * FLOAT,
        }
    else:
        raise ValueError(f"no parameter memory model for role {role!r}")
    return {**parts, "total": sum(parts.values())}
