"""``vefast extract-latents``: encode a dataset with a trained tokenizer into safetensors shards.

Writes ``OUT/shard-RRR-KKKKK.safetensors`` (``latents`` (N, C, h, w), ``labels`` (N,), with
``--flip`` also ``latents_flip`` of the horizontally flipped images, with ``--repa-dinov2`` also
``repa`` (N, D', g, g) DINOv2 patch features at the DiT token grid for REPA), ``OUT/stats.json``
(per-channel mean / population std over every extracted latent, flipped ones included — the
normalization ``train-dit`` applies) and ``OUT/info.json`` (tokenizer, image size, counts).

Latents are ``posterior.sample()`` by default, as LightningDiT's extraction does (``--mode mean``
takes the posterior mean). Under torchrun each rank encodes its contiguous slice of the dataset;
the statistics are reduced over ranks and rank 0 writes ``stats.json`` / ``info.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


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


def main(args: argparse.Namespace) -> int:
    from .config import ConfigError

    try:
        return extract(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"vefast extract-latents: {e}", file=sys.stderr)
        return 2


def extract(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file
    from torch.utils.data import DataLoader, Subset

    from .config import ConfigError
    from .data import LATENT_INFO, LATENT_STATS, make_image_dataset, shard_range
    from .distributed import all_reduce_mean, autocast, barrier, cleanup, derive_seed, init_distributed
    from .tokenizer import load_tokenizer
    from ..nn import DiagonalGaussianDistribution

    if args.batch_size < 1 or args.shard_size < 1:
        raise ConfigError(f"--batch-size and --shard-size must be >= 1, got {args.batch_size}, {args.shard_size}")
    if args.data is not None and not Path(args.data).is_dir():
        raise ConfigError(f"--data {args.data!r}: no such directory")
    tok = Path(args.tokenizer)
    if not tok.exists():
        raise ConfigError(f"--tokenizer {args.tokenizer!r}: no such run directory")
    out = Path(args.out)
    if out.exists() and any(out.glob("shard-*.safetensors")):
        raise ConfigError(f"--out {str(out)!r} already holds latent shards; choose an empty directory")
    info = init_distributed(args.device)
    device = info.device
    try:
        ae, tcfg, _ = load_tokenizer(tok, device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    size = args.image_size or tcfg.train.image_size
    if size % ae.downsample_factor:
        raise ConfigError(f"--image-size {size} is not a multiple of the tokenizer's factor {ae.downsample_factor}")
    classes = args.synthetic_classes or tcfg.train.synthetic_classes
    dataset = make_image_dataset(args.data, args.synthetic, size, classes, tcfg.seed)
    num_classes = getattr(dataset, "num_classes", classes)
    dino = None
    grid = size // ae.downsample_factor
    if args.repa_dinov2 is not None:
        from .. import dinov2_features, load_dinov2

        if grid % args.repa_patch:
            raise ConfigError(f"--repa-patch {args.repa_patch} does not divide the latent grid {grid}")
        dino = load_dinov2(args.repa_dinov2, checkpoint=args.repa_dinov2_checkpoint,
                           pretrained=not args.repa_random_init).to(device).eval().requires_grad_(False)
        g_feat = grid // args.repa_patch
    dtype = getattr(torch, args.dtype)
    mine = shard_range(len(dataset), info.rank, info.world_size)
    loader = DataLoader(Subset(dataset, list(mine)), batch_size=args.batch_size, shuffle=False,
                        num_workers=args.num_workers)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    barrier(info)

    c = ae.latent_channels
    s1 = torch.zeros(c, dtype=torch.float64, device=device)
    s2 = torch.zeros(c, dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    buf: dict[str, list[torch.Tensor]] = {}
    shard = 0
    precision = tcfg.train.precision

    def encode(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        with torch.no_grad(), autocast(device, precision):
            moments = ae.encode(x).float()
        post = DiagonalGaussianDistribution(moments)
        return post.sample(generator=g) if args.mode == "sample" else post.mode()

    def flush() -> None:
        nonlocal shard, buf
        if not buf:
            return
        tensors = {k: torch.cat(v).contiguous() for k, v in buf.items()}
        save_file(tensors, str(out / f"shard-{info.rank:03d}-{shard:05d}.safetensors"))
        shard += 1
        buf = {}

    for bi, (x, y) in enumerate(loader):
        x = x.to(device)
        g = torch.Generator(device=device).manual_seed(derive_seed(args.seed, info.rank, bi))
        views = {"latents": x}
        if args.flip:
            views["latents_flip"] = x.flip(-1)
        for key, xv in views.items():
            z = encode(xv, g).double()
            s1 += z.sum((0, 2, 3))
            s2 += (z * z).sum((0, 2, 3))
            count += z.shape[0] * z.shape[2] * z.shape[3]
            buf.setdefault(key, []).append(z.to(dtype).cpu())
            if dino is not None:
                with torch.no_grad():
                    patch, _ = dinov2_features(dino, xv, grid=(g_feat, g_feat))
                buf.setdefault("repa" if key == "latents" else "repa_flip", []).append(patch.to(dtype).cpu())
        buf.setdefault("labels", []).append(torch.as_tensor(y, dtype=torch.int64))
        if sum(t.shape[0] for t in buf["labels"]) >= args.shard_size:
            flush()
    flush()
    # mean of the per-rank sums times world size = global sums
    s1 = all_reduce_mean(s1, info) * info.world_size
    s2 = all_reduce_mean(s2, info) * info.world_size
    count = all_reduce_mean(count, info) * info.world_size
    if info.is_main:
        mean = s1 / count
        std = (s2 / count - mean * mean).clamp_min(1e-12).sqrt()
        (out / LATENT_STATS).write_text(json.dumps({"mean": mean.tolist(), "std": std.tolist(),
                                                    "count": int(count.item()), "mode": args.mode}, indent=1))
        meta = {"tokenizer": str(tok.resolve()), "image_size": size, "num_images": len(dataset),
                "num_classes": num_classes, "latent_shape": [c, grid, grid], "flip": args.flip, "mode": args.mode,
                "dtype": args.dtype, "world_size": info.world_size}
        if dino is not None:
            meta.update(repa_dinov2=args.repa_dinov2, repa_feature_dim=int(patch.shape[1]), repa_grid=g_feat)
        (out / LATENT_INFO).write_text(json.dumps(meta, indent=1))
        print(f"extract-latents: {len(dataset)} images -> {out} (latents {c}x{grid}x{grid}"
              f"{', flipped too' if args.flip else ''})", file=sys.stderr)
    barrier(info)
    cleanup()
    return 0
