"""Datasets for the recipes: class-folder images, procedural synthetic images, latent shards.

Batches are a pure function of (seed, step, rank, world size): :class:`StepSampler` draws one
permutation per epoch from the seed, takes the global batch of ``step`` and this rank's slice of
it. The data position in a checkpoint is the step, and a resumed run sees exactly the batches the
uninterrupted run would have seen.
"""
from __future__ import annotations

import bisect
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .distributed import derive_seed

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".JPEG")


def center_crop_arr(pil_image, image_size: int):
    """ADM's center crop (as DiT / SiT / LightningDiT preprocess ImageNet): box-downsample by 2 while
    the short side is >= 2x the target, bicubic resize of the short side to ``image_size``, center crop."""
    from PIL import Image

    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    y = (arr.shape[0] - image_size) // 2
    x = (arr.shape[1] - image_size) // 2
    return arr[y:y + image_size, x:x + image_size]


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """HWC uint8 -> CHW float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>``: classes sorted by name (label = index), images resized + center-cropped
    to ``image_size`` (ADM preprocessing), returned as (image in [-1, 1], label)."""

    def __init__(self, root: str | Path, image_size: int):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"data: {str(self.root)!r} is not a directory")
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not self.classes:
            raise ValueError(f"data: {str(self.root)!r} has no class sub-directories (expected ROOT/<class>/<image>)")
        self.samples: list[tuple[str, int]] = []
        for label, c in enumerate(self.classes):
            for f in sorted((self.root / c).rglob("*")):
                if f.suffix in IMAGE_EXTENSIONS or f.suffix.lower() in IMAGE_EXTENSIONS:
                    self.samples.append((str(f), label))
        if not self.samples:
            raise ValueError(f"data: no images ({', '.join(IMAGE_EXTENSIONS[:5])}, ...) under {str(self.root)!r}")
        self.image_size = image_size
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as im:
            arr = center_crop_arr(im.convert("RGB"), self.image_size)
        return to_tensor(arr), label


class SyntheticImageDataset(Dataset):
    """``n`` procedurally generated class-conditional images, deterministic in (seed, index).

    Class ``c = index % num_classes`` fixes a colour pair, a stripe orientation and frequency and a
    blob shape; the index draws position, phase and brightness. Smooth, structured, learnable: a
    stand-in for a real dataset that runs offline in every test.
    """

    def __init__(self, n: int, image_size: int, num_classes: int = 10, seed: int = 0):
        if n < 1:
            raise ValueError(f"synthetic: expected at least 1 image, got {n}")
        if num_classes < 1:
            raise ValueError(f"synthetic: num_classes must be >= 1, got {num_classes}")
        self.n, self.image_size, self.num_classes, self.seed = n, image_size, num_classes, seed
        g = torch.Generator().manual_seed(derive_seed(seed, 7919))
        self.colors = torch.rand(num_classes, 2, 3, generator=g) * 2 - 1
        self.angle = torch.rand(num_classes, generator=g) * math.pi
        self.freq = 1.0 + torch.rand(num_classes, generator=g) * 3.0
        self.blob = 0.15 + torch.rand(num_classes, generator=g) * 0.25

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        c = i % self.num_classes
        g = torch.Generator().manual_seed(derive_seed(self.seed, i))
        s = self.image_size
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, s), torch.linspace(-1, 1, s), indexing="ij")
        phase, bright = torch.rand(2, generator=g)
        cx, cy = torch.rand(2, generator=g) * 1.0 - 0.5
        a = self.angle[c]
        u = xx * torch.cos(a) + yy * torch.sin(a)
        stripes = 0.5 + 0.5 * torch.sin(math.pi * (self.freq[c] * u + 2 * phase))
        blob = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * self.blob[c] ** 2))
        c0, c1 = self.colors[c]
        img = c0[:, None, None] * (1 - stripes) + c1[:, None, None] * stripes
        img = img * (1 - blob) + (0.6 + 0.4 * bright) * blob
        return img.clamp(-1, 1).float(), c


class StepSampler(Sampler[list[int]]):
    """Batches of indices for steps ``start_step, start_step + 1, ...`` (infinite, resumable).

    Global batch ``batch_size * world_size`` taken from a per-epoch permutation seeded by
    (seed, epoch); rank ``r`` gets elements ``[r * batch_size, (r + 1) * batch_size)`` of it.
    The last incomplete global batch of an epoch is dropped.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 start_step: int = 0, shuffle: bool = True, stop_step: int | None = None):
        self.global_batch = batch_size * world_size
        if n < self.global_batch:
            raise ValueError(f"data: {n} samples is fewer than one global batch ({batch_size} x {world_size} ranks)")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.start_step, self.shuffle = rank, world_size, start_step, shuffle
        self.stop_step = stop_step
        self.steps_per_epoch = n // self.global_batch
        self._perm_epoch, self._perm = -1, None

    def batch(self, step: int) -> list[int]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            if self.shuffle:
                self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(derive_seed(self.seed, epoch, 101)))
            else:
                self._perm = torch.arange(self.n)
            self._perm_epoch = epoch
        start = pos * self.global_batch + self.rank * self.batch_size
        return self._perm[start:start + self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while self.stop_step is None or step < self.stop_step:
            yield self.batch(step)
            step += 1

    def __len__(self) -> int:
        if self.stop_step is None:
            raise TypeError("StepSampler without stop_step is infinite")
        return max(0, self.stop_step - self.start_step)


def step_loader(dataset: Dataset, batch_size: int, *, seed: int, rank: int, world_size: int, start_step: int,
                stop_step: int | None = None, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader yielding this rank's batch for each step from ``start_step`` on."""
    sampler = StepSampler(len(dataset), batch_size, seed=seed, rank=rank, world_size=world_size,
                          start_step=start_step, stop_step=stop_step)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0)


def shard_range(n: int, rank: int, world_size: int) -> range:
    """Contiguous, near-equal slice ``[start, stop)`` of ``range(n)`` for ``rank`` (every index exactly once)."""
    per, extra = divmod(n, world_size)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (1 if rank < extra else 0))


def make_image_dataset(data_dir: str | None, synthetic: int | None, image_size: int, num_classes: int,
                       seed: int) -> Dataset:
    """The class-folder dataset at ``data_dir``, or ``synthetic`` procedural images (exactly one of them)."""
    if (data_dir is None) == (synthetic is None):
        raise ValueError("data: give exactly one of --data DIR and --synthetic N")
    if synthetic is not None:
        return SyntheticImageDataset(synthetic, image_size, num_classes=num_classes, seed=seed)
    return ImageFolderDataset(data_dir, image_size)


# ---------------------------------------------------------------------------------------------
# latent shards (written by ``vefast extract-latents``, read by ``vefast train-dit``)

LATENT_STATS = "stats.json"
LATENT_INFO = "info.json"
LIGHTNINGDIT_STATS = "latents_stats.pt"


def read_latent_stats(latent_dir: str | Path) -> dict:
    """Per-channel ``mean`` / ``std`` lists of a latent directory: vefast's ``stats.json``, else
    LightningDiT's ``latents_stats.pt`` (``{"mean", "std"}`` tensors of shape (1, C, 1, 1), read
    weights-only). ``source`` says which file they came from."""
    d = Path(latent_dir)
    f = d / LATENT_STATS
    if f.is_file():
        stats = json.loads(f.read_text())
    elif (d / LIGHTNINGDIT_STATS).is_file():
        f = d / LIGHTNINGDIT_STATS
        try:
            raw = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors of every kind: name the file
            raise ValueError(f"latents: {str(f)!r} is not a LightningDiT latent-stats file ({type(e).__name__}: {e})") from None
        if not isinstance(raw, dict) or not all(isinstance(raw.get(k), torch.Tensor) for k in ("mean", "std")):
            raise ValueError(f"latents: {str(f)!r} lacks 'mean' / 'std' tensors")
        stats = {k: raw[k].double().flatten().tolist() for k in ("mean", "std")}
        stats["format"] = "lightningdit"
    else:
        raise ValueError(f"latents: {str(latent_dir)!r} has no {LATENT_STATS} (per-channel mean/std) and no "
                         f"LightningDiT {LIGHTNINGDIT_STATS}; write it with `vefast extract-latents` (it computes the "
                         "stats over the extracted set)")
    for k in ("mean", "std"):
        if not isinstance(stats.get(k), list) or not stats[k]:
            raise ValueError(f"latents: {str(f)!r} lacks a per-channel {k!r} list")
    if any(s <= 0 for s in stats["std"]):
        raise ValueError(f"latents: {str(f)!r} has a non-positive std entry")
    stats["source"] = f.name
    return stats


def latent_shard_files(root: Path) -> list[Path]:
    """vefast's ``shard-*.safetensors``, else every ``*.safetensors`` (LightningDiT's
    ``latents_rank00_shard000.safetensors``), sorted by name."""
    files = sorted(root.glob("shard-*.safetensors"))
    return files or sorted(root.glob("*.safetensors"))


class LatentShardDataset(Dataset):
    """Latents from ``DIR/shard-*.safetensors`` (keys ``latents`` (N, C, h, w), ``labels`` (N,) and
    optionally ``latents_flip``), normalized per channel with ``DIR/stats.json``: ``(z - mean) / std``.

    LightningDiT's extracted latents (``extract_features.py``: ``*.safetensors`` with the same keys, and
    ``latents_stats.pt``) read as they are. LightningDiT feeds ``(z - mean) / std * latent_multiplier``;
    vefast's equivalent stats are ``std / latent_multiplier`` (its VA-VAE configs use 1.0: identical).

    Shards are opened lazily and read row by row (``safe_open``), so the set need not fit in memory.
    With ``flip=True`` and flipped latents present, index ``i >= N`` returns the flipped latent of ``i - N``.
    With ``features=True`` items are (latent, label, DINOv2 features) from the shards' ``repa`` key
    (``repa_flip`` for flipped items), written by ``extract-latents --repa-dinov2``.
    """

    def __init__(self, root: str | Path, *, flip: bool = False, normalize: bool = True, features: bool = False):
        from safetensors import safe_open

        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"latents: {str(self.root)!r} is not a directory")
        self.files = latent_shard_files(self.root)
        if not self.files:
            raise ValueError(f"latents: no shard-*.safetensors (or LightningDiT *.safetensors) files in {str(self.root)!r}")
        stats = self.stats = read_latent_stats(self.root)
        self.mean = torch.tensor(stats["mean"], dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(stats["std"], dtype=torch.float32)[:, None, None]
        self.normalize = normalize
        self.sizes, self.has_flip = [], True
        shape = None
        for f in self.files:
            with safe_open(str(f), framework="pt") as h:
                keys = set(h.keys())
                if "latents" not in keys or "labels" not in keys:
                    raise ValueError(f"latents: {str(f)!r} lacks 'latents' or 'labels'")
                s = h.get_slice("latents").get_shape()
                self.sizes.append(s[0])
                shape = tuple(s[1:]) if shape is None else shape
                if tuple(s[1:]) != shape:
                    raise ValueError(f"latents: {str(f)!r} has latent shape {tuple(s[1:])}, others {shape}")
                self.has_flip &= "latents_flip" in keys
                if features and "repa" not in keys:
                    raise ValueError(f"latents: {str(f)!r} has no DINOv2 features ('repa'); extract with --repa-dinov2 NAME")
                if features and flip and "repa_flip" not in keys:
                    raise ValueError(f"latents: {str(f)!r} has no 'repa_flip' features for flipped latents")
        self.latent_shape = shape
        if self.mean.shape[0] != shape[0]:
            raise ValueError(f"latents: stats have {self.mean.shape[0]} channels, latents {shape[0]}")
        if flip and not self.has_flip:
            raise ValueError(f"latents: flip requested but {str(self.root)!r} has no 'latents_flip' (extract with --flip)")
        self.flip = flip
        self.features = features
        self.offsets = np.cumsum([0] + self.sizes).tolist()
        self.base = self.offsets[-1]
        info_file = self.root / LATENT_INFO
        self.info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return self.base * (2 if self.flip else 1)

    def labels(self) -> torch.Tensor:
        """Every label of the set (N,) int64, read shard by shard (small: one int per latent)."""
        from safetensors import safe_open

        out = []
        for f in self.files:
            with safe_open(str(f), framework="pt") as h:
                out.append(h.get_tensor("labels").long().flatten())
        return torch.cat(out)

    def _handle(self, k: int):
        from safetensors import safe_open

        h = self._handles.get(k)
        if h is None:
            h = self._handles[k] = safe_open(str(self.files[k]), framework="pt")
        return h

    def __getitem__(self, i: int) -> tuple:
        if not 0 <= i < len(self):
            raise IndexError(i)
        flipped, j = divmod(i, self.base)
        k = bisect.bisect_right(self.offsets, j) - 1
        row = j - self.offsets[k]
        h = self._handle(k)
        z = h.get_slice("latents_flip" if flipped else "latents")[row:row + 1][0].float()
        y = int(h.get_slice("labels")[row:row + 1][0])
        if self.normalize:
            z = (z - self.mean) / self.std
        if self.features:
            f = h.get_slice("repa_flip" if flipped else "repa")[row:row + 1][0].float()
            return z, y, f
        return z, y

    def __getstate__(self):  # DataLoader workers open their own handles
        d = dict(self.__dict__)
        d["_handles"] = {}
        return d


# ---------------------------------------------------------------------------------------------
# images with horizontal flips, and precomputed DINOv2 features (``vefast extract-features``)

class FlipDataset(Dataset):
    """``dataset`` followed by its horizontally flipped copy: index ``i >= N`` is item ``i - N`` flipped
    (as latent shards store flips). Batches then choose flips through the step sampler's permutation,
    so a flip is part of the data position (no random draw) and precomputed features can follow it."""

    def __init__(self, dataset: Dataset):
        self.dataset, self.n = dataset, len(dataset)

    def __len__(self) -> int:
        return 2 * self.n

    def __getitem__(self, i: int):
        if not 0 <= i < 2 * self.n:
            raise IndexError(i)
        flipped, j = divmod(i, self.n)
        x, *rest = self.dataset[j]
        return (x.flip(-1) if flipped else x, *rest)


FEATURE_INFO = "info.json"


class FeatureShards:
    """DINOv2 features written by ``vefast extract-features``: ``DIR/feat-RRR-KKKKK.safetensors`` with
    ``index`` (N,) dataset indices, ``patch`` (N, D', g, g), ``cls`` (N, D') and, with ``--flip``,
    ``patch_flip`` / ``cls_flip``; ``DIR/info.json`` records how they were computed."""

    def __init__(self, root: str | Path):
        from safetensors import safe_open

        self.root = Path(root)
        info = self.root / FEATURE_INFO
        if not info.is_file():
            raise ValueError(f"features: {str(self.root)!r} has no {FEATURE_INFO}; write the features with "
                             "`vefast extract-features`")
        self.info = json.loads(info.read_text())
        self.files = sorted(self.root.glob("feat-*.safetensors"))
        n = int(self.info.get("num_images", 0))
        self.file_of = np.full(n, -1, dtype=np.int32)
        self.row_of = np.zeros(n, dtype=np.int64)
        for k, f in enumerate(self.files):
            with safe_open(str(f), framework="pt") as h:
                idx = h.get_tensor("index").numpy()
            if idx.size and (idx.min() < 0 or idx.max() >= n):
                raise ValueError(f"features: {str(f)!r} holds indices outside [0, {n})")
            self.file_of[idx] = k
            self.row_of[idx] = np.arange(idx.size)
        absent = int((self.file_of < 0).sum())
        if absent:
            raise ValueError(f"features: {str(self.root)!r} lacks the features of {absent} of its {n} images "
                             "(an unfinished extraction?)")
        self._handles: dict[int, object] = {}

    def get(self, i: int, flipped: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        from safetensors import safe_open

        k, row = int(self.file_of[i]), int(self.row_of[i])
        h = self._handles.get(k)
        if h is None:
            h = self._handles[k] = safe_open(str(self.files[k]), framework="pt")
        sfx = "_flip" if flipped else ""
        return (h.get_slice("patch" + sfx)[row:row + 1][0].float(), h.get_slice("cls" + sfx)[row:row + 1][0].float())

    def __getstate__(self):  # DataLoader workers open their own handles
        d = dict(self.__dict__)
        d["_handles"] = {}
        return d


class ImageFeatureDataset(Dataset):
    """(image, label, patch features, class token) of ``dataset`` with its precomputed DINOv2
    features; with ``flip`` the flipped copy follows (index ``>= N``), paired with the features of the
    flipped image."""

    def __init__(self, dataset: Dataset, features: FeatureShards, flip: bool = False):
        n = len(dataset)
        if int(features.info.get("num_images", -1)) != n:
            raise ValueError(f"features: {str(features.root)!r} holds {features.info.get('num_images')} images, "
                             f"the dataset {n}")
        if flip and not features.info.get("flip"):
            raise ValueError(f"features: train.flip needs the features of flipped images: {str(features.root)!r} "
                             "was extracted without --flip")
        self.dataset, self.features, self.n, self.flip = dataset, features, n, flip

    def __len__(self) -> int:
        return self.n * (2 if self.flip else 1)

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        flipped, j = divmod(i, self.n)
        x, y = self.dataset[j]
        patch, cls = self.features.get(j, bool(flipped))
        return (x.flip(-1) if flipped else x), y, patch, cls
