"""``vefast extract-latents``: encode a dataset with a trained tokenizer into safetensors shards, on one
GPU or many (torchrun), resumable.

Writes ``OUT/shard-KKKKK.safetensors`` for dataset items ``[K S, (K + 1) S)`` (S = ``--shard-size``):
``latents`` (N, C, h, w), ``labels`` (N,), with ``--flip`` also ``latents_flip`` of the horizontally
flipped images, with ``--repa-dinov2`` also ``repa`` (N, D', g, g) DINOv2 patch features at the DiT
token grid for REPA (``repa_flip`` with ``--flip``); then ``OUT/stats.json`` (per-channel mean /
population std over every extracted latent, flipped ones included — the normalization ``train-dit``
applies), ``OUT/info.json`` (tokenizer, image size, counts) and ``OUT/extract.json`` (the settings).

Latents are ``posterior.sample()`` by default, as LightningDiT's extraction does (``--mode mean``
takes the posterior mean), with the noise of item i (view v: 0 plain, 1 flipped) drawn on the CPU from
``derive_seed(seed, i, v)``. Under torchrun rank r of W writes shards r, r + W, ... (vefast.recipes.shards):
what a shard holds does not depend on the number of ranks, so every rank count writes the same files.
Each shard is written atomically and gets a completion marker (``shard-KKKKK.done.json``: size, SHA-256,
settings, the shard's float64 channel sums); ``--resume`` keeps the finished shards (verified against
their markers) and writes the rest, with any number of ranks. Rank 0 merges the statistics from the
markers, in shard order (identical for every rank count).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .distributed import ends_process_group


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", required=True, help="train-tokenizer run directory (or one checkpoint directory)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="class-folder image directory (ROOT/<class>/<image>)")
    src.add_argument("--synthetic", type=int, metavar="N", help="N procedural images (same generator as train-tokenizer)")
    parser.add_argument("--synthetic-classes", type=int, default=None, help="classes of --synthetic (default: the tokenizer's)")
    parser.add_argument("--out", required=True, help="output directory for the latent shards")
    parser.add_argument("--flip", action="store_true", help="also store latents of horizontally flipped images")
    parser.add_argument("--image-size", type=int, default=None, help="default: the tokenizer's training size")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=16384, help="latents per shard file")
    parser.add_argument("--mode", choices=("sample", "mean"), default="sample", help="posterior sample (default) or mean")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32", help="stored dtype")
    parser.add_argument("--seed", type=int, default=0, help="seed of the posterior samples")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--repa-dinov2", default=None, metavar="NAME",
                        help="also store DINOv2 patch features for REPA (timm name, e.g. vit_base_patch14_dinov2.lvd142m)")
    parser.add_argument("--repa-dinov2-checkpoint", default=None, help="local DINOv2 weights file")
    parser.add_argument("--repa-random-init", action="store_true", help="random DINOv2 weights (tests only)")
    parser.add_argument("--repa-patch", type=int, default=1, help="DiT patch size: features at latent grid / patch")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted extraction in --out: keep its finished shards, write the rest")
    parser.add_argument("--no-verify", action="store_true",
                        help="with --resume, trust finished shards by size (skip re-hashing them)")
    from .progress import add_progress_arguments

    add_progress_arguments(parser)


USER_ERRORS = (ValueError, FileNotFoundError)  # ConfigError is a ValueError


def main(args: argparse.Namespace) -> int:
    return extract(args)


@ends_process_group
def extract(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    from . import shards as sh
    from .checkpoint import load_checkpoint, load_tokenizer
    from .config import ConfigError
    from ..nn import DiagonalGaussianDistribution
    from .data import make_image_dataset
    from .distributed import autocast, barrier, derive_seed, init_distributed
    from .progress import ProgressReporter

    if args.batch_size < 1 or args.shard_size < 1:
        raise ConfigError(f"--batch-size and --shard-size must be >= 1, got {args.batch_size}, {args.shard_size}")
    if args.data is not None and not Path(args.data).is_dir():
        raise ConfigError(f"--data {args.data!r}: no such directory")
    tok = Path(args.tokenizer)
    if not tok.exists():
        raise ConfigError(f"--tokenizer {args.tokenizer!r}: no such run directory")
    out = Path(args.out)
    info = init_distributed(args.device)
    device = info.device
    try:
        tok_ckpt = load_checkpoint(tok)
        ae, tcfg, _ = load_tokenizer(tok, device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    size = args.image_size or tcfg.train.image_size
    if size % ae.downsample_factor:
        raise ConfigError(f"--image-size {size} is not a multiple of the tokenizer's factor {ae.downsample_factor}")
    classes = args.synthetic_classes or tcfg.train.synthetic_classes
    dataset = make_image_dataset(args.data, args.synthetic, size, classes, tcfg.seed)
    num_classes = getattr(dataset, "num_classes", classes)
    grid = size // ae.downsample_factor
    dino, g_feat = None, None
    if args.repa_dinov2 is not None:
        from .. import load_dinov2

        if grid % args.repa_patch:
            raise ConfigError(f"--repa-patch {args.repa_patch} does not divide the latent grid {grid}")
        dino = load_dinov2(args.repa_dinov2, checkpoint=args.repa_dinov2_checkpoint,
                           pretrained=not args.repa_random_init).to(device).eval().requires_grad_(False)
        g_feat = grid // args.repa_patch
    settings = {"tokenizer": str(tok.resolve()), "tokenizer_checkpoint": tok_ckpt.path.name,
                "tokenizer_step": tok_ckpt.step, "data": str(Path(args.data).resolve()) if args.data else None,
                "synthetic": args.synthetic, "synthetic_classes": classes, "image_size": size,
                "num_images": len(dataset), "flip": args.flip, "mode": args.mode, "dtype": args.dtype,
                "seed": args.seed, "shard_size": args.shard_size, "repa_dinov2": args.repa_dinov2,
                "repa_patch": args.repa_patch if dino is not None else None,
                "repa_weights": "random" if args.repa_random_init else args.repa_dinov2_checkpoint}
    try:
        sh.check_settings(out, settings, resume=args.resume)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    fp = sh.fingerprint(settings)
    barrier(info)  # every rank has checked the directory before rank 0 writes to it
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        sh.remove_temporaries(out)
        sh.write_settings(out, settings)
    barrier(info)

    plan = sh.plan_shards(len(dataset), args.shard_size)
    mine = sh.rank_shards(plan, info.rank, info.world_size)
    todo = [s for s in mine if not (args.resume and sh.finished(out, s, fp, verify=not args.no_verify))]
    if info.is_main and args.resume:
        print(f"extract-latents: resuming, rank 0 keeps {len(mine) - len(todo)} of its {len(mine)} shards",
              file=sys.stderr)
    dtype = getattr(torch, args.dtype)
    precision = tcfg.train.precision
    views = ("latents", "latents_flip") if args.flip else ("latents",)
    progress = ProgressReporter(sum(len(s) for s in todo) * len(views), desc="extract-latents",
                                bar=not args.no_progress, enabled=info.is_main, every_s=args.status_every,
                                world_size=info.world_size)

    def encode(x: torch.Tensor, index: list[int], view: int) -> torch.Tensor:
        """Posterior sample (noise of item i from ``derive_seed(seed, i, view)``, drawn on the CPU) or mean."""
        with torch.no_grad(), autocast(device, precision):
            moments = ae.encode(x).float()
        post = DiagonalGaussianDistribution(moments)
        if args.mode == "mean":
            return post.mode()
        eps = torch.stack([torch.randn(post.mean.shape[1:], generator=torch.Generator().manual_seed(
            derive_seed(args.seed, i, view))) for i in index]).to(device)
        return post.mean + post.std * eps  # LDM's sample formula, per-item noise

    loader = DataLoader(_Indexed(dataset), batch_sampler=sh.batches(todo, args.batch_size),
                        num_workers=args.num_workers if todo else 0)
    it = iter(loader)
    for shard in todo:
        buf: dict[str, list[torch.Tensor]] = {}
        s1 = s2 = None
        count = 0
        for _ in range(-(-len(shard) // args.batch_size)):
            x, y, index = next(it)
            x, index = x.to(device), index.tolist()
            for v, key in enumerate(views):
                xv = x if v == 0 else x.flip(-1)
                z = encode(xv, index, v)
                zd = z.double()
                a, b = zd.sum((0, 2, 3)), (zd * zd).sum((0, 2, 3))
                s1, s2 = (a, b) if s1 is None else (s1 + a, s2 + b)
                count += z.shape[0] * z.shape[2] * z.shape[3]
                buf.setdefault(key, []).append(z.to(dtype).cpu())
                if dino is not None:
                    from .. import dinov2_features

                    with torch.no_grad():
                        patch, _ = dinov2_features(dino, xv, grid=(g_feat, g_feat))
                    buf.setdefault("repa" if v == 0 else "repa_flip", []).append(patch.to(dtype).cpu())
                progress.update(x.shape[0])
            buf.setdefault("labels", []).append(torch.as_tensor(y, dtype=torch.int64))
        tensors = {k: torch.cat(v).contiguous() for k, v in buf.items()}
        sh.write_shard(out, shard, tensors, fp=fp,
                       stats={"sum": s1.cpu().tolist(), "sumsq": s2.cpu().tolist(), "count": count})
    progress.close()
    barrier(info)
    if info.is_main:
        _write_summary(out, plan, fp, settings, ae, grid, num_classes, args, dino, g_feat, info.world_size)
    barrier(info)
    return 0


class _Indexed(torch.utils.data.Dataset):
    """``(image, label, index)`` of a dataset (the index seeds the item's posterior noise)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        x, y = self.dataset[i]
        return x, y, i


def merge_stats(markers: list[dict]) -> dict:
    """Per-channel mean / population std over every latent from the shards' float64 sums, merged in
    shard order (the same numbers for every rank count)."""
    s1 = torch.zeros(len(markers[0]["stats"]["sum"]), dtype=torch.float64)
    s2 = torch.zeros_like(s1)
    count = 0
    for mk in markers:
        s1 += torch.tensor(mk["stats"]["sum"], dtype=torch.float64)
        s2 += torch.tensor(mk["stats"]["sumsq"], dtype=torch.float64)
        count += int(mk["stats"]["count"])
    mean = s1 / count
    std = (s2 / count - mean * mean).clamp_min(1e-12).sqrt()
    return {"mean": mean.tolist(), "std": std.tolist(), "count": count}


def _write_summary(out: Path, plan, fp: str, settings: dict, ae, grid: int, num_classes: int, args,
                   dino, g_feat, world_size: int) -> None:
    """Rank 0, after every rank finished: check every shard's marker, merge the stats, write
    stats.json and info.json."""
    from . import shards as sh
    from .data import LATENT_INFO, LATENT_STATS

    markers = []
    for shard in plan:
        mk = sh.finished(out, shard, fp, verify=False)
        if mk is None:
            raise RuntimeError(f"extract-latents: {sh.shard_path(out, shard)} is missing or unfinished after "
                               "every rank finished; run again with --resume")
        markers.append(mk)
    stats = merge_stats(markers)
    stats["mode"] = args.mode
    (out / LATENT_STATS).write_text(json.dumps(stats, indent=1))
    c = ae.latent_channels
    meta = {"tokenizer": settings["tokenizer"], "tokenizer_checkpoint": settings["tokenizer_checkpoint"],
            "tokenizer_step": settings["tokenizer_step"], "image_size": settings["image_size"],
            "num_images": settings["num_images"], "num_classes": num_classes, "latent_shape": [c, grid, grid],
            "flip": args.flip, "mode": args.mode, "dtype": args.dtype, "seed": args.seed,
            "num_shards": len(plan), "shard_size": args.shard_size, "world_size": world_size}
    if dino is not None:
        from safetensors import safe_open

        with safe_open(str(sh.shard_path(out, plan[0])), framework="pt") as h:
            feature_dim = int(h.get_slice("repa").get_shape()[1])
        meta.update(repa_dinov2=args.repa_dinov2, repa_feature_dim=feature_dim, repa_grid=g_feat)
    (out / LATENT_INFO).write_text(json.dumps(meta, indent=1))
    print(f"extract-latents: {settings['num_images']} images -> {out} ({len(plan)} shards, latents {c}x{grid}x{grid}"
          f"{', flipped too' if args.flip else ''})", file=sys.stderr)
