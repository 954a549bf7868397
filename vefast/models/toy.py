"""Models of the 2D toy example ([VE-supp] appendix C, docs/math.md §8): MLP tokenizer and velocity field.

The paper uses 8-layer ReLU MLPs, 512 wide, for the encoder, the decoder and the flow model, with
a 2D latent. ``depth`` here counts the Linear layers (``depth - 1`` hidden activations).
Choices the paper leaves open (documented in docs/toy.md):

- the encoder sees ``x / sigma_data`` (unit-scale input) and emits ``(mean, logvar)`` of a
  diagonal Gaussian posterior (docs/math.md §1 channel convention: first the means, then the logvars);
- the decoder emits ``sigma_data * MLP(z)``;
- the velocity field takes ``(z, t)`` with ``t`` given as ``t`` plus sinusoidal features
  ``sin(pi 2^k t), cos(pi 2^k t)``, ``k < time_features / 2`` (0 features: ``t`` alone).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..ops._common import check_int

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}


def mlp(in_dim: int, out_dim: int, width: int, depth: int, act: str = "relu") -> nn.Sequential:
    """``depth`` Linear layers ``in -> width -> ... -> width -> out`` with ``act`` between them."""
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
    check_int("depth (Linear layers)", depth, min_value=2)
    check_int("width", width, min_value=1)
    dims = [in_dim] + [width] * (depth - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < depth - 1:
            layers.append(ACTIVATIONS[act]())
    return nn.Sequential(*layers)


class ToyTokenizer(nn.Module):
    """Encoder ``x (N, 2) -> (mean, logvar)`` (each (N, latent_dim)) and decoder ``z -> x_hat``."""

    def __init__(self, width: int = 512, depth: int = 8, act: str = "relu", latent_dim: int = 2,
                 data_dim: int = 2, sigma_data: float = 0.5) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.sigma_data = sigma_data
        self.encoder = mlp(data_dim, 2 * latent_dim, width, depth, act)
        self.decoder = mlp(latent_dim, data_dim, width, depth, act)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior moments: ``mean, logvar = split(E(x / sigma_data))``."""
        moments = self.encoder(x / self.sigma_data)
        return moments[:, : self.latent_dim], moments[:, self.latent_dim:]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.sigma_data * self.decoder(z)


class ToyVelocity(nn.Module):
    """Velocity field ``v(z_t, t)`` of the linear flow-matching path (MLP on ``[z, time features]``)."""

    def __init__(self, width: int = 512, depth: int = 8, act: str = "relu", latent_dim: int = 2,
                 time_features: int = 16) -> None:
        super().__init__()
        check_int("time_features", time_features, min_value=0)
        if time_features % 2:
            raise ValueError(f"time_features must be an even int >= 0, got {time_features!r}")
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(time_features // 2, dtype=torch.float32),
                             persistent=False)
        self.net = mlp(latent_dim + 1 + time_features, latent_dim, width, depth, act)

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """``[t, sin(pi 2^k t), cos(pi 2^k t)]`` for a batch of times ``t`` (N,)."""
        angles = t[:, None] * self.freqs
        return torch.cat((t[:, None], angles.sin(), angles.cos()), dim=1)

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat((z, self.time_embedding(t.to(z.dtype))), dim=1))
