"""Image grids the recipes write: DiT sample grids (one class per row, the classes in the file name) and
tokenizer reconstruction grids (inputs above, reconstructions below). Images are in [-1, 1]."""
from __future__ import annotations

import math
from pathlib import Path

import torch

# DiT's sample.py classes (golden retriever, otter, red panda, geyser, macaw, valley, balloon, arctic fox)
IMAGENET_GRID_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> uint8, ``round((x + 1) * 127.5)`` after clamping."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Save images in [-1, 1] (N, 3, H, W) as one PNG grid of ``nrow`` images per row (default: square)."""
    from PIL import Image

    n, _, h, w = images.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / nrow))
    grid = torch.zeros(3, rows * h, nrow * w, dtype=torch.uint8)
    u8 = to_uint8(images).cpu()
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[:, r * h:(r + 1) * h, c * w:(c + 1) * w] = u8[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
    return path


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, images per row) of an ``n``-image grid: square-ish, e.g. 64 -> 8 x 8, 4 -> 2 x 2."""
    per_row = max(1, int(math.ceil(math.sqrt(n))))
    return int(math.ceil(n / per_row)), per_row


def grid_classes(num_classes: int, rows: int, classes: list[int] | tuple[int, ...] | None = None) -> list[int]:
    """The class of each grid row: ``classes`` (cycled), else DiT's ImageNet classes for 1000 classes,
    else ``rows`` classes spread evenly over ``range(num_classes)``."""
    if classes:
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"grid classes {bad} are outside [0, {num_classes})")
        return [int(classes[r % len(classes)]) for r in range(rows)]
    if num_classes == 1000:
        return [IMAGENET_GRID_CLASSES[r % len(IMAGENET_GRID_CLASSES)] for r in range(rows)]
    return [(r * num_classes) // rows % num_classes for r in range(rows)]


def grid_labels(n: int, num_classes: int, classes=None) -> tuple[torch.Tensor, list[int], int]:
    """(labels (n,), the class of each row, images per row) for an ``n``-image class grid, row-major."""
    rows, per_row = grid_shape(n)
    row_classes = grid_classes(num_classes, rows, classes)
    labels = torch.tensor([row_classes[i // per_row] for i in range(n)], dtype=torch.int64)
    return labels, row_classes, per_row


def grid_filename(step: int, row_classes: list[int]) -> str:
    """``step-00001000-classes-207-360-....png``: the step and the class of each row."""
    return f"step-{step:08d}-classes-{'-'.join(str(c) for c in row_classes)}.png"


def save_reconstruction_grid(inputs: torch.Tensor, recons: torch.Tensor, path: str | Path,
                             max_images: int = 8) -> Path:
    """Inputs in the top row, their reconstructions below (the first ``max_images``), one PNG."""
    n = min(max_images, inputs.shape[0], recons.shape[0])
    if n == 0:
        raise ValueError("save_reconstruction_grid: no images")
    both = torch.cat([inputs[:n].float().cpu(), recons[:n].float().cpu()])
    return save_grid(both, path, nrow=n)
