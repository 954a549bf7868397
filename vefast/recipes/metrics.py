"""Image metrics (PSNR, SSIM, LPIPS) and the JSONL metrics log of the recipes.

Images are in [-1, 1] (the recipes' convention); PSNR and SSIM are computed on [0, 1].
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1]: ``10 log10(1 / mse)`` on [0, 1], (B,) float32."""
    a = ((x.float() + 1) / 2).clamp(0, 1)
    b = ((y.float() + 1) / 2).clamp(0, 1)
    mse = (a - b).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(x: torch.Tensor, y: torch.Tensor, *, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, valid
    convolution, mean over channels and positions) of images in [-1, 1], computed on [0, 1]; (B,)."""
    a = ((x.float() + 1) / 2).clamp(0, 1)
    b = ((y.float() + 1) / 2).clamp(0, 1)
    c = a.shape[1]
    window = min(window, a.shape[-1], a.shape[-2])
    w = _gaussian_window(window, sigma, c, a.device, a.dtype)
    conv = lambda t: F.conv2d(t, w, groups=c)  # noqa: E731
    mu_a, mu_b = conv(a), conv(b)
    s_aa = conv(a * a) - mu_a**2
    s_bb = conv(b * b) - mu_b**2
    s_ab = conv(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    m = ((2 * mu_a * mu_b + c1) * (2 * s_ab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (s_aa + s_bb + c2))
    return m.flatten(1).mean(1)


def _vgg_weights_file(net: str) -> tuple[Path, str]:
    """Where torchvision keeps the ImageNet backbone weights LPIPS needs, and their URL."""
    import torchvision.models as tvm

    weights = {"vgg": tvm.VGG16_Weights.IMAGENET1K_V1, "alex": tvm.AlexNet_Weights.IMAGENET1K_V1,
               "squeeze": tvm.SqueezeNet1_1_Weights.IMAGENET1K_V1}[net]
    url = weights.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1], url


def build_lpips(net: str = "vgg", pretrained: bool = True) -> torch.nn.Module:
    """``lpips.LPIPS(net=net)`` frozen in eval mode.

    ``pretrained=True``: the LPIPS linear heads shipped in the ``lpips`` package plus the torchvision
    ImageNet backbone, which must already be in the torch hub cache (nothing is downloaded; a clear
    error says where to put it). ``pretrained=False``: random backbone and heads (``pnet_rand=True``)
    — for tests and smoke runs only, the value is not a perceptual distance.
    """
    lpips_check(net, pretrained)
    import lpips

    model = lpips.LPIPS(net=net, pretrained=pretrained, pnet_rand=not pretrained, verbose=False)
    model.eval().requires_grad_(False)
    return model


def lpips_check(net: str, pretrained: bool) -> None:
    """Fail at start (not mid-run) when LPIPS weights are needed and missing."""
    if net not in ("vgg", "alex", "squeeze"):
        raise ValueError(f"lpips net: expected 'vgg', 'alex' or 'squeeze', got {net!r}")
    if pretrained:
        path, url = _vgg_weights_file(net)
        if not path.is_file():
            raise FileNotFoundError(
                f"LPIPS ({net}) needs the torchvision ImageNet backbone weights at {path}, which are not there. "
                f"Download them once (e.g. `wget {url} -P {path.parent}`), "
                "or set loss.lpips_pretrained=false for a random-weight smoke run.")


class JSONLLogger:
    """Append one JSON object per line to ``path`` (rank 0 only; other ranks pass ``enabled=False``).

    Optionally mirrors scalars to TensorBoard when ``tensorboard=True`` and the package is installed.
    """

    def __init__(self, path: str | Path, *, enabled: bool = True, tensorboard: bool = False):
        self.path = Path(path)
        self.enabled = enabled
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as e:
                    raise ValueError(f"tensorboard=true but TensorBoard is not installed ({e}); pip install tensorboard") from None
                self._tb = SummaryWriter(str(self.path.parent / "tensorboard"))

    def log(self, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": time.time()}
        for k, v in values.items():
            if isinstance(v, torch.Tensor):
                v = v.item() if v.numel() == 1 else v.tolist()
            if isinstance(v, float) and not math.isfinite(v):
                v = str(v)
            row[k] = v
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class Progress:
    """tqdm bar over training steps (rank 0 only) showing it/s and img/s (global batch per step)."""

    def __init__(self, total: int, initial: int, global_batch: int, *, enabled: bool = True, desc: str = "train"):
        self.global_batch = global_batch
        self._bar = None
        self._t0, self._n0 = time.perf_counter(), initial
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="it", dynamic_ncols=True)

    def update(self, step: int, **postfix: float) -> float:
        """Advance to ``step``; returns the running img/s."""
        dt = max(time.perf_counter() - self._t0, 1e-9)
        img_s = (step - self._n0) * self.global_batch / dt
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix({"img/s": f"{img_s:.1f}", **{k: f"{v:.4g}" for k, v in postfix.items()}}, refresh=False)
        return img_s

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
