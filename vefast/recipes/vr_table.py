"""``vefast vr-table``: estimate the separation function ([VR] eq. 3.3) on latents or Gaussian data,
build the VR-sampling timestep table, fit the logit-normal m, report the mass per quarter of [0, 1]
(warning where a region is starved), optionally plot ([VR] fig. 1).

    vefast vr-table --gaussian 4,32,32 --path linear --out table.json --plot density.png
    vefast vr-table --data latents.npy --num-data 200 --num-noise 500 --num-t 1000 --out table.json
    vefast vr-table --data latents.safetensors --mix-uniform 0.1     # a uniform floor of 10 %

S is estimated on a 128-point adaptive log-SNR grid and interpolated (PCHIP) to every timestep;
``--exact`` estimates it at every timestep's SNR instead (docs/vr_sampling.md).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

STARVED_MASS = 0.01  # a quarter of [0, 1] with less probability than this is reported as starved


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="latents as .npy, .pt or .safetensors, shape (N, ...)")
    src.add_argument("--gaussian", metavar="C,H,W", help="use N(0, I) data of this shape instead")
    parser.add_argument("--path", default="linear", choices=("linear", "cosine", "vp"))
    parser.add_argument("--num-data", type=int, default=200, help="M, data rows (a random subset of --data)")
    parser.add_argument("--num-noise", type=int, default=500, help="K, noise rows shared by every timestep")
    parser.add_argument("--num-t", type=int, default=1000, help="timestep knots on [0, t_max]")
    parser.add_argument("--t-max", type=float, default=1 - 1e-3, help="density held constant on [t_max, 1]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--out", type=Path, default=Path("vr_table.json"), help="JSON table to write")
    parser.add_argument("--plot", type=Path, default=None, help="PNG with S(t), h_t^2 (1 - S) and the density")
    parser.add_argument("--snr-points", type=int, default=128,
                        help="estimate S on this many log-SNR values and interpolate (PCHIP) to every timestep")
    parser.add_argument("--exact", action="store_true", help="estimate S at every timestep's SNR (one r per t)")
    parser.add_argument("--leave-one-out", action="store_true",
                        help="leave-one-out estimator (softmax over j != i) instead of the paper's eq. 3.3")
    parser.add_argument("--mix-uniform", type=float, default=0.0, metavar="W",
                        help="uniform floor: density (1 - W) pi_VR + W (W in [0, 1])")
    parser.add_argument("--starved-mass", type=float, default=STARVED_MASS,
                        help="warn when a quarter of [0, 1] gets less probability than this")


def load_latents(file: Path) -> torch.Tensor:
    """A (N, ...) float tensor from .npy / .pt / .safetensors (a tensor, or a mapping with one tensor
    or a ``latents`` entry). No pickle: ``np.load(allow_pickle=False)``, ``torch.load(weights_only=True)``."""
    suffix = file.suffix.lower()
    if suffix == ".npy":
        import numpy as np

        obj = torch.from_numpy(np.load(file, allow_pickle=False))
    elif suffix == ".pt":
        obj = torch.load(file, map_location="cpu", weights_only=True)
    elif suffix == ".safetensors":
        from safetensors.torch import load_file

        obj = load_file(str(file))
    else:
        raise ValueError(f"--data must end in .npy, .pt or .safetensors, got {file.name}")
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if "latents" in tensors:
            obj = tensors["latents"]
        elif len(tensors) == 1:
            obj = next(iter(tensors.values()))
        else:
            raise ValueError(f"{file}: expected one tensor or a 'latents' entry, found {sorted(tensors)}")
    if not isinstance(obj, torch.Tensor) or not obj.is_floating_point() or obj.dim() < 2:
        raise ValueError(f"{file}: expected a floating (N, ...) tensor")
    return obj


def mass_report(sampler, *, starved_mass: float = STARVED_MASS) -> tuple[str, list[str]]:
    """(one line with the mass of each quarter of [0, 1], warnings for the starved quarters): a quarter
    with less than ``starved_mass`` of the probability is a region training would hardly ever see."""
    q = sampler.quarter_mass()
    line = "mass per quarter of t in [0, 1] (uniform: 0.25 each): " + ", ".join(
        f"[{i / 4:.2f}, {(i + 1) / 4:.2f}] {v:.4f}" for i, v in enumerate(q))
    warnings = []
    for i, v in enumerate(q):
        if v < starved_mass:
            warnings.append(
                f"warning: t in [{i / 4:.2f}, {(i + 1) / 4:.2f}] gets {100 * v:.3g}% of the timesteps (< "
                f"{100 * starved_mass:g}%): training would hardly ever see it (t = 1 is data). A Monte Carlo S "
                "with few rows in many dimensions collapses (docs/vr_sampling.md); consider a uniform floor "
                "(--mix-uniform 0.1, transport.vr_mix_uniform in train-dit) or a logit-normal sampler.")
    return line, warnings


def _plot(sampler, m: float, s: float, file: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..sampling import LogitNormalSampler

    t = sampler.t[:-1].numpy()
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    ax[0].plot(t, sampler.S[:-1].numpy())
    ax[0].set(title="separation S(r_t)", xlabel="t (1 = data)", ylim=(-0.02, 1.02))
    ax[1].plot(t, sampler.v[:-1].numpy())
    ax[1].set(title="h_t^2 (1 - S)", xlabel="t (1 = data)", yscale="log")
    ax[2].plot(t, sampler.density[:-1].numpy(), label="VR density" + (
        f" + {sampler.mix_uniform:g} uniform" if sampler.mix_uniform else ""))
    tt = torch.linspace(1e-3, 1 - 1e-3, 999, dtype=torch.float64)
    ax[2].plot(tt.numpy(), LogitNormalSampler(m, s).pdf(tt).numpy(), "--", label=f"logit-normal({m:g}, {s:g})")
    ax[2].set(title="density pi(t)", xlabel="t (1 = data)")
    ax[2].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    from ..sampling import VRTimestepSampler

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gen = torch.Generator().manual_seed(args.seed)
    if args.gaussian is not None:
        try:
            shape = tuple(int(v) for v in args.gaussian.split(","))
        except ValueError:
            raise SystemExit(f"--gaussian must be C,H,W integers, got {args.gaussian!r}") from None
        x1 = torch.randn(args.num_data, *shape, generator=gen)
        source = f"N(0, I) {args.gaussian}"
    else:
        data = load_latents(args.data)
        n = min(args.num_data, data.shape[0])
        x1 = data[torch.randperm(data.shape[0], generator=gen)[:n]].float()
        source = f"{args.data.name} ({n} of {data.shape[0]} rows)"
    start = time.perf_counter()
    sampler = VRTimestepSampler.from_data(x1.to(device), args.path, num_noise=args.num_noise, num_t=args.num_t,
                                          t_max=args.t_max, generator=gen, progress=True,
                                          snr_points=None if args.exact else args.snr_points,
                                          leave_one_out=args.leave_one_out, mix_uniform=args.mix_uniform)
    elapsed = time.perf_counter() - start
    sampler.meta["seed"] = args.seed
    sampler.save(args.out)
    m, ks = sampler.fit_logit_normal(return_ks=True)
    grid = sampler.meta["snr_points"]
    estimator = "leave-one-out (j != i)" if args.leave_one_out else "paper (eq. 3.3, j = i included)"
    print(f"data: {source}; path: {args.path}; M={sampler.meta['M']} K={sampler.meta['K']} d={sampler.meta['d']}; "
          f"estimator: {estimator}; S at {'every timestep' if grid == 'exact' else f'{grid} log-SNR values'}; "
          f"{args.num_t} timesteps on {device} in {elapsed:.1f} s")
    print(f"density peaks at t = {sampler.peak:.4f} (t = 1 is data; t = 1 noise codebases: {1 - sampler.peak:.4f})"
          + (f"; uniform floor {sampler.mix_uniform:g}" if sampler.mix_uniform else ""))
    print(f"fitted logit-normal: m = {m:g}, s = 1 (KS = {ks:.4f}); for t = 1 noise codebases use m' = {-m:g}")
    line, warnings = mass_report(sampler, starved_mass=args.starved_mass)
    print(line)
    for w in warnings:
        print(w, file=sys.stderr)
    print(f"table written to {args.out}")
    if args.plot is not None:
        _plot(sampler, m, 1.0, args.plot, f"VR-sampling, {args.path} path, {source}")
        print(f"plot written to {args.plot}")
    return 0
