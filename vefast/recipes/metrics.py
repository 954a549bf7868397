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

    ``resume_step``: the step a resumed run continues from. Rows past it were logged by the run that was
    stopped after its last checkpoint; the resumed run logs those steps again, so they are dropped
    when the logger opens (as is a last line cut short by a kill), and ``metrics.jsonl`` keeps one row
    set per step. Optionally mirrors scalars to TensorBoard when ``tensorboard=True`` and to Weights &
    Biases when ``wandb`` names a project (each imported only then; a clear error when not installed;
    ``WANDB_MODE=offline`` works as usual). A call with no values writes no row.
    """

    def __init__(self, path: str | Path, *, enabled: bool = True, tensorboard: bool = False,
                 resume_step: int | None = None, wandb: str | None = None, config: dict | None = None):
        self.path = Path(path)
        self.enabled = enabled
        self._tb = None
        self._wandb = None
        self.dropped = 0
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None and self.path.is_file():
                self.dropped = truncate_jsonl(self.path, resume_step)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as e:
                    raise ValueError(f"tensorboard=true but TensorBoard is not installed ({e}); pip install tensorboard") from None
                self._tb = SummaryWriter(str(self.path.parent / "tensorboard"))
            if wandb:
                self._wandb = _wandb_run(wandb, self.path.parent, config)

    def log(self, step: int, **values: Any) -> None:
        if not self.enabled or not values:
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
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k not in ("step", "time")},
                            step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _wandb_run(project: str, run_dir: Path, config: dict | None):
    """A Weights & Biases run (project ``project``, named after the run directory), resumed by id when the
    directory already has one (``wandb_id``)."""
    try:
        import wandb
    except ImportError as e:
        raise ValueError(f"train.wandb={project!r} but Weights & Biases is not installed ({e}); pip install wandb, "
                         "or leave train.wandb unset") from None
    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
    id_file.write_text(run_id + "\n")
    return wandb.init(project=project, name=run_dir.name, id=run_id, resume="allow", dir=str(run_dir), config=config)

def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def truncate_jsonl(path: str | Path, last_step: int) -> int:
    """Keep the rows of ``path`` with ``step <= last_step`` (and drop unparsable lines), rewriting the
    file atomically; returns the number of lines dropped."""
    import os
    import tempfile

    path = Path(path)
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > last_step:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return dropped


class Progress:
    """tqdm bar over training steps (rank 0 only) showing it/s, img/s (global batch per step) and the
    values last passed to :meth:`update` (the recipes pass them at log steps only: reading a loss on
    the host every step would stall the GPU)."""

    def __init__(self, total: int, initial: int, global_batch: int, *, enabled: bool = True, desc: str = "train"):
        self.global_batch = global_batch
        self._bar = None
        self._postfix: dict[str, str] = {}
        self._t0, self._n0 = time.perf_counter(), initial
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="it", dynamic_ncols=True)

    def update(self, step: int, **postfix: float) -> float:
        """Advance to ``step``, showing ``postfix`` (host numbers) from now on; returns the running img/s."""
        dt = max(time.perf_counter() - self._t0, 1e-9)
        img_s = (step - self._n0) * self.global_batch / dt
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._postfix.update({k: f"{v:.4g}" for k, v in postfix.items()})
            self._bar.set_postfix({"img/s": f"{img_s:.1f}", **self._postfix}, refresh=False)
        return img_s

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# ----------------------------------------------------------------------------------------------
# host reads at log steps, and the non-finite guard

def host_values(values: dict[str, torch.Tensor | float | None]) -> dict[str, float]:
    """Scalar tensors (any devices) as Python floats with one device->host read per device (a sync:
    for log steps only); numbers pass through and None entries are dropped."""
    out: dict[str, float] = {k: float(v) for k, v in values.items() if v is not None and not isinstance(v, torch.Tensor)}
    by_device: dict[torch.device, list[str]] = {}
    for k, v in values.items():
        if isinstance(v, torch.Tensor):
            by_device.setdefault(v.device, []).append(k)
    for keys in by_device.values():
        got = torch.stack([values[k].detach().reshape(()).float() for k in keys]).tolist()
        out.update(zip(keys, got))
    return {k: out[k] for k in values if k in out}


def log_train_step(step: int, last_step: int, every: int, metrics: dict, guard: "NonFiniteGuard",
                   bar: "Progress", log: "JSONLLogger") -> None:
    """After training step ``step``: at log steps (every ``every`` and the last) check the guard, read the
    step's metrics to the host once, add img/s and log the row; otherwise only advance the bar (no host
    read: the step stays free of syncs)."""
    if step % every == 0 or step == last_step:
        guard.check(step)
        row = host_values(metrics)
        row["img_per_s"] = bar.update(step, loss=row["loss"])
        log.log(step, **row)
    else:
        bar.update(step)


def all_finite(tensors) -> bool:
    """Whether every floating tensor of ``tensors`` is finite: device-side reductions, one host read
    per device (a sync: for checkpoint steps)."""
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
            flags.setdefault(t.device, []).append(torch.isfinite(t).all())
    return all(bool(torch.stack(v).all()) for v in flags.values())


def _state_tensors(obj):
    """Every tensor inside a (nested) state dict / list."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _state_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _state_tensors(v)


class NonFiniteGuard:
    """Device-side record of the first training step whose monitored values were not all finite.

    :meth:`update` runs every step with no host read: it folds ``isfinite`` of the step's values (loss,
    gradient norm, parameter norm, ...) into ``ok``, the 0-dim bool "all finite so far" (sticky), which
    the recipes use to mask the EMA update, and records the first bad step and which values were bad.
    :meth:`check` reads that record (one host read) and raises ``FloatingPointError`` naming the step;
    the recipes call it at log, sample and checkpoint steps, before anything is logged or saved, and
    :meth:`check_save` also verifies every tensor about to be written. So a non-finite value never
    reaches a checkpoint, and, masked by ``ok``, never reaches the EMA. See docs/training.md.
    """

    def __init__(self, what: str, device: torch.device | str, *, ema: bool = False):
        self.what = what
        self.kept = "the EMA or a checkpoint" if ema else "a checkpoint"
        self.device = torch.device(device)
        self.ok = torch.ones((), dtype=torch.bool, device=self.device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=self.device)
        self.names: tuple[str, ...] = ()
        self.first_flags: torch.Tensor | None = None
        self._false = torch.zeros((), dtype=torch.bool, device=self.device)

    def update(self, step: int, **values: torch.Tensor | None) -> torch.Tensor:
        """Fold in the values of (1-based) ``step`` (the same names every step; None = not computed
        this step); returns ``ok``. Device work only, no host read."""
        names = tuple(values)
        if not self.names:
            self.names = names
            self.first_flags = torch.zeros(len(names), dtype=torch.bool, device=self.device)
        elif names != self.names:
            raise ValueError(f"NonFiniteGuard.update: values {list(names)}, expected {list(self.names)} as before")
        bad = torch.stack([self._false if v is None else ~torch.isfinite(v.detach()).all() for v in values.values()])
        step_bad = bad.any()
        newly = self.ok & step_bad
        self.first_bad.copy_(torch.where(newly, step, self.first_bad))
        self.first_flags.copy_(torch.where(newly, bad, self.first_flags))
        self.ok &= ~step_bad
        return self.ok

    def check(self, step: int) -> None:
        """Raise ``FloatingPointError`` if any step so far had a non-finite value (one host read)."""
        first = int(self.first_bad)
        if first >= 0:
            which = [n for n, b in zip(self.names, self.first_flags.tolist()) if b]
            raise FloatingPointError(
                f"{self.what}: non-finite {', '.join(which)} at step {first} (detected at step {step}): nothing from "
                f"step {first} on reached {self.kept}. Resume from the last checkpoint with a lower "
                "learning rate or gradient clipping.")

    def check_save(self, step: int, **states) -> None:
        """:meth:`check`, then refuse to save when any tensor of ``states`` (state dicts) is not finite."""
        self.check(step)
        for name, state in states.items():
            if not all_finite(_state_tensors(state)):
                raise FloatingPointError(f"{self.what}: {name} holds non-finite values at step {step}; "
                                         "refusing to write the checkpoint")
