"""``vefast extract-features``: DINOv2 targets of a tokenizer config, computed once, for ``train-tokenizer``.

The tokenizer's alignment loss compares its latents with frozen DINOv2 features of the same images,
at the latent grid. Online (the default) DINOv2 runs once per batch under ``no_grad``; this command
runs it once per image instead and stores the result, and ``loss.dinov2_features: DIR`` makes
``train-tokenizer`` read it (no DINOv2 in the training process: its memory and FLOPs go to the
autoencoder). It takes the tokenizer's own config (``--config`` / ``--set``, the same as
``train-tokenizer``) so the features are computed exactly as the online path would: same DINOv2
(name, weights, kwargs), resize, normalization, latent grid, image size, dataset order.

Writes ``OUT/feat-RRR-KKKKK.safetensors`` (``index`` (N,) dataset indices, ``patch`` (N, D', g, g),
``cls`` (N, D'); with ``--flip`` also ``patch_flip`` / ``cls_flip`` of the mirrored images) and
``OUT/info.json`` (what ``train-tokenizer`` checks before it uses them). Under torchrun each rank
encodes a contiguous slice of the dataset and writes its own shards.

Cost of storing them: ``N * D' * g^2 * 2`` bytes in float16 — ImageNet (1.28 M images) with ViT-L
(D' = 1024) at 16 x 16 is 670 GB, twice that with ``--flip``. Worth it where DINOv2 is a large share
of the step (small autoencoders, several tokenizer runs on one feature set) and the disk reads keep up.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .config import ConfigError
from .distributed import ends_process_group


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tokenizer_f16d32_ve.yaml",
                        help="the train-tokenizer config the features are for (path or shipped name)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="class-folder image directory (ROOT/<class>/<image>)")
    src.add_argument("--synthetic", type=int, metavar="N", help="N procedural images (as train-tokenizer --synthetic)")
    parser.add_argument("--out", required=True, help="output directory for the feature shards")
    parser.add_argument("--flip", action="store_true", help="also store the features of horizontally flipped images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=4096, help="images per shard file")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16", help="stored dtype")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")


USER_ERRORS = (ConfigError, FileNotFoundError)


def main(args: argparse.Namespace) -> int:
    return extract(args)


@ends_process_group
def extract(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file
    from torch.utils.data import DataLoader, Subset

    from .config import load_config
    from .data import FEATURE_INFO, make_image_dataset, shard_range
    from .distributed import barrier, init_distributed
    from .tokenizer_config import TokenizerConfig

    cfg = load_config(TokenizerConfig, args.config, args.set)
    lc, tc = cfg.loss, cfg.train
    if args.batch_size < 1 or args.shard_size < 1:
        raise ConfigError(f"--batch-size and --shard-size must be >= 1, got {args.batch_size}, {args.shard_size}")
    if args.data is not None and not Path(args.data).is_dir():
        raise ConfigError(f"--data {args.data!r}: no such directory")
    out = Path(args.out)
    if out.exists() and any(out.glob("feat-*.safetensors")):
        raise ConfigError(f"--out {str(out)!r} already holds feature shards; choose an empty directory")
    f = 2 ** (len(cfg.model.channel_mult) - 1)
    grid = (tc.image_size // f, tc.image_size // f)
    dataset = make_image_dataset(args.data, args.synthetic, tc.image_size, tc.synthetic_classes, cfg.seed)
    info = init_distributed(args.device)
    device = info.device
    from .tokenizer import dinov2_targets, load_dino

    torch.manual_seed(cfg.seed)  # as train-tokenizer does before building DINOv2 (matters for random-init tests)
    dino = load_dino(lc, device)
    mine = shard_range(len(dataset), info.rank, info.world_size)
    loader = DataLoader(Subset(dataset, list(mine)), batch_size=args.batch_size, shuffle=False,
                        num_workers=args.num_workers)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    barrier(info)
    dtype = getattr(torch, args.dtype)
    buf: dict[str, list[torch.Tensor]] = {}
    shard, start, dim = 0, mine.start, None

    def flush() -> None:
        nonlocal shard, buf
        if buf:
            save_file({k: torch.cat(v).contiguous() for k, v in buf.items()},
                      str(out / f"feat-{info.rank:03d}-{shard:05d}.safetensors"))
            shard, buf = shard + 1, {}

    for x, _y in loader:
        x = x.to(device)
        buf.setdefault("index", []).append(torch.arange(start, start + x.shape[0], dtype=torch.int64))
        start += x.shape[0]
        for sfx, xv in (("", x), ("_flip", x.flip(-1))) if args.flip else (("", x),):
            patch, cls = dinov2_targets(dino, xv, grid, lc, tc.precision)
            dim = patch.shape[1]
            buf.setdefault("patch" + sfx, []).append(patch.to(dtype).cpu())
            buf.setdefault("cls" + sfx, []).append(cls.to(dtype).cpu())
        if sum(t.shape[0] for t in buf["index"]) >= args.shard_size:
            flush()
    flush()
    barrier(info)
    if info.is_main:
        from .tokenizer import FEATURE_KEYS

        meta = {"kind": "dinov2-features", **{k: getattr(lc, k) for k in FEATURE_KEYS}, "grid": list(grid),
                "image_size": tc.image_size, "num_images": len(dataset), "flip": args.flip, "dtype": args.dtype,
                "feature_dim": dim if dim is not None else int(getattr(dino, "embed_dim", 0)),
                "data": str(Path(args.data).resolve()) if args.data else f"synthetic:{args.synthetic}",
                "world_size": info.world_size}
        (out / FEATURE_INFO).write_text(json.dumps(meta, indent=1))
        print(f"extract-features: {len(dataset)} images -> {out} ({meta['feature_dim']} x {grid[0]} x {grid[1]}"
              f"{', flipped too' if args.flip else ''})", file=sys.stderr)
    barrier(info)
    return 0
