"""A GAN: two models and two optimizers, both on the parameter servers.

    mpirun -n 4 python examples/gan.py                  # 2 servers, 2 workers
    mpirun -n 4 python examples/gan.py --steps 600

The generator maps noise to points in the plane; the real data is a ring of eight Gaussians.
Each step updates the discriminator (its own optimizer), then the generator (another), each
registered with ``job.optimizer`` in the same order on every worker. The model classes live in
this script only: the servers never import them. Worker 0 prints both losses over the first
and the last 50 steps, and how far the generated points are from the ring before and after.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

import mpips


class Generator(nn.Module):
    def __init__(self, noise: int = 8):
        super().__init__()
        self.noise = noise
        self.net = nn.Sequential(nn.Linear(noise, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Discriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 64), nn.LeakyReLU(0.2), nn.Linear(64, 64), nn.LeakyReLU(0.2),
                                 nn.Linear(64, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


def ring(n: int, g: torch.Generator) -> torch.Tensor:
    """Points from eight Gaussians (std 0.05) on the unit circle."""
    angle = torch.randint(0, 8, (n,), generator=g).float() * (2 * math.pi / 8)
    return torch.stack([angle.cos(), angle.sin()], 1) + 0.05 * torch.randn(n, 2, generator=g)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()

    job = mpips.init(servers=2, data_servers=0, sync="bsp")
    if not job.is_worker:
        job.serve()
        return
    torch.manual_seed(0)
    gen, disc = Generator(), Discriminator()
    opt_d = job.optimizer(disc, torch.optim.Adam, lr=1e-3, betas=(0.5, 0.999))
    opt_g = job.optimizer(gen, torch.optim.Adam, lr=1e-3, betas=(0.5, 0.999))
    bce = nn.functional.binary_cross_entropy_with_logits
    g = torch.Generator().manual_seed(100 + job.worker_index)
    probe = torch.randn(1000, gen.noise, generator=torch.Generator().manual_seed(7))

    def off_ring() -> float:
        """Mean distance of generated points from the unit circle."""
        with torch.no_grad():
            return (gen(probe).norm(dim=1) - 1).abs().mean().item()

    before = off_ring()
    losses = []
    for _ in range(args.steps):
        real = ring(args.batch, g)
        fake = gen(torch.randn(args.batch, gen.noise, generator=g))
        opt_d.zero_grad()
        d_loss = bce(disc(real), torch.ones(args.batch)) + bce(disc(fake.detach()), torch.zeros(args.batch))
        d_loss.backward()
        opt_d.step()
        opt_g.zero_grad()
        g_loss = bce(disc(fake), torch.ones(args.batch))
        g_loss.backward()  # reaches the discriminator's gradients too: opt_d.zero_grad clears them next step
        opt_g.step()
        losses.append((d_loss.item(), g_loss.item()))
    job.finish()
    if job.worker_index == 0:
        first = [sum(v) / 50 for v in zip(*losses[:50], strict=True)]
        last = [sum(v) / 50 for v in zip(*losses[-50:], strict=True)]
        print(f"gan: discriminator loss {first[0]:.4f} -> {last[0]:.4f}, generator loss {first[1]:.4f} ->"
              f" {last[1]:.4f}; generated points {before:.4f} -> {off_ring():.4f} from the ring on average",
              flush=True)


if __name__ == "__main__":
    main()
