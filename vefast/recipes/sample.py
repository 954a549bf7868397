"""``vefast sample``: class-conditional samples of a ``train-dit`` run at paper scale, in ADM's npz format.

    vefast sample --run RUN --num 16 --out preview.npz --grid preview.png
    torchrun --nproc_per_node=8 -m vefast.cli sample RUN --num-images 50000 --out samples.npz \\
        --sampler euler --steps 250 --cfg-scale 1.5 --cfg-interval 0.11,1
    vefast fid --samples samples.npz --ref VIRTUAL_imagenet256_labeled.npz --inception-weights FILE

(Under torchrun the run directory goes first, as a positional argument, and the count is
``--num-images``: torchrun's own parser takes ``--run`` and ``--num`` for abbreviations of its
``--run-path`` and ``--numa-binding`` and stops.) Writes ``samples.npz`` with ``arr_0`` (N, H, W, 3) uint8 images and ``arr_1`` (N,) int64 labels (ADM's
``image_sample.py`` layout, what its evaluator reads) and ``samples.json`` (the settings).

Reproducible whatever the number of ranks: image i's noise and (with ``--labels random``) its label are
drawn on the CPU from ``derive_seed(seed, i, ...)``, and images are made in chunks of ``--batch-size``
consecutive indices (rank r of W makes chunks r, r + W, ...), so 1 GPU and 8 write the same file
(bitwise on the same hardware and batch size). Finished chunks are kept in ``OUT.parts/`` until rank 0
has merged them, so an interrupted run continues where it stopped (same settings, any rank count).

The model is the run's EMA (``--no-ema``: the trained weights), integrated by :func:`vefast.recipes.dit.sample_ode`
(Euler or Heun from t = 0 to ``t_end``, classifier-free guidance only for t in the guidance interval),
decoded by the run's tokenizer after undoing the latent normalization. Defaults come from the run's
``sample`` config.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError
from .distributed import ends_process_group


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .progress import add_progress_arguments

    parser.add_argument("run_dir", nargs="?", default=None, metavar="RUN",
                        help="train-dit run directory (its latest checkpoint) or a checkpoint directory")
    parser.add_argument("--run", default=None, help="the same as RUN (not under torchrun, whose parser takes "
                        "--run for its --run-path: write RUN first there)")
    parser.add_argument("--num-images", "--num", dest="num", type=int, required=True,
                        help="number of images (50000 for the papers' FID); write --num-images under torchrun")
    parser.add_argument("--out", required=True, help="output .npz (ADM's format: uint8 NHWC arr_0, labels arr_1)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass and per chunk (per rank)")
    parser.add_argument("--sampler", choices=("euler", "heun"), default=None, help="default: the run's sample.sampler")
    parser.add_argument("--steps", type=int, default=None, help="ODE steps (default: the run's sample.steps)")
    parser.add_argument("--cfg-scale", type=float, default=None, help="guidance scale (1 = none; default: the run's)")
    parser.add_argument("--cfg-interval", default=None, metavar="LO,HI", help="guide only for t in [LO, HI] (t = 1 data)")
    parser.add_argument("--t-end", type=float, default=None, help="integrate up to this t (default: 1, vp: 1 - 1e-3)")
    parser.add_argument("--labels", choices=("random", "balanced"), default="random",
                        help="random: uniform labels drawn per image; balanced: label = i mod num_classes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-ema", action="store_true", help="sample the trained weights instead of the EMA")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default=None, help="default: the run's train.precision")
    parser.add_argument("--latents", default=None, help="the run's latent directory (for its info.json; default: recorded in the checkpoint)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer run to decode with (default: the run's)")
    parser.add_argument("--no-fused", action="store_true", help="reference modules instead of vefast's fused ones")
    parser.add_argument("--grid", default=None, metavar="PNG", help="also save the first 64 images as a grid")
    parser.add_argument("--keep-parts", action="store_true", help="keep OUT.parts/ after merging")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    add_progress_arguments(parser)


USER_ERRORS = (ValueError, FileNotFoundError)  # ConfigError is a ValueError


def main(args: argparse.Namespace) -> int:
    return sample(args)


def _interval(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--cfg-interval must be LO,HI (two numbers), got {text!r}") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise ConfigError(f"--cfg-interval must satisfy 0 <= LO <= HI <= 1, got {text!r}")
    return lo, hi


def sampling_settings(args: argparse.Namespace, cfg, ckpt) -> dict:
    """Everything that decides the images (the run's sample config, overridden by the arguments)."""
    sc = cfg.sample
    settings = {
        "checkpoint": str(ckpt.path.resolve()), "step": ckpt.step, "num": args.num, "batch_size": args.batch_size,
        "sampler": args.sampler or sc.sampler, "steps": args.steps or sc.steps,
        "cfg_scale": sc.cfg_scale if args.cfg_scale is None else args.cfg_scale,
        "cfg_interval": list(_interval(args.cfg_interval) if args.cfg_interval else sc.cfg_interval),
        "t_end": args.t_end if args.t_end is not None else (sc.t_end if sc.t_end is not None else
                                                            (1.0 - 1e-3 if cfg.transport.path == "vp" else 1.0)),
        "labels": args.labels, "seed": args.seed, "weights": "model" if args.no_ema else "ema",
        "precision": args.precision or cfg.train.precision, "num_classes": cfg.num_classes,
    }
    if settings["steps"] < 1:
        raise ConfigError(f"--steps must be >= 1, got {settings['steps']}")
    if settings["cfg_scale"] < 1.0:
        raise ConfigError(f"--cfg-scale must be >= 1 (1 = no guidance), got {settings['cfg_scale']}")
    if not 0.0 < settings["t_end"] <= 1.0:
        raise ConfigError(f"--t-end must be in (0, 1], got {settings['t_end']}")
    return settings


def noise_and_labels(index: range, latent_shape: tuple[int, ...], *, seed: int, num_classes: int,
                     labels: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i's starting noise (CPU, float32) from ``derive_seed(seed, i, 0)`` and its label: from
    ``derive_seed(seed, i, 1)`` (``random``) or ``i mod num_classes`` (``balanced``). Independent of how
    the indices are split into batches and ranks."""
    from .distributed import derive_seed

    noise = torch.stack([torch.randn(latent_shape, generator=torch.Generator().manual_seed(derive_seed(seed, i, 0)))
                         for i in index])
    if labels == "balanced":
        y = torch.tensor([i % num_classes for i in index], dtype=torch.int64)
    else:
        y = torch.cat([torch.randint(0, num_classes, (1,), generator=torch.Generator().manual_seed(
            derive_seed(seed, i, 1))) for i in index])
    return noise, y


def _latent_info(args, ckpt) -> tuple[dict, dict]:
    """(info.json of the run's latents, their per-channel stats) — the stats recorded in the checkpoint
    when it has them, else the latent directory's stats.json."""
    from .data import LATENT_INFO, read_latent_stats

    lat = args.latents or ckpt.meta.get("latents")
    if lat is None or not (Path(lat) / LATENT_INFO).is_file():
        raise ConfigError(f"sampling needs the run's latent directory for its {LATENT_INFO} (latent shape, tokenizer): "
                          f"pass --latents DIR (got {lat!r})")
    info = json.loads((Path(lat) / LATENT_INFO).read_text())
    stats = ckpt.meta.get("latent_stats") or read_latent_stats(lat)
    return info, stats


def build_sampler_model(cfg, ckpt, latent_shape: tuple[int, int, int], *, weights: str, device: torch.device,
                        fused: bool = True) -> torch.nn.Module:
    """The run's DiT with its ``weights`` ("ema" or "model") in eval mode on ``device``."""
    import dataclasses

    from .dit import build_dit

    if not fused:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, fused=False))
    model, _family = build_dit(cfg, latent_shape)
    model.load_state_dict(ckpt.tensors(weights))
    return model.to(device).eval().requires_grad_(False)


@ends_process_group
def sample(args: argparse.Namespace) -> int:
    from . import shards as sh
    from .checkpoint import load_checkpoint, load_tokenizer
    from .config import build_config
    from .dit import DiTConfig, sample_ode
    from .distributed import barrier, init_distributed
    from .fid import npz_writer
    from .images import save_grid, to_uint8
    from .progress import ProgressReporter

    if args.num < 1 or args.batch_size < 1:
        raise ConfigError(f"--num-images and --batch-size must be >= 1, got {args.num}, {args.batch_size}")
    out = Path(args.out)
    if out.suffix != ".npz":
        raise ConfigError(f"--out must end in .npz (ADM's sample format), got {str(out)!r}")
    if (args.run_dir is None) == (args.run is None):
        raise ConfigError("give the train-dit run directory once: as RUN (first argument) or as --run RUN")
    run = args.run_dir or args.run
    if not Path(run).exists():
        raise ConfigError(f"run {run!r}: no such directory")
    ckpt = load_checkpoint(run)
    if ckpt.meta.get("kind") != "dit":
        raise ConfigError(f"run {run!r} is a {ckpt.meta.get('kind')!r} checkpoint, not a train-dit one")
    cfg = build_config(DiTConfig, ckpt.meta["config"], warn_renamed=False)
    settings = sampling_settings(args, cfg, ckpt)
    info, stats = _latent_info(args, ckpt)
    latent_shape = tuple(info["latent_shape"])
    tok = args.tokenizer or cfg.sample.tokenizer or info.get("tokenizer")
    if tok is None or not Path(tok).exists():
        raise ConfigError(f"decoding needs the tokenizer the latents came from: pass --tokenizer (got {tok!r})")
    settings["tokenizer"] = str(Path(tok).resolve())
    parts = out.with_name(out.name + ".parts")
    fp = sh.fingerprint(settings)
    if parts.is_dir() and (parts / sh.SETTINGS_FILE).is_file():
        saved = json.loads((parts / sh.SETTINGS_FILE).read_text()).get("fingerprint")
        if saved != fp:
            raise ConfigError(f"{parts} holds chunks of a sampling run with other settings; delete it or sample "
                              "with the same settings")

    dist_info = init_distributed(args.device)
    device = dist_info.device
    barrier(dist_info)  # every rank has read the parts directory before rank 0 writes to it
    if dist_info.is_main:
        parts.mkdir(parents=True, exist_ok=True)
        sh.write_settings(parts, settings)
    barrier(dist_info)
    model = build_sampler_model(cfg, ckpt, latent_shape, weights=settings["weights"], device=device,
                                fused=not args.no_fused)
    ae, _tcfg, _ = load_tokenizer(tok, device)
    mean = torch.tensor(stats["mean"], dtype=torch.float32, device=device)[:, None, None]
    std = torch.tensor(stats["std"], dtype=torch.float32, device=device)[:, None, None]

    chunks = [range(s, min(s + args.batch_size, args.num)) for s in range(0, args.num, args.batch_size)]
    todo = [(k, chunks[k]) for k in range(dist_info.rank, len(chunks), dist_info.world_size)
            if not (parts / _chunk_name(k)).is_file()]  # finished chunks of an interrupted run are kept
    bar = ProgressReporter(sum(len(c) for _, c in todo), desc="sample", bar=not args.no_progress,
                           enabled=dist_info.is_main, every_s=args.status_every, world_size=dist_info.world_size)
    for k, index in todo:
        noise, y = noise_and_labels(index, latent_shape, seed=args.seed, num_classes=cfg.num_classes,
                                    labels=args.labels)
        with torch.no_grad():
            z = sample_ode(model, noise.to(device), y.to(device), num_classes=cfg.num_classes,
                           steps=settings["steps"], sampler=settings["sampler"], cfg_scale=settings["cfg_scale"],
                           cfg_interval=tuple(settings["cfg_interval"]), t_end=settings["t_end"],
                           precision=settings["precision"])
            images = ae.decode(z * std + mean).float()
        u8 = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
        _save_chunk(parts, k, u8, y.numpy())
        bar.update(len(index))
    bar.close()
    barrier(dist_info)
    if dist_info.is_main:
        first = np.load(parts / _chunk_name(0))
        h, w = first["images"].shape[1:3]

        def rows(key):
            for k in range(len(chunks)):
                with np.load(parts / _chunk_name(k)) as z:
                    yield z[key]

        with npz_writer(out) as write:
            write("arr_0", (args.num, h, w, 3), np.uint8, rows("images"))
            write("arr_1", (args.num,), np.int64, rows("labels"))
        out.with_suffix(".json").write_text(json.dumps(settings, indent=1))
        if args.grid:
            with np.load(out) as z:
                grid = torch.from_numpy(z["arr_0"][:64]).permute(0, 3, 1, 2).float() / 127.5 - 1
            save_grid(grid, args.grid)
        if not args.keep_parts:
            for f in parts.iterdir():
                f.unlink()
            parts.rmdir()
        print(f"sample: {args.num} images ({h}x{w}) -> {out}", file=sys.stderr)
    barrier(dist_info)
    return 0


def _chunk_name(k: int) -> str:
    return f"chunk-{k:06d}.npz"


def _save_chunk(parts: Path, k: int, images: np.ndarray, labels: np.ndarray) -> None:
    """Atomically write chunk ``k`` (its presence means it is complete)."""
    final = parts / _chunk_name(k)
    tmp = parts / f".{final.name}.{os.getpid()}.tmp.npz"
    np.savez(tmp, images=images, labels=labels)
    os.replace(tmp, final)
