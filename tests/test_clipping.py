"""One definition of ``--clip-grad-norm`` in every sync mode and with every codec, checked against
torch: the servers clip the gradient they apply, as ``torch.nn.utils.clip_grad_norm_(params, C)``
does before ``optimizer.step()``. Its norm is over the whole model and is that of what the servers
decode: in bsp the step's mean of the workers' decoded pushes, in asp/ssp each worker's decoded
push (without compression, the gradient itself).

1 worker and 1 server, so a torch loop over the same samples is the reference: the flat gradient
goes chunk by chunk through the same encoder (error feedback included) and codec with the same
seeds, is decoded, clipped and stepped. ssp with ``--staleness 0`` runs the asp/ssp server path
(the norm from the push's trailer) in a repeatable order.
"""

from __future__ import annotations

import pytest
import torch
from helpers import run_train

from mpips.compression import chunk_ranges, chunk_seed, make_codec, make_encoder, parse_chunk
from mpips.config import parse_args
from mpips.data import open_dataset
from mpips.models import build_model, loss_and_correct
from mpips.optim import build_optimizer

CLIP, STEPS, SEED, CHUNK = 0.3, 12, 5, 40000


def reference(flags: list[str], decoded_norm: bool = True) -> dict[str, torch.Tensor]:
    """Plain torch on the run's samples, the gradient encoded and decoded as the worker's pushes are,
    then clipped by its own norm (``decoded_norm=False``: by the norm before compression)."""
    cfg = parse_args(flags)
    data = open_dataset("digits", None)
    plan = data.plan(1, cfg.data.batch_size, SEED)
    model = build_model(cfg.model, data.spec, SEED)
    params = list(model.parameters())
    opt = build_optimizer(params, cfg.server_optim())
    numel = sum(p.numel() for p in params)
    c = cfg.compression
    enc = make_encoder(make_codec(c.compress, c.compress_ratio, c.qsgd_levels, c.feedback(), c.sparsity_warmup),
                       numel, c.feedback(), *c.worker_momentum(cfg.optim))
    ranges = chunk_ranges(numel, CHUNK)
    clipped = 0
    for step in range(STEPS):
        x, y = data.train.take(plan.global_ids(*plan.position(step)))
        loss, _ = loss_and_correct(model(torch.from_numpy(x)), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        g = torch.cat([p.grad.reshape(-1) for p in params])
        true_norm = float(g.double().norm())
        enc.begin_step(step)
        seeds = [chunk_seed(SEED, step, 0, 0, i) for i in range(len(ranges))]
        sent = torch.cat([parse_chunk(enc.codec, enc.encode(g[a:b], seed, a), b - a, seed)[0].dense()
                          for (a, b), seed in zip(ranges, seeds, strict=True)])
        at = 0
        for p in params:
            p.grad.copy_(sent[at : at + p.numel()].view_as(p))
            at += p.numel()
        if decoded_norm:
            clipped += float(torch.nn.utils.clip_grad_norm_(params, CLIP)) > CLIP
        else:
            coef = CLIP / (true_norm + 1e-6)
            if coef < 1:
                for p in params:
                    p.grad.mul_(coef)
        opt.step()
    assert not decoded_norm or clipped >= STEPS // 2  # the check is about clipping: most steps clip
    return model.state_dict()


@pytest.mark.parametrize("sync", [["--sync", "bsp"], ["--sync", "ssp", "--staleness", "0"]], ids=["bsp", "ssp"])
@pytest.mark.parametrize("codec", [["--compress", "topk", "--compress-ratio", "0.05"],
                                   ["--compress", "qsgd", "--qsgd-levels", "4"]], ids=["topk-ef", "qsgd"])
def test_clipping_is_torchs_on_the_decoded_gradient(sync, codec, tmp_path):
    flags = ["--servers", "1", "--data-servers", "0", "--batch-size", "16", "--steps", str(STEPS), "--seed",
             str(SEED), "--optimizer", "sgd", "--lr", "0.1", "--chunk-bytes", str(CHUNK), "--clip-grad-norm",
             str(CLIP), "--stall-timeout", "20", "--log-every", "100", *sync, *codec]
    run_train(2, *flags, "--save", str(tmp_path / "final.pt"), timeout=120, check=True)
    got, want = torch.load(tmp_path / "final.pt", weights_only=True), reference(flags)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=2e-4, atol=2e-5, msg=f"parameter {k}")
    # and the other definition (the norm before compression) is told apart at this tolerance
    other = reference(flags, decoded_norm=False)
    assert any(not torch.allclose(got[k], other[k], rtol=2e-4, atol=2e-5) for k in want)
