"""``vefast train-dit``: DiT / SiT / LightningDiT with flow matching on tokenizer latents.

Training (time convention of docs/math.md §4: t = 0 noise, t = 1 data):

    x1 = (latent - mean) / std          per-channel stats of the latent directory
    t  ~ uniform | logit_normal(m, s) | vr (a ``vefast vr-table`` file, or computed at start)
    x_t = alpha(t) x1 + sigma(t) eps,   u = alpha'(t) x1 + sigma'(t) eps     (``vefast.path``)
    L  = mean || v_theta(x_t, t, y) - u ||^2  (+ repa_weight * REPA, -mean cos of projected hidden
         states at ``repa.encoder_depth`` and DINOv2 features stored with the latents)

t, the noise and the label drops (``transport.label_dropout``, to the null class ``num_classes`` that
drives classifier-free guidance) are drawn per step for the whole global batch from
``reseed(seed, step)`` and each rank takes its rows, so a step's randomness does not depend on the
rank count or on ``train.grad_accum`` (micro-batches with DDP ``no_sync`` / FSDP2
``set_requires_gradient_sync`` on all but the last). AdamW, or Muon (``torch.optim.Muon``) for the
2D weights of the Linear layers inside the transformer blocks with AdamW for every other parameter
([VE-supp] appendix B); warm-up + constant / cosine learning rate; EMA; gradient clipping; bf16
autocast on CUDA; activation checkpointing per block (``model.grad_checkpointing`` -> the model's
``use_checkpoint``); DDP or FSDP2 (``train.parallel``). Fused vefast modules by default
(``vefast.nn.patch_lightningdit`` / ``patch_dit``), ``--no-fused`` for the reference path.
``model.init_from`` starts from a released DiT / SiT / LightningDiT / REPA checkpoint.

Sampling: Euler or Heun ODE from t = 0 to t = 1 with classifier-free guidance applied only for
t in ``sample.cfg_interval``, decoded with the tokenizer into a PNG grid. FID through torch-fidelity
when it is installed and the Inception weights are present locally (checked at start).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional

import torch
import torch.nn as nn

from .config import (ConfigError, check_resume_config, check_train_batching, config_to_dict, dump_config, load_config,
                     require)
from .distributed import ends_process_group
from .schedule import LRScheduleConfig

if TYPE_CHECKING:
    from .metrics import NonFiniteGuard


# ----------------------------------------------------------------------------------------------
# config schema

@dataclasses.dataclass
class DiTModelConfig:
    name: str = "LightningDiT-B/1"
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    fused: bool = True
    grad_checkpointing: bool = False  # -> the model's use_checkpoint: every block recomputed in the backward
    compile: bool = False
    init_from: Optional[str] = None   # released DiT / SiT / LightningDiT / REPA .pt, or a train-dit run / checkpoint
    init_weights: Literal["ema", "model"] = "ema"


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
    vr_mix_uniform: Optional[float] = None  # uniform floor weight w: (1 - w) pi_VR + w (None: the table's, else 0)
    label_dropout: float = 0.1

    def check(self) -> None:
        require(0.0 <= self.label_dropout < 1.0, f"transport.label_dropout must be in [0, 1), got {self.label_dropout}")
        require(self.logit_s > 0, f"transport.logit_s must be > 0, got {self.logit_s}")
        require(self.vr_num_data >= 2, f"transport.vr_num_data must be >= 2, got {self.vr_num_data}")
        require(self.vr_mix_uniform is None or 0.0 <= self.vr_mix_uniform <= 1.0,
                f"transport.vr_mix_uniform must be in [0, 1] (a mixture weight), got {self.vr_mix_uniform}")
        if self.vr_table is not None:
            require(self.timesteps == "vr", f"transport.vr_table is set but transport.timesteps is {self.timesteps!r} (use 'vr')")
            require(Path(self.vr_table).is_file(), f"transport.vr_table: no such file {self.vr_table!r} "
                    "(write one with `vefast vr-table`, or leave it unset to compute the table at start)")


@dataclasses.dataclass
class DiTOptimConfig(LRScheduleConfig):
    name: Literal["adamw", "muon"] = "adamw"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    muon_lr: Optional[float] = None
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0
    muon_adjust_lr: Optional[Literal["original", "match_rms_adamw"]] = "match_rms_adamw"
    grad_clip: float = 1.0
    ema: float = 0.9999

    def check(self) -> None:
        require(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        require(0.0 <= self.ema < 1.0, f"optim.ema must be in [0, 1), got {self.ema}")
        require(self.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        self.check_schedule()


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
    num_images: int = 64  # the sample grid: 8 x 8 at the model's resolution, one class per row
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
    grad_accum: int = 1
    steps: int = 400_000
    precision: Literal["bf16", "fp32"] = "bf16"
    parallel: Literal["ddp", "fsdp"] = "ddp"
    num_workers: int = 4
    flip: bool = False
    log_every: int = 100
    ckpt_every: int = 10_000
    keep_checkpoints: int = 3
    device: Literal["auto", "cpu", "cuda"] = "auto"
    tensorboard: bool = False
    wandb: Optional[str] = None  # Weights & Biases project to mirror metrics.jsonl to (None: off)
    check_latent_stats: bool = True

    def check(self) -> None:
        check_train_batching(self, ("batch_size", "grad_accum", "steps", "log_every", "ckpt_every"))


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
        if self.train.parallel == "fsdp":
            require(self.optim.name == "adamw", "train.parallel=fsdp needs optim.name=adamw: Muon orthogonalizes "
                    "whole matrices, FSDP shards them")


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
        if not isinstance(getattr(model, "use_checkpoint", None), bool):
            raise ConfigError(f"model.grad_checkpointing: {type(model).__name__} has no use_checkpoint attribute")
        model.use_checkpoint = True
    return model, family


def recipe_label_dropout(model: nn.Module) -> nn.Module:
    """Switch off the model's own label dropout: :func:`train_step` drops labels itself, from the step's
    generator over the global batch (so the drops do not depend on micro-batches or ranks). The
    embedding table keeps its null-class row (``class_dropout_prob > 0`` at construction)."""
    emb = getattr(model, "y_embedder", None)
    if emb is None or not hasattr(emb, "dropout_prob"):
        raise ConfigError(f"{type(model).__name__} has no y_embedder with a dropout_prob (a DiT-style LabelEmbedder)")
    emb.dropout_prob = 0.0
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
    """DiT plus the optional REPA projector, one ``forward`` for DDP: returns (velocity, REPA loss or None).

    REPA reads the output of block ``repa.encoder_depth`` through a forward hook; ``capture_hook=False``
    defers it to :meth:`attach_hook` (the recipe copies the model for its EMA first, so the copy
    carries no hook and no reference to this module)."""

    def __init__(self, model: nn.Module, cfg: DiTConfig, hidden_size: int | None, feature_dim: int | None, *,
                 capture_hook: bool = True):
        super().__init__()
        self.model = model
        self.channels = None
        self.projector = None
        self._hidden: list[torch.Tensor] = []
        self._depth = cfg.repa.encoder_depth
        if cfg.repa.weight > 0:
            from ..nn import REPAProjector

            blocks = getattr(model, "blocks", None)
            if blocks is None or len(blocks) < cfg.repa.encoder_depth:
                raise ConfigError(f"repa.encoder_depth={cfg.repa.encoder_depth}: the model has "
                                  f"{0 if blocks is None else len(blocks)} blocks")
            self.projector = REPAProjector(hidden_size, feature_dim, proj_dim=cfg.repa.proj_dim)
            if capture_hook:
                self.attach_hook()

    def attach_hook(self):
        """Register the REPA capture hook (a no-op without REPA); returns its handle or None."""
        if self.projector is None:
            return None
        return self.model.blocks[self._depth - 1].register_forward_hook(self._capture)

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
        return vefast.VRTimestepSampler.load(tc.vr_table, mix_uniform=tc.vr_mix_uniform)
    g = torch.Generator().manual_seed(cfg.seed)
    n = min(tc.vr_num_data, len(dataset))
    idx = torch.randperm(len(dataset), generator=g)[:n].tolist()
    x1 = torch.stack([dataset[i][0] for i in idx]).float()
    return vefast.VRTimestepSampler.from_data(x1, tc.path, num_noise=tc.vr_num_noise, num_t=tc.vr_num_t, generator=g,
                                              mix_uniform=tc.vr_mix_uniform or 0.0)


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


EMA_CHUNK = 1 << 24  # elements masked per batch of the guarded EMA update (bounds its temporary memory)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, ok: torch.Tensor | None = None) -> None:
    """``ema = decay * ema + (1 - decay) * model`` over parameters; buffers copied.

    ``ok`` (a 0-dim bool tensor, e.g. :attr:`NonFiniteGuard.ok`): where it is False the EMA keeps its
    value, decided on the device (``torch.where``, no host read), so a non-finite model never reaches
    it; where True the result is bitwise the unguarded update. Under FSDP2 both are sharded the same
    way and each rank updates its own shards.
    """
    from .distributed import local_tensor

    ep = [local_tensor(p) for p in ema.parameters()]  # FSDP2: this rank's shards (model and EMA shard alike)
    mp = [local_tensor(p.detach()) for p in model.parameters()]
    if ok is None:
        torch._foreach_lerp_(ep, mp, 1.0 - decay)
    else:
        for lo, hi in _chunks([p.numel() for p in ep], EMA_CHUNK):
            torch._foreach_lerp_(ep[lo:hi], [torch.where(ok, m, e) for m, e in zip(mp[lo:hi], ep[lo:hi])], 1.0 - decay)
    for eb, mb in zip(ema.buffers(), model.buffers()):
        eb.copy_(mb if ok is None or not eb.is_floating_point() else torch.where(ok, mb, eb))


def _chunks(sizes: list[int], budget: int):
    """(lo, hi) index ranges of consecutive items whose sizes sum to about ``budget`` (at least one item)."""
    lo, total = 0, 0
    for i, n in enumerate(sizes):
        if total and total + n > budget:
            yield lo, i
            lo, total = i, 0
        total += n
    if lo < len(sizes):
        yield lo, len(sizes)


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


from .images import save_grid  # noqa: E402  (re-exported: the grid writer lives with the other image grids)


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
        raise ConfigError(f"sample.fid_images > 0 needs sample.fid_reference, an ADM reference batch (.npz) or a "
                          f"directory of reference images; got {sc.fid_reference!r}")


def compute_fid(sample_dir: Path, sc: SampleConfig) -> float:
    """FID of the images in ``sample_dir`` against ``sample.fid_reference`` with ADM's evaluator
    conventions (:mod:`vefast.recipes.fid`: TF-Inception pool_3, stored reference statistics as they are)."""
    from .fid import fid_of_images, image_dir_batches

    _, batches = image_dir_batches(sample_dir, 100)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return fid_of_images(batches, sc.fid_reference, sc.inception_weights, device=device)["fid"]


# ----------------------------------------------------------------------------------------------
# one training step

@dataclasses.dataclass
class DiTStep:
    """Everything one training step touches (built by :func:`train`)."""
    cfg: DiTConfig
    module: DiTTrainModule
    fwd: nn.Module  # ``module``, wrapped by DDP / FSDP2 and/or torch.compile
    sync: nn.Module  # the DDP / FSDP2 module whose gradient sync accumulation switches off (or ``module``)
    ema: nn.Module
    opts: list[torch.optim.Optimizer]
    path: Any
    t_sampler: Any
    guard: NonFiniteGuard
    device: torch.device
    rank: int
    world_size: int
    channels: int
    base_lrs: list[list[float]]  # the configured learning rates (the schedule scales them)
    sharded: bool = False  # FSDP2: parameters are DTensor shards


def global_draws(run: DiTStep, b: int, shape: tuple[int, ...], step: int):
    """(t, eps, label-drop mask) of this rank's ``b`` samples: drawn for the whole global batch from
    ``reseed(seed, step)`` (the same on every rank) and sliced at this rank's rows, so they depend on
    the step only — not on the rank count or on gradient accumulation."""
    from .distributed import reseed

    cfg, device = run.cfg, run.device
    gen = reseed(cfg.seed, step, 0, device)
    n = b * run.world_size
    t = run.t_sampler.sample(n, device=device, generator=gen).float()
    eps = torch.randn((n, *shape), device=device, generator=gen)
    drop = torch.rand(n, device=device, generator=gen) < cfg.transport.label_dropout
    mine = slice(run.rank * b, (run.rank + 1) * b)
    return t[mine], eps[mine], drop[mine]


def train_step(run: DiTStep, batch, step: int) -> dict[str, torch.Tensor]:
    """Optimizer step ``step`` (0-based) on this rank's ``batch``, with no device->host read: returns
    the step's metrics as device tensors (read at log steps), and feeds the loss, gradient norm and
    parameter norm to ``run.guard``, whose "all finite so far" flag masks the EMA update.
    ``train.grad_accum`` micro-batches each backpropagate ``loss / grad_accum`` with gradient sync on
    the last only, which equals one pass over the whole batch up to float rounding (tested)."""
    from .distributed import autocast, grad_sync, plain_tensor
    from .schedule import apply_lr, lr_factor

    cfg, oc, tc, device = run.cfg, run.cfg.optim, run.cfg.train, run.device
    x1, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
    feats = batch[2].to(device, non_blocking=True) if len(batch) > 2 else None
    b = x1.shape[0]
    t, eps, drop = global_draws(run, b, tuple(x1.shape[1:]), step)
    y = torch.where(drop, cfg.num_classes, y)
    tb = t.view(b, 1, 1, 1)
    path = run.path
    xt = path.alpha(tb) * x1 + path.sigma(tb) * eps
    ut = path.d_alpha(tb) * x1 + path.d_sigma(tb) * eps
    factor = lr_factor(step, oc, tc.steps)
    apply_lr(run.opts, run.base_lrs, factor)
    k = tc.grad_accum
    mb = b // k
    for o in run.opts:
        o.zero_grad(set_to_none=True)
    sums: dict[str, torch.Tensor] = {}
    for i in range(k):
        sl = slice(i * mb, (i + 1) * mb)
        with grad_sync(run.sync, i == k - 1):
            with autocast(device, tc.precision):
                out_v, repa = run.fwd(xt[sl], t[sl], y[sl], None if feats is None else feats[sl])
            v = velocity(out_v.float(), run.channels)
            fm = (v - ut[sl].float()).pow(2).mean()
            loss = fm if repa is None else fm + cfg.repa.weight * repa.float()
            (loss / k).backward()
        for name, val in (("loss", loss), ("fm_loss", fm), ("repa_loss", repa)):
            if val is not None:
                sums[name] = val.detach().float() / k + (sums[name] if name in sums else 0.0)
    gnorm = None
    if oc.grad_clip > 0:
        gnorm = plain_tensor(torch.nn.utils.clip_grad_norm_(run.module.parameters(), oc.grad_clip))
    for o in run.opts:
        o.step()
    pnorm = _param_norm(run.module.model, run.sharded)
    ok = run.guard.update(step + 1, loss=sums["loss"], grad_norm=gnorm, param_norm=pnorm)
    ema_update(run.ema, run.module.model, oc.ema, ok=ok)
    metrics = dict(sums)
    if gnorm is not None:
        metrics["grad_norm"] = gnorm
    metrics["param_norm"] = pnorm
    metrics["lr"] = oc.lr * factor
    return metrics


@torch.no_grad()
def _param_norm(model: nn.Module, sharded: bool = False) -> torch.Tensor:
    """||theta||_2 over all parameters, one fused read (non-finite iff a parameter is, up to fp32
    overflow of the sum of squares). FSDP2: the shards' squares summed over the ranks (a collective,
    no host sync), so every rank holds the same value."""
    from .distributed import local_tensor

    norms = torch._foreach_norm([local_tensor(p.detach()) for p in model.parameters()])
    if not sharded:
        return torch.linalg.vector_norm(torch.stack(norms))
    import torch.distributed as dist

    sq = torch.stack(norms).float().square().sum()
    dist.all_reduce(sq)
    return sq.sqrt()


# ----------------------------------------------------------------------------------------------
# command

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="lightningdit_b1.yaml",
                        help="YAML config: a path or the name of a shipped config (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set optim.name=muon (repeatable)")
    parser.add_argument("--latents", required=True,
                        help="latent directory written by `vefast extract-latents` (or LightningDiT's extract_features.py)")
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an --out that holds a run (deletes its checkpoints, metrics, samples)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                        help="where to train (sets train.device; default: the config's, auto = CUDA when available)")
    parser.add_argument("--no-fused", action="store_true", help="reference modules instead of vefast's fused ones")
    parser.add_argument("--sample-only", action="store_true",
                        help="no training: sample a grid (and FID if configured) from the latest checkpoint of --out, "
                             "or from model.init_from when --out has none")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


USER_ERRORS = (ConfigError,)


def main(args: argparse.Namespace) -> int:
    overrides = (list(args.set) + (["model.fused=false"] if args.no_fused else [])
                 + ([f"train.device={args.device}"] if args.device else []))
    cfg = load_config(DiTConfig, args.config, overrides)
    return train(cfg, latents=Path(args.latents), out=Path(args.out), resume=args.resume,
                 overwrite=args.overwrite, progress=not args.no_progress, sample_only=args.sample_only)


def _open_latents(cfg: DiTConfig, latents: Path):
    from .data import LatentShardDataset

    try:
        ds = LatentShardDataset(latents, flip=cfg.train.flip, features=cfg.repa.weight > 0)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return ds


def _tokenizer_path(cfg: DiTConfig, ds) -> str | None:
    return cfg.sample.tokenizer or ds.info.get("tokenizer")


def check_num_classes(cfg: DiTConfig, ds) -> None:
    """``num_classes`` must be the latents' class count (``info.json``; else their largest label + 1):
    a larger one trains embeddings no sample has, a smaller one indexes past the table."""
    n = ds.info.get("num_classes")
    if n is None:
        n = int(ds.labels().max()) + 1
        what = f"labels 0..{n - 1}"
    else:
        what = f"{n} classes (info.json)"
    if int(n) != cfg.num_classes:
        raise ConfigError(f"num_classes={cfg.num_classes} but the latents in {str(ds.root)!r} have {what}: "
                          f"set num_classes={n}")


def latent_stats_mismatch(latent: dict, tok: dict, *, mean_tol: float = 0.5, std_ratio: float = 2.0) -> list[str]:
    """Channels whose latent-set statistics do not fit the tokenizer's own (its checkpoint's
    ``latent_stats``, from ``train.stats_images`` images): a mean further than ``mean_tol`` tokenizer
    stds, or a std ratio outside [1/``std_ratio``, ``std_ratio``]. Loose on purpose (the tokenizer's
    estimate is from a few hundred images); it catches latents of another tokenizer or of another
    checkpoint of a run that trained on. Stats of different posterior modes (sample vs mean) are not
    compared by value."""
    lm, ls, tm, ts = latent["mean"], latent["std"], tok["mean"], tok["std"]
    if len(lm) != len(tm):
        return [f"{len(lm)} latent channels, the tokenizer has {len(tm)}"]
    if latent.get("mode") and tok.get("mode") and latent["mode"] != tok["mode"]:
        return []
    bad = []
    for c, (a, s, b, u) in enumerate(zip(lm, ls, tm, ts)):
        if abs(a - b) > mean_tol * u or not 1.0 / std_ratio <= s / u <= std_ratio:
            bad.append(f"channel {c}: latents mean {a:.3g} std {s:.3g}, tokenizer mean {b:.3g} std {u:.3g}")
    return bad


def check_tokenizer(cfg: DiTConfig, ds, tok_path: str, latents: Path) -> None:
    """Refuse latents that do not come from the tokenizer that will decode the samples: channel count
    always, per-channel statistics where the tokenizer stored them (``train.check_latent_stats``)."""
    from .checkpoint import load_checkpoint, load_tokenizer

    p = Path(tok_path)
    if p.is_file():  # an LDM / VA-VAE weights file: no stored stats, check the channels
        ae, _tcfg, stats = load_tokenizer(p)
        channels = ae.latent_channels
    else:
        try:
            ck = load_checkpoint(p)
        except ValueError as e:
            raise ConfigError(f"sample.tokenizer {tok_path!r}: {e}") from None
        stats = ck.meta.get("latent_stats")
        channels = (ck.meta.get("config") or {}).get("model", {}).get("latent_channels")
    if channels is not None and channels != ds.latent_shape[0]:
        raise ConfigError(f"the latents in {str(latents)!r} have {ds.latent_shape[0]} channels, the tokenizer "
                          f"{tok_path!r} {channels}: they were not extracted with it")
    if stats is None or not cfg.train.check_latent_stats:
        return
    bad = latent_stats_mismatch(ds.stats, stats)
    if bad:
        shown = "; ".join(bad[:4]) + (f"; ... ({len(bad) - 4} more)" if len(bad) > 4 else "")
        raise ConfigError(f"the latents in {str(latents)!r} do not match the statistics of the tokenizer "
                          f"{tok_path!r} ({shown}): they were extracted with another tokenizer, or with an earlier "
                          "checkpoint of a run that has trained on. Re-extract them, point sample.tokenizer at the "
                          "tokenizer that wrote them, or set train.check_latent_stats=false")


def load_init_weights(module: DiTTrainModule, cfg: DiTConfig) -> str:
    """Load ``model.init_from`` into ``module`` (the model, and REPA's projector where the file has one
    and REPA is on); returns a one-line report. Every key is checked (``anchors.load_checked``)."""
    from .anchors import load_checked, pick_state_dict, torch_load_weights
    from .checkpoint import load_checkpoint

    mc = cfg.model
    src = Path(mc.init_from)
    where = f"model.init_from {mc.init_from!r}"
    if src.is_dir():
        try:
            ck = load_checkpoint(src)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        if ck.meta.get("kind") != "dit":
            raise ConfigError(f"{where} is a {ck.meta.get('kind')!r} checkpoint, not a train-dit one")
        sd, took = ck.tensors(mc.init_weights), f"its {mc.init_weights!r} weights"
        proj = ck.tensors("projector") if ck.has("projector") else None
    else:
        sd, took = pick_state_dict(torch_load_weights(src), mc.init_weights, where)
        proj = {k[len("projectors.0."):]: v for k, v in sd.items() if k.startswith("projectors.0.")} or None
    ignored = load_checked(module.model, sd, where, ignore_prefixes=("projectors.",))
    report = f"initialized from {mc.init_from} ({took}, {len(sd) - len(ignored)} tensors)"
    if module.projector is not None and proj is not None:
        load_checked(module.projector, proj, f"{where} (REPA projector)")
        report += ", REPA projector too"
    elif ignored:
        report += f"; ignored {len(ignored)} REPA projector tensors (repa.weight is 0)"
    return report


def _optim_state_to_fqn(sd: dict, names: list[str]) -> dict:
    """A torch optimizer state dict (parameters by index) keyed by parameter names instead: the form
    ``torch.distributed.checkpoint.state_dict.set_optimizer_state_dict`` takes."""
    return {"state": {names[i]: v for i, v in sd["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]}


def _optim_state_to_index(sd: dict, names: list[str]) -> dict:
    """Inverse of :func:`_optim_state_to_fqn`: every checkpoint stores the plain torch form, whatever
    wrote it (so DDP and FSDP runs resume from each other's checkpoints)."""
    pos = {n: i for i, n in enumerate(names)}
    return {"state": {pos[n]: v for n, v in sd["state"].items()},
            "param_groups": [{**g, "params": [pos[n] for n in g["params"]]} for g in sd["param_groups"]]}


def _full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict of an FSDP2 module on rank 0, on the CPU ({} elsewhere); every
    rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _full_optim_state(module: nn.Module, opt: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    sd = get_optimizer_state_dict(module, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return _optim_state_to_index(sd, [n for n, _ in module.named_parameters()]) if sd else {}


def _load_full_optim_state(module: nn.Module, opt: torch.optim.Optimizer, sd: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, opt, _optim_state_to_fqn(sd, [n for n, _ in module.named_parameters()]),
                             options=StateDictOptions(full_state_dict=True))


@ends_process_group
def train(cfg: DiTConfig, *, latents: Path, out: Path, resume: bool = False, overwrite: bool = False,
          progress: bool = True, sample_only: bool = False) -> int:
    from .checkpoint import check_run_dir, clear_run_dir, latest_checkpoint, load_checkpoint, save_checkpoint
    from .data import step_loader
    from .distributed import barrier, fsdp_shard, init_distributed, replica_divergence, wrap_ddp
    from .metrics import JSONLLogger, NonFiniteGuard, Progress, log_train_step
    from .schedule import base_lrs as configured_lrs
    import vefast

    tc = cfg.train
    # --- checks that must fail before the first step -----------------------------------------
    if not sample_only:
        check_run_dir(out, resume=resume, overwrite=overwrite, command="train-dit")
    ds = _open_latents(cfg, latents)
    check_num_classes(cfg, ds)
    fid_check(cfg.sample)
    tok_path = _tokenizer_path(cfg, ds)
    if tok_path is None or not Path(tok_path).exists():
        raise ConfigError(f"sampling needs the tokenizer that wrote {str(latents)!r} to decode: set sample.tokenizer "
                          f"(the train-tokenizer run directory, or an LDM / VA-VAE autoencoder .pt); got {tok_path!r}")
    check_tokenizer(cfg, ds, tok_path, latents)
    repa_dim = None
    if cfg.repa.weight > 0:
        repa_dim = ds.info.get("repa_feature_dim")
        if repa_dim is None:
            raise ConfigError("repa.weight > 0 needs DINOv2 features stored with the latents: "
                              "re-run `vefast extract-latents ... --repa-dinov2 NAME`")
    if cfg.model.init_from is not None and not Path(cfg.model.init_from).exists():
        raise ConfigError(f"model.init_from {cfg.model.init_from!r}: no such file or run directory")
    ckpt = None
    start_step = 0
    if sample_only:
        resume = latest_checkpoint(out) is not None
        if not resume and cfg.model.init_from is None:
            raise ConfigError(f"--sample-only: {str(out)!r} has no checkpoint and model.init_from is not set")
    if resume:
        if latest_checkpoint(out) is None:
            raise ConfigError(f"--resume: {str(out)!r} has no checkpoint to resume from")
        ckpt = load_checkpoint(out)
        start_step = ckpt.step
        if not sample_only:
            check_resume_config(ckpt.meta.get("config"), cfg, out,
                                fixed=("train.steps",) if cfg.optim.depends_on_run_length() else ())
            trained_on = ckpt.meta.get("latent_stats")
            if trained_on is not None and (trained_on["mean"] != ds.stats["mean"] or trained_on["std"] != ds.stats["std"]):
                raise ConfigError(f"--resume: the latents in {str(latents)!r} are not those {str(out)!r} was trained "
                                  f"on (their stats differ from the ones its checkpoint recorded, from {ckpt.meta.get('latents')!r})")
    dist_info = init_distributed(tc.device)
    device = dist_info.device
    if len(ds) < tc.batch_size * dist_info.world_size:
        raise ConfigError(f"latents: {len(ds)} samples, fewer than one global batch ({tc.batch_size} x {dist_info.world_size})")
    sharded = tc.parallel == "fsdp" and dist_info.distributed and not sample_only
    path = vefast.path(cfg.transport.path)
    t_sampler = build_timestep_sampler(cfg, ds, device)

    torch.manual_seed(cfg.seed)
    model, family = build_dit(cfg, ds.latent_shape)
    recipe_label_dropout(model)
    module = DiTTrainModule(model, cfg, _hidden_size(model) if cfg.repa.weight > 0 else None, repa_dim,
                            capture_hook=False)
    init_report = None
    if ckpt is not None:
        module.model.load_state_dict(ckpt.tensors("model"))
        if module.projector is not None:
            module.projector.load_state_dict(ckpt.tensors("projector"))
    elif cfg.model.init_from is not None:
        init_report = load_init_weights(module, cfg)
    ema = copy.deepcopy(model).eval().requires_grad_(False)  # before the REPA hook holds a reference
    module.attach_hook()
    if ckpt is not None:
        ema.load_state_dict(ckpt.tensors("ema"))
    module.to(device)
    ema.to(device)
    if sharded:
        fsdp_shard(module, module.model.blocks, device, tc.precision)
        fsdp_shard(ema, ema.blocks, device, tc.precision)
    opts = build_optimizers(module, cfg.optim)
    base_lrs = configured_lrs(opts)  # before a checkpoint's (scheduled) lrs load
    if ckpt is not None and not sample_only:
        for i, o in enumerate(opts):
            state = ckpt.state(f"opt{i}")
            _load_full_optim_state(module, o, state) if sharded else o.load_state_dict(state)
    channels = ds.latent_shape[0]
    barrier(dist_info)  # every rank has checked the run directory before rank 0 writes to it
    if dist_info.is_main:
        if overwrite and not sample_only:
            clear_run_dir(out)
        out.mkdir(parents=True, exist_ok=True)
        if not sample_only:
            dump_config(cfg, out / "config.yaml")
    log = JSONLLogger(out / "metrics.jsonl", enabled=dist_info.is_main, tensorboard=tc.tensorboard,
                      wandb=tc.wandb, config=config_to_dict(cfg),
                      resume_step=start_step if resume and not sample_only else None)
    if init_report is not None and dist_info.is_main:
        print(f"train-dit: {init_report}", file=sys.stderr)

    def sampling_model() -> nn.Module | None:
        """The model to sample with, on rank 0 (None elsewhere): under FSDP2 its full weights are
        gathered (every rank calls this) into a plain copy."""
        src = ema if cfg.sample.use_ema else module.model
        if not sharded:
            return src if dist_info.is_main else None
        full = _full_state(src)
        if not dist_info.is_main:
            return None
        plain, _ = build_dit(cfg, ds.latent_shape)
        plain.load_state_dict(full)
        return plain.to(device).eval().requires_grad_(False)

    def do_sample(step: int) -> None:
        m = sampling_model()
        if dist_info.is_main:
            res = sample_and_save(cfg, m, ds, tok_path, out, step, device)
            if res:  # FID when configured; no empty rows
                log.log(step, **res)
        barrier(dist_info)

    if sample_only:
        do_sample(start_step)
        log.close()
        return 0

    if sharded:
        sync = module
    else:
        sync = wrap_ddp(module, dist_info)
    fwd = torch.compile(sync) if cfg.model.compile else sync
    loader = step_loader(ds, tc.batch_size, seed=cfg.seed, rank=dist_info.rank, world_size=dist_info.world_size,
                         start_step=start_step, stop_step=tc.steps, num_workers=tc.num_workers,
                         pin_memory=device.type == "cuda")
    bar = Progress(tc.steps, start_step, tc.batch_size * dist_info.world_size, enabled=progress and dist_info.is_main,
                   desc="train-dit")
    run = DiTStep(cfg=cfg, module=module, fwd=fwd, sync=sync, ema=ema, opts=opts, path=path, t_sampler=t_sampler,
                  guard=NonFiniteGuard("train-dit", device), device=device, rank=dist_info.rank,
                  world_size=dist_info.world_size, channels=channels, base_lrs=base_lrs, sharded=sharded)

    def save(step: int) -> None:
        if sharded:
            full = _full_state(module)
            tensors = {"model": {k[6:]: v for k, v in full.items() if k.startswith("model.")},
                       "ema": _full_state(ema)}
            if module.projector is not None:
                tensors["projector"] = {k[10:]: v for k, v in full.items() if k.startswith("projector.")}
            states = {f"opt{i}": _full_optim_state(module, o) for i, o in enumerate(opts)}
        else:
            tensors = {"model": module.model.state_dict(), "ema": ema.state_dict()}
            if module.projector is not None:
                tensors["projector"] = module.projector.state_dict()
            states = {f"opt{i}": o.state_dict() for i, o in enumerate(opts)}
        if dist_info.is_main:
            run.guard.check_save(step, **tensors, **states)
            save_checkpoint(out, step, tensors=tensors, states=states,
                            meta={"kind": "dit", "family": family, "config": config_to_dict(cfg),
                                  "data_position": step, "latents": str(latents), "latent_stats":
                                  {k: ds.stats[k] for k in ("mean", "std")},
                                  "rng": {"scheme": "reseed(seed, step): t, noise and label drops drawn for the "
                                                    "global batch, each rank takes its rows", "seed": cfg.seed,
                                          "kernel_seeds": "draw_seed(step generator), host-side"},
                                  "world_size": dist_info.world_size, "parallel": "fsdp" if sharded else "ddp"},
                            keep=tc.keep_checkpoints)
        barrier(dist_info)

    step = start_step
    module.train()
    for batch in loader:
        metrics = train_step(run, batch, step)  # device tensors: nothing below reads them but log/ckpt steps
        step += 1
        log_train_step(step, tc.steps, tc.log_every, metrics, run.guard, bar, log)
        if step % tc.ckpt_every == 0 or step == tc.steps:
            if dist_info.distributed and not sharded:
                log.log(step, replica_max_abs_diff=replica_divergence(module, dist_info))
            run.guard.check(step)
            save(step)
        if (cfg.sample.every and step % cfg.sample.every == 0) or step == tc.steps:
            run.guard.check(step)
            do_sample(step)
    bar.close()
    log.close()
    return 0


@torch.no_grad()
def sample_and_save(cfg: DiTConfig, model: nn.Module, ds, tokenizer: str, out: Path, step: int,
                    device: torch.device) -> dict[str, float]:
    """Sample ``sample.num_images`` class-conditional latents (one class per grid row:
    :func:`vefast.recipes.images.grid_labels`), decode, write ``out/samples/step-{step:08d}-classes-...png``;
    FID over ``sample.fid_images`` when configured."""
    from .images import grid_filename, grid_labels
    from .checkpoint import load_tokenizer

    sc = cfg.sample
    ae, _tcfg, _stats = load_tokenizer(tokenizer, device)
    mean, std = ds.mean.to(device), ds.std.to(device)
    t_end = sc.t_end if sc.t_end is not None else (1.0 - 1e-3 if cfg.transport.path == "vp" else 1.0)
    was_training = model.training
    model.eval()

    def generate(n: int, seed: int, labels: torch.Tensor | None = None) -> torch.Tensor:
        g = torch.Generator(device=device).manual_seed(seed)
        noise = torch.randn((n, *ds.latent_shape), device=device, generator=g)
        y = torch.arange(n, device=device) % cfg.num_classes if labels is None else labels.to(device)
        z = sample_ode(model, noise, y, num_classes=cfg.num_classes, steps=sc.steps, sampler=sc.sampler,
                       cfg_scale=sc.cfg_scale, cfg_interval=sc.cfg_interval, t_end=t_end, precision=cfg.train.precision)
        return ae.decode(z * std + mean).float().clamp(-1, 1)

    labels, row_classes, per_row = grid_labels(sc.num_images, cfg.num_classes)
    images = generate(sc.num_images, cfg.seed + 12345, labels)
    path = save_grid(images, out / "samples" / grid_filename(step, row_classes), nrow=per_row)
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
