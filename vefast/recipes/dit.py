"""``vefast train-dit``: DiT / SiT / LightningDiT with flow matching on tokenizer latents.

Training (time convention of MATH §4: t = 0 noise, t = 1 data):

    x1 = (latent - mean) / std          per-channel stats of the latent directory
    t  ~ uniform | logit_normal(m, s) | vr (a ``vefast vr-table`` file, or computed at start)
    x_t = alpha(t) x1 + sigma(t) eps,   u = alpha'(t) x1 + sigma'(t) eps     (``vefast.path``)
    L  = mean || v_theta(x_t, t, y) - u ||^2  (+ repa_weight * REPA, -mean cos of projected hidden
         states at ``repa.encoder_depth`` and DINOv2 features stored with the latents)

Labels are dropped with ``transport.label_dropout`` inside the model (the official LabelEmbedder; the
null class ``num_classes`` drives classifier-free guidance). AdamW, or Muon (``torch.optim.Muon``)
for the 2D weights of the Linear layers inside the transformer blocks with AdamW for every other
parameter (seed 000 appendix B); EMA; gradient clipping; bf16 autocast on CUDA. Fused vefast
modules by default (``vefast.nn.patch_lightningdit`` / ``patch_dit``), ``--no-fused`` for the
reference path.

Sampling: Euler or Heun ODE from t = 0 to t = 1 with classifier-free guidance applied only for
t in ``sample.cfg_interval``, decoded with the tokenizer into a PNG grid. FID through torch-fidelity
when it is installed and the Inception weights are present locally (checked at start).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import sys
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn as nn

from .config import ConfigError, check_resume_config, config_to_dict, dump_config, load_config, require


# ----------------------------------------------------------------------------------------------
# config schema

@dataclasses.dataclass
class DiTModelConfig:
    name: str = "LightningDiT-B/1"
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    fused: bool = True
    grad_checkpointing: bool = False
    compile: bool = False


@dataclasses.dataclass
class TransportConfig:
    path: Literal["linear", "cosine", "vp"] = "linear"
    timesteps: Literal["uniform", "logit_normal", "vr"] = "uniform"
    logit_m: float = 0.0
    logit_s: float = 1.0
    vr_table: Optional[str] = None
    vr_num_data: int = 200
    vr_num_noise: int = 500
    vr_num_t: int = 1000
    label_dropout: float = 0.1

    def check(self) -> None:
        require(0.0 <= self.label_dropout < 1.0, f"transport.label_dropout must be in [0, 1), got {self.label_dropout}")
        require(self.logit_s > 0, f"transport.logit_s must be > 0, got {self.logit_s}")
        require(self.vr_num_data >= 2, f"transport.vr_num_data must be >= 2, got {self.vr_num_data}")
        if self.vr_table is not None:
            require(self.timesteps == "vr", f"transport.vr_table is set but transport.timesteps is {self.timesteps!r} (use 'vr')")
            require(Path(self.vr_table).is_file(), f"transport.vr_table: no such file {self.vr_table!r} "
                    "(write one with `vefast vr-table`, or leave it unset to compute the table at start)")


@dataclasses.dataclass
class DiTOptimConfig:
    name: Literal["adamw", "muon"] = "adamw"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    muon_lr: Optional[float] = None
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0
    muon_adjust_lr: Optional[Literal["original", "match_rms_adamw"]] = "match_rms_adamw"
    warmup_steps: int = 0
    grad_clip: float = 1.0
    ema: float = 0.9999

    def check(self) -> None:
        require(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        require(0.0 <= self.ema < 1.0, f"optim.ema must be in [0, 1), got {self.ema}")
        require(self.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        require(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclasses.dataclass
class REPAConfig:
    weight: float = 0.0
    encoder_depth: int = 8
    proj_dim: int = 2048

    def check(self) -> None:
        require(self.weight >= 0, f"repa.weight must be >= 0 (0 disables), got {self.weight}")
        require(self.encoder_depth >= 1, f"repa.encoder_depth must be >= 1, got {self.encoder_depth}")


@dataclasses.dataclass
class SampleConfig:
    sampler: Literal["euler", "heun"] = "euler"
    steps: int = 50
    cfg_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    t_end: Optional[float] = None
    num_images: int = 16
    every: int = 0
    use_ema: bool = True
    tokenizer: Optional[str] = None
    fid_images: int = 0
    fid_reference: Optional[str] = None
    inception_weights: Optional[str] = None

    def check(self) -> None:
        require(self.steps >= 1, f"sample.steps must be >= 1, got {self.steps}")
        require(self.cfg_scale >= 1.0, f"sample.cfg_scale must be >= 1 (1 = no guidance), got {self.cfg_scale}")
        lo, hi = self.cfg_interval
        require(0.0 <= lo <= hi <= 1.0, f"sample.cfg_interval must satisfy 0 <= lo <= hi <= 1, got {list(self.cfg_interval)}")
        require(self.num_images >= 1, f"sample.num_images must be >= 1, got {self.num_images}")
        require(self.every >= 0, f"sample.every must be >= 0 (0 = at the end only), got {self.every}")
        require(self.fid_images >= 0, f"sample.fid_images must be >= 0, got {self.fid_images}")
        if self.t_end is not None:
            require(0.0 < self.t_end <= 1.0, f"sample.t_end must be in (0, 1], got {self.t_end}")


@dataclasses.dataclass
class DiTTrainConfig:
    batch_size: int = 32
    steps: int = 400_000
    precision: Literal["bf16", "fp32"] = "bf16"
    num_workers: int = 4
    flip: bool = False
    log_every: int = 100
    ckpt_every: int = 10_000
    keep_checkpoints: int = 3
    device: Literal["auto", "cpu", "cuda"] = "auto"
    tensorboard: bool = False

    def check(self) -> None:
        for k in ("batch_size", "steps", "log_every", "ckpt_every"):
            require(getattr(self, k) > 0, f"train.{k} must be > 0, got {getattr(self, k)}")
        require(self.num_workers >= 0, f"train.num_workers must be >= 0, got {self.num_workers}")


@dataclasses.dataclass
class DiTConfig:
    seed: int = 0
    num_classes: int = 1000
    model: DiTModelConfig = dataclasses.field(default_factory=DiTModelConfig)
    transport: TransportConfig = dataclasses.field(default_factory=TransportConfig)
    optim: DiTOptimConfig = dataclasses.field(default_factory=DiTOptimConfig)
    repa: REPAConfig = dataclasses.field(default_factory=REPAConfig)
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)
    train: DiTTrainConfig = dataclasses.field(default_factory=DiTTrainConfig)

    def check(self) -> None:
        require(self.num_classes >= 1, f"num_classes must be >= 1, got {self.num_classes}")


# ----------------------------------------------------------------------------------------------
# model



def _registries() -> dict[str, tuple[str, Any]]:
    """name -> (family, constructor), for every published config and the model classes themselves."""
    from ..models import dit as dit_mod
    from ..models import lightningdit as ldit_mod

    reg: dict[str, tuple[str, Any]] = {}
    for family, mod, dicts in (("dit", dit_mod, ("DiT_models", "SiT_models")), ("lightningdit", ldit_mod, ("LightningDiT_models",))):
        for d in dicts:
            for k, v in getattr(mod, d, {}).items():
                reg[k] = (family, v)
        for cls_name in ("DiT", "SiT", "LightningDiT"):
            cls = getattr(mod, cls_name, None)
            if isinstance(cls, type) and cls_name not in reg:
                reg[cls_name] = (family, cls)
    return reg


def build_dit(cfg: DiTConfig, latent_shape: tuple[int, int, int]) -> tuple[nn.Module, str]:
    """The model of ``cfg.model`` for latents (C, h, w); returns (model, family). Fused unless ``fused=False``."""
    reg = _registries()
    mc = cfg.model
    if mc.name not in reg:
        raise ConfigError(f"model.name {mc.name!r} is not a known model; known: {', '.join(sorted(reg))}")
    family, ctor = reg[mc.name]
    c, h, w = latent_shape
    if h != w:
        raise ConfigError(f"latents must be square for DiT models, got {h}x{w}")
    kwargs = dict(input_size=h, in_channels=c, num_classes=cfg.num_classes, class_dropout_prob=cfg.transport.label_dropout)
    overlap = sorted(set(kwargs) & set(mc.kwargs))
    if overlap:
        raise ConfigError(f"model.kwargs must not set {overlap}: they come from the latents and the transport config")
    kwargs.update(mc.kwargs)
    try:
        model = ctor(**kwargs)
    except TypeError as e:
        raise ConfigError(f"model {mc.name!r}: bad model.kwargs {mc.kwargs} ({e})") from None
    if mc.fused:
        from .. import nn as vnn

        model = vnn.patch_lightningdit(model) if family == "lightningdit" else vnn.patch_dit(model)
    if mc.grad_checkpointing:
        enable_grad_checkpointing(model)
    return model, family


class CheckpointedBlocks(nn.ModuleList):
    """``model.blocks`` with activation checkpointing: the same modules under the same keys (state
    dicts are unchanged), but iterating yields callables that run each block under
    ``torch.utils.checkpoint`` (non-reentrant) while training. An explicit container swap, made by
    :func:`enable_grad_checkpointing`; indexing still returns the blocks themselves."""

    def __iter__(self):
        from torch.utils.checkpoint import checkpoint

        for block in super().__iter__():
            if self.training and torch.is_grad_enabled():
                yield lambda *a, _b=block, **k: checkpoint(_b, *a, use_reentrant=False, **k)
            else:
                yield block


def enable_grad_checkpointing(model: nn.Module) -> nn.Module:
    """Swap ``model.blocks`` (an ``nn.ModuleList`` iterated by the model's forward) for :class:`CheckpointedBlocks`."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ConfigError(f"model.grad_checkpointing: {type(model).__name__} has no .blocks ModuleList to checkpoint")
    swapped = CheckpointedBlocks(list(blocks))
    swapped.train(blocks.training)
    model.blocks = swapped
    return model


def _hidden_size(model: nn.Module) -> int:
    """Token width D of a DiT-family model (``hidden_size``, else its patch embedding's output channels)."""
    h = getattr(model, "hidden_size", None)
    if isinstance(h, int):
        return h
    proj = getattr(getattr(model, "x_embedder", None), "proj", None)
    if isinstance(proj, nn.Conv2d):
        return proj.out_channels
    raise ConfigError(f"repa: cannot tell the hidden size of {type(model).__name__} (no hidden_size, no x_embedder.proj)")


def velocity(out: torch.Tensor, channels: int) -> torch.Tensor:
    """The velocity prediction: the first ``channels`` output channels (learn_sigma doubles them)."""
    return out[:, :channels] if out.shape[1] != channels else out


class DiTTrainModule(nn.Module):
    """DiT plus the optional REPA projector, one ``forward`` for DDP: returns (velocity, REPA loss or None)."""

    def __init__(self, model: nn.Module, cfg: DiTConfig, hidden_size: int | None, feature_dim: int | None):
        super().__init__()
        self.model = model
        self.channels = None
        self.projector = None
        self._hidden: list[torch.Tensor] = []
        if cfg.repa.weight > 0:
            from ..nn import REPAProjector

            blocks = getattr(model, "blocks", None)
            if blocks is None or len(blocks) < cfg.repa.encoder_depth:
                raise ConfigError(f"repa.encoder_depth={cfg.repa.encoder_depth}: the model has "
                                  f"{0 if blocks is None else len(blocks)} blocks")
            self.projector = REPAProjector(hidden_size, feature_dim, proj_dim=cfg.repa.proj_dim)
            blocks[cfg.repa.encoder_depth - 1].register_forward_hook(self._capture)

    def _capture(self, module, inputs, output) -> None:
        self._hidden.append(output[0] if isinstance(output, tuple) else output)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, features: torch.Tensor | None = None):
        self._hidden.clear()
        out = self.model(x, t, y)
        repa = None
        if self.projector is not None and features is not None:
            from .. import repa_loss

            h = self._hidden[-1]
            proj = self.projector(h.float())
            target = features.flatten(2).transpose(1, 2).float()
            repa = repa_loss(proj, target)
        self._hidden.clear()
        return out, repa


# ----------------------------------------------------------------------------------------------
# timesteps, optimizer, EMA

def build_timestep_sampler(cfg: DiTConfig, dataset, device: torch.device):
    import vefast

    tc = cfg.transport
    if tc.timesteps == "uniform":
        return vefast.UniformSampler()
    if tc.timesteps == "logit_normal":
        return vefast.LogitNormalSampler(tc.logit_m, tc.logit_s)
    if tc.vr_table is not None:
        return vefast.VRTimestepSampler.load(tc.vr_table)
    g = torch.Generator().manual_seed(cfg.seed)
    n = min(tc.vr_num_data, len(dataset))
    idx = torch.randperm(len(dataset), generator=g)[:n].tolist()
    x1 = torch.stack([dataset[i][0] for i in idx]).float()
    return vefast.VRTimestepSampler.from_data(x1, tc.path, num_noise=tc.vr_num_noise, num_t=tc.vr_num_t, generator=g)


def muon_param_split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(Muon params, AdamW params): 2D weights of Linear layers inside ``model.blocks`` go to Muon;
    embeddings, the final layer, biases and norm weights go to AdamW (Muon is for hidden matrices)."""
    blocks = getattr(model, "blocks", None)
    muon_ids = set()
    if blocks is not None:
        for m in blocks.modules():
            if isinstance(m, nn.Linear) and m.weight.ndim == 2:
                muon_ids.add(id(m.weight))
    muon = [p for p in model.parameters() if id(p) in muon_ids and p.requires_grad]
    rest = [p for p in model.parameters() if id(p) not in muon_ids and p.requires_grad]
    return muon, rest


def build_optimizers(module: DiTTrainModule, oc: DiTOptimConfig) -> list[torch.optim.Optimizer]:
    if oc.name == "adamw":
        return [torch.optim.AdamW(module.parameters(), lr=oc.lr, betas=oc.betas, weight_decay=oc.weight_decay)]
    if not hasattr(torch.optim, "Muon"):
        raise ConfigError(f"optim.name='muon' needs torch.optim.Muon (torch >= 2.9), this is torch {torch.__version__}")
    muon, rest = muon_param_split(module.model)
    if not muon:
        raise ConfigError("optim.name='muon': the model has no Linear layers under .blocks for Muon")
    if module.projector is not None:
        rest += list(module.projector.parameters())
    kw = {} if oc.muon_adjust_lr is None or oc.muon_adjust_lr == "original" else {"adjust_lr_fn": oc.muon_adjust_lr}
    return [torch.optim.Muon(muon, lr=oc.muon_lr or oc.lr, momentum=oc.muon_momentum, weight_decay=oc.muon_weight_decay, **kw),
            torch.optim.AdamW(rest, lr=oc.lr, betas=oc.betas, weight_decay=oc.weight_decay)]


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model`` over parameters; buffers copied."""
    ep = [p for p in ema.parameters()]
    mp = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ep, mp, 1.0 - decay)
    for eb, mb in zip(ema.buffers(), model.buffers()):
        eb.copy_(mb)


# ----------------------------------------------------------------------------------------------
# sampling

@torch.no_grad()
def sample_ode(model: nn.Module, noise: torch.Tensor, y: torch.Tensor, *, num_classes: int, steps: int = 50,
               sampler: str = "euler", cfg_scale: float = 1.0, cfg_interval: tuple[float, float] = (0.0, 1.0),
               t_end: float = 1.0, precision: str = "fp32") -> torch.Tensor:
    """Integrate dx/dt = v(x, t, y) from t = 0 (``noise``) to ``t_end`` (data) with ``steps`` Euler or Heun steps.

    Classifier-free guidance ``v = v_u + cfg_scale (v_c - v_u)`` (null class = ``num_classes``) only
    where t lies in ``cfg_interval`` (the guidance interval, Kynkäänniemi et al. 2024; LightningDiT
    uses (0.11, 1) in this t = 1-data convention).
    """
    from .distributed import autocast

    if sampler not in ("euler", "heun"):
        raise ValueError(f"sampler: expected 'euler' or 'heun', got {sampler!r}")
    c = noise.shape[1]
    b = noise.shape[0]
    null = torch.full_like(y, num_classes)

    def v(x: torch.Tensor, t: float) -> torch.Tensor:
        tt = torch.full((b,), t, device=x.device, dtype=torch.float32)
        guided = cfg_scale > 1.0 and cfg_interval[0] <= t <= cfg_interval[1]
        with autocast(x.device, precision):
            if guided:
                out = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, null]))
            else:
                out = model(x, tt, y)
        out = velocity(out.float(), c)
        if guided:
            vc, vu = out.chunk(2)
            return vu + cfg_scale * (vc - vu)
        return out

    ts = torch.linspace(0.0, t_end, steps + 1).tolist()
    x = noise.float()
    for i in range(steps):
        t0, t1 = ts[i], ts[i + 1]
        d0 = v(x, t0)
        if sampler == "euler":
            x = x + (t1 - t0) * d0
        else:
            xe = x + (t1 - t0) * d0
            x = x + (t1 - t0) * 0.5 * (d0 + v(xe, t1))
    return x


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Save images in [-1, 1] (N, 3, H, W) as one PNG grid."""
    from PIL import Image

    n, _, h, w = images.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / nrow))
    grid = torch.zeros(3, rows * h, nrow * w, dtype=torch.uint8)
    u8 = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[:, r * h:(r + 1) * h, c * w:(c + 1) * w] = u8[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
    return path


def fid_check(sc: SampleConfig) -> None:
    """Fail at start when FID is requested but cannot run offline."""
    if sc.fid_images <= 0:
        return
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        raise ConfigError("sample.fid_images > 0 needs torch-fidelity (pip install torch-fidelity); "
                          "or set sample.fid_images=0") from None
    if sc.inception_weights is None or not Path(sc.inception_weights).is_file():
        raise ConfigError(
            "sample.fid_images > 0 needs the Inception-v3 FID weights as a local file: set sample.inception_weights "
            "to the path of torch-fidelity's weights-inception-2015-12-05-6726825d.pth (from its GitHub releases, "
            "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth); "
            f"got {sc.inception_weights!r}")
    if sc.fid_reference is None or not Path(sc.fid_reference).exists():
        raise ConfigError(f"sample.fid_images > 0 needs sample.fid_reference, a directory of reference images; got {sc.fid_reference!r}")


def compute_fid(sample_dir: Path, sc: SampleConfig) -> float:
    import torch_fidelity

    metrics = torch_fidelity.calculate_metrics(
        input1=str(sample_dir), input2=str(sc.fid_reference), fid=True, cuda=torch.cuda.is_available(),
        feature_extractor_weights_path=sc.inception_weights, verbose=False)
    return float(metrics["frechet_inception_distance"])


# ----------------------------------------------------------------------------------------------
# command

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="lightningdit_b1.yaml",
                        help="YAML config: a path or the name of a shipped config (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set optim.name=muon (repeatable)")
    parser.add_argument("--latents", required=True, help="latent directory written by `vefast extract-latents`")
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    parser.add_argument("--no-fused", action="store_true", help="reference modules instead of vefast's fused ones")
    parser.add_argument("--sample-only", action="store_true",
                        help="no training: load the latest checkpoint of --out, sample a grid (and FID if configured)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    overrides = list(args.set) + (["model.fused=false"] if args.no_fused else [])
    try:
        cfg = load_config(DiTConfig, args.config, overrides)
    except ConfigError as e:
        print(f"vefast train-dit: {e}", file=sys.stderr)
        return 2
    try:
        return train(cfg, latents=Path(args.latents), out=Path(args.out), resume=args.resume or args.sample_only,
                     progress=not args.no_progress, sample_only=args.sample_only)
    except ConfigError as e:
        print(f"vefast train-dit: {e}", file=sys.stderr)
        return 2


def _open_latents(cfg: DiTConfig, latents: Path):
    from .data import LatentShardDataset

    try:
        ds = LatentShardDataset(latents, flip=cfg.train.flip, features=cfg.repa.weight > 0)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return ds


def _tokenizer_path(cfg: DiTConfig, ds) -> str | None:
    return cfg.sample.tokenizer or ds.info.get("tokenizer")


def train(cfg: DiTConfig, *, latents: Path, out: Path, resume: bool = False, progress: bool = True,
          sample_only: bool = False) -> int:
    from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from .data import step_loader
    from .distributed import autocast, barrier, cleanup, init_distributed, replica_divergence, reseed, wrap_ddp
    from .metrics import JSONLLogger, Progress
    import vefast

    tc, oc = cfg.train, cfg.optim
    # --- checks that must fail before the first step -----------------------------------------
    ds = _open_latents(cfg, latents)
    fid_check(cfg.sample)
    tok_path = _tokenizer_path(cfg, ds)
    if tok_path is None or not Path(tok_path).exists():
        raise ConfigError(f"sampling needs the tokenizer that wrote {str(latents)!r} to decode: set sample.tokenizer "
                          f"(the train-tokenizer run directory); got {tok_path!r}")
    repa_dim = None
    if cfg.repa.weight > 0:
        repa_dim = ds.info.get("repa_feature_dim")
        if repa_dim is None:
            raise ConfigError("repa.weight > 0 needs DINOv2 features stored with the latents: "
                              "re-run `vefast extract-latents ... --repa-dinov2 NAME`")
    dist_info = init_distributed(tc.device)
    device = dist_info.device
    if len(ds) < tc.batch_size * dist_info.world_size:
        raise ConfigError(f"latents: {len(ds)} samples, fewer than one global batch ({tc.batch_size} x {dist_info.world_size})")
    ckpt = None
    start_step = 0
    if resume:
        if latest_checkpoint(out) is None:
            raise ConfigError(f"--resume: {str(out)!r} has no checkpoint to resume from")
        ckpt = load_checkpoint(out)
        start_step = ckpt.step
        if not sample_only:
            check_resume_config(ckpt.meta.get("config"), cfg, out)
    path = vefast.path(cfg.transport.path)
    t_sampler = build_timestep_sampler(cfg, ds, device)

    torch.manual_seed(cfg.seed)
    model, family = build_dit(cfg, ds.latent_shape)
    module = DiTTrainModule(model, cfg, _hidden_size(model) if cfg.repa.weight > 0 else None, repa_dim).to(device)
    ema = copy.deepcopy(model).to(device).eval().requires_grad_(False)
    opts = build_optimizers(module, oc)
    if ckpt is not None:
        module.model.load_state_dict(ckpt.tensors("model"))
        ema.load_state_dict(ckpt.tensors("ema"))
        if module.projector is not None:
            module.projector.load_state_dict(ckpt.tensors("projector"))
        if not sample_only:
            for i, o in enumerate(opts):
                o.load_state_dict(ckpt.state(f"opt{i}"))
    channels = ds.latent_shape[0]
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not sample_only:
            dump_config(cfg, out / "config.yaml")
    log = JSONLLogger(out / "metrics.jsonl", enabled=dist_info.is_main, tensorboard=tc.tensorboard)

    def do_sample(step: int) -> None:
        if dist_info.is_main:
            res = sample_and_save(cfg, ema if cfg.sample.use_ema else module.model, ds, tok_path, out, step, device)
            log.log(step, **res)
        barrier(dist_info)

    if sample_only:
        do_sample(start_step)
        log.close()
        cleanup()
        return 0

    ddp = wrap_ddp(module, dist_info)
    fwd = torch.compile(ddp) if cfg.model.compile else ddp
    loader = step_loader(ds, tc.batch_size, seed=cfg.seed, rank=dist_info.rank, world_size=dist_info.world_size,
                         start_step=start_step, stop_step=tc.steps, num_workers=tc.num_workers,
                         pin_memory=device.type == "cuda")
    bar = Progress(tc.steps, start_step, tc.batch_size * dist_info.world_size, enabled=progress and dist_info.is_main,
                   desc="train-dit")
    base_lrs = [[g["lr"] for g in o.param_groups] for o in opts]
    step = start_step
    module.train()
    for batch in loader:
        x1, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        feats = batch[2].to(device, non_blocking=True) if len(batch) > 2 else None
        gen = reseed(cfg.seed, step, dist_info.rank, device)
        b = x1.shape[0]
        t = t_sampler.sample(b, device=device, generator=gen).float()
        eps = torch.randn(x1.shape, device=device, generator=gen)
        tb = t.view(b, 1, 1, 1)
        xt = path.alpha(tb) * x1 + path.sigma(tb) * eps
        ut = path.d_alpha(tb) * x1 + path.d_sigma(tb) * eps
        if oc.warmup_steps:
            f = min(1.0, (step + 1) / oc.warmup_steps)
            for o, lrs in zip(opts, base_lrs):
                for g, lr in zip(o.param_groups, lrs):
                    g["lr"] = lr * f
        with autocast(device, tc.precision):
            out_v, repa = fwd(xt, t, y, feats)
        v = velocity(out_v.float(), channels)
        fm = (v - ut.float()).pow(2).mean()
        loss = fm if repa is None else fm + cfg.repa.weight * repa.float()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train-dit: non-finite loss {loss.item()} at step {step}")
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(module.parameters(), oc.grad_clip) if oc.grad_clip > 0 else None
        for o in opts:
            o.step()
        ema_update(ema, module.model, oc.ema)
        step += 1
        img_s = bar.update(step, loss=float(loss.detach()))
        if step % tc.log_every == 0 or step == tc.steps:
            row = {"loss": float(loss.detach()), "fm_loss": float(fm.detach()), "img_per_s": img_s}
            if repa is not None:
                row["repa_loss"] = float(repa.detach())
            if gnorm is not None:
                row["grad_norm"] = float(gnorm)
            log.log(step, **row)
        if step % tc.ckpt_every == 0 or step == tc.steps:
            if dist_info.distributed:
                log.log(step, replica_max_abs_diff=replica_divergence(module, dist_info))
            if dist_info.is_main:
                tensors = {"model": module.model.state_dict(), "ema": ema.state_dict()}
                if module.projector is not None:
                    tensors["projector"] = module.projector.state_dict()
                save_checkpoint(out, step, tensors=tensors, states={f"opt{i}": o.state_dict() for i, o in enumerate(opts)},
                                meta={"kind": "dit", "family": family, "config": config_to_dict(cfg),
                                      "data_position": step, "latents": str(latents),
                                      "rng": {"scheme": "reseed(seed, step, rank)", "seed": cfg.seed},
                                      "world_size": dist_info.world_size}, keep=tc.keep_checkpoints)
            barrier(dist_info)
        if (cfg.sample.every and step % cfg.sample.every == 0) or step == tc.steps:
            do_sample(step)
    bar.close()
    log.close()
    cleanup()
    return 0


@torch.no_grad()
def sample_and_save(cfg: DiTConfig, model: nn.Module, ds, tokenizer: str, out: Path, step: int,
                    device: torch.device) -> dict[str, float]:
    """Sample ``sample.num_images`` class-conditional latents (classes 0, 1, ...), decode, write
    ``out/samples/step-{step:08d}.png``; FID over ``sample.fid_images`` when configured."""
    from .tokenizer import load_tokenizer

    sc = cfg.sample
    ae, _tcfg, _stats = load_tokenizer(tokenizer, device)
    mean, std = ds.mean.to(device), ds.std.to(device)
    t_end = sc.t_end if sc.t_end is not None else (1.0 - 1e-3 if cfg.transport.path == "vp" else 1.0)
    was_training = model.training
    model.eval()

    def generate(n: int, seed: int) -> torch.Tensor:
        g = torch.Generator(device=device).manual_seed(seed)
        noise = torch.randn((n, *ds.latent_shape), device=device, generator=g)
        y = torch.arange(n, device=device) % cfg.num_classes
        z = sample_ode(model, noise, y, num_classes=cfg.num_classes, steps=sc.steps, sampler=sc.sampler,
                       cfg_scale=sc.cfg_scale, cfg_interval=sc.cfg_interval, t_end=t_end, precision=cfg.train.precision)
        return ae.decode(z * std + mean).float().clamp(-1, 1)

    images = generate(sc.num_images, cfg.seed + 12345)
    path = save_grid(images, out / "samples" / f"step-{step:08d}.png")
    res: dict[str, float] = {}
    if sc.fid_images > 0:
        from PIL import Image

        d = out / "samples" / f"fid-step-{step:08d}"
        d.mkdir(parents=True, exist_ok=True)
        done, bs = 0, max(1, cfg.train.batch_size)
        while done < sc.fid_images:
            n = min(bs, sc.fid_images - done)
            imgs = generate(n, cfg.seed + 777 + done)
            u8 = ((imgs + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            for i in range(n):
                Image.fromarray(u8[i]).save(d / f"{done + i:06d}.png")
            done += n
        res["fid"] = compute_fid(d, sc)
    model.train(was_training)
    print(f"train-dit: wrote {path}" + (f", FID {res['fid']:.3f}" if "fid" in res else ""), file=sys.stderr)
    return res
