"""``vefast train-tokenizer``: VE/KL conv tokenizer with DINOv2 alignment, LPIPS and PatchGAN.

Objective per step (LDM's ``LPIPSWithDiscriminator`` plus VA-VAE's VF term), losses in fp32:

    rec   = l1_weight |x - x_hat| + lpips_weight LPIPS(x, x_hat)          (per pixel, LDM)
    nll   = sum(rec / exp(s) + s) / B                                      (s: learned log-variance, LDM)
    L     = nll + latent + w_gan * g + w_align * align
    latent: ve  -> vefast VE loss (docs/math.md §2; lambda_var, lambda_reg, tau in the config)
            kl  -> kl_weight * KL (docs/math.md §1)
    g     = -mean D(x_hat)  (hinge generator loss), active from ``loss.gan_start`` on
    w_gan = clamp(||grad nll|| / (||grad g|| + 1e-4), 0, 1e4) * gan_weight, grads at the decoder's conv_out
    align: vf    -> vefast.vf_loss(z, DINOv2 patches, W) (docs/math.md §3a); adaptive
                    w = clamp(||grad nll|| / (||grad vf|| + 1e-4), 0, 1e8) * vf_weight at the encoder's conv_out
           reals -> ReaLS heads (docs/math.md §3b), fixed weight
    D: hinge loss 0.5 (relu(1 - D(x)) + relu(1 + D(x_hat))), its own AdamW.

AdamW(betas 0.5, 0.9), lr 1e-4 (VA-VAE notes that scaling it with the batch collapses VF training),
warm-up / cosine optional (``optim.schedule``), gradient clipping. Throughput on CUDA: bf16 autocast
for the encoder, decoder, discriminator, LPIPS and DINOv2 (every loss in fp32), ``channels_last``
convolutions, the fused VE and VF losses, optional ``torch.compile`` of the encoder and decoder,
DINOv2 once per batch under ``no_grad`` at the latent grid (or its features read from ``vefast
extract-features`` shards), and DDP without ``find_unused_parameters``: the generator step's DDP
module (autoencoder, NLL log-variance, alignment head) and the discriminator's use every parameter
in every forward. ``train.grad_accum`` splits a step's batch into micro-batches (DDP ``no_sync`` on
all but the last). Validation: PSNR, SSIM, LPIPS; the per-channel latent mean/std is saved with every
checkpoint (``train-dit`` checks its latents against it).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ConfigError, check_resume_config, config_to_dict, dump_config, load_config
from .distributed import ends_process_group
from .tokenizer_config import (TokenizerConfig, TokenizerLossConfig, TokenizerModelConfig,  # noqa: F401
                               TokenizerOptimConfig, TokenizerTrainConfig, build_autoencoder)

if TYPE_CHECKING:
    from .metrics import NonFiniteGuard


# ----------------------------------------------------------------------------------------------
# model pieces (the config schema lives in tokenizer_config.py and is re-exported here)

class TokenizerTrainModule(nn.Module):
    """Everything trained with the autoencoder's optimizer, in one ``forward`` (so DDP sees it):
    the autoencoder, LDM's learned NLL log-variance, and the alignment head (VF projection or ReaLS MLPs)."""

    def __init__(self, cfg: TokenizerConfig, feature_dim: int | None):
        super().__init__()
        self.cfg = cfg
        self.ae = build_autoencoder(cfg.model)
        self.logvar = nn.Parameter(torch.full((), float(cfg.loss.logvar_init)))
        lc = cfg.loss
        c = cfg.model.latent_channels
        self.align = None
        if lc.align == "vf":
            from ..nn import VFLoss

            self.align = VFLoss(c, feature_dim, margin_cos=lc.vf_margin_cos, margin_dms=lc.vf_margin_dms,
                                weight_cos=lc.vf_weight_cos, weight_dms=lc.vf_weight_dms)
        elif lc.align == "reals":
            from ..nn import ReaLSAlignHead

            self.align = ReaLSAlignHead(c, feature_dim, hidden_dim=lc.reals_hidden)

    def forward(self, x: torch.Tensor, patch: torch.Tensor | None, cls: torch.Tensor | None,
                precision: str) -> dict[str, torch.Tensor]:
        from ..nn import DiagonalGaussianDistribution
        from .distributed import autocast

        lc = self.cfg.loss
        with autocast(x.device, precision):
            moments = self.ae.encode(x)
        post = DiagonalGaussianDistribution(moments.float())
        if lc.latent == "ve":
            out = post.ve(lambda_var=lc.ve_lambda_var, lambda_reg=lc.ve_lambda_reg, tau=lc.ve_tau,
                          delta=lc.ve_delta, reduction=lc.latent_reduction)
            z, latent_loss = out.z, out.loss
            extra = {"ve_var": out.var_loss.detach(), "ve_reg": out.reg_loss.detach()}
        else:
            out = post.kl_loss(reduction=lc.latent_reduction)
            z, latent_loss = out.z, lc.kl_weight * out.loss
            extra = {"kl": out.loss.detach()}
        with autocast(x.device, precision):
            recon = self.ae.decode(z)
        res = {"z": z, "recon": recon.float(), "latent_loss": latent_loss, "logvar": self.logvar,
               "mean": post.mean.detach(), "std": post.std.detach(), **extra}
        if lc.align == "vf":
            o = self.align(z, patch)
            res.update(align_loss=o.loss, align_cos=o.cos_loss.detach(), align_dms=o.dms_loss.detach())
        elif lc.align == "reals":
            o = self.align(z, patch, cls)
            res.update(align_loss=o.loss, align_cos=o.cos_loss.detach(), align_smooth=o.smooth_loss.detach())
        return res


def adaptive_weight(main_loss: torch.Tensor, other_loss: torch.Tensor, layer: torch.Tensor, *,
                    max_value: float, scale: float) -> torch.Tensor:
    """``clamp(||d main / d layer|| / (||d other / d layer|| + 1e-4), 0, max_value) * scale``, detached
    (LDM's GAN weight with max 1e4; VA-VAE's VF weight with max 1e8, docs/math.md §3a)."""
    g_main = torch.autograd.grad(main_loss, layer, retain_graph=True)[0]
    g_other = torch.autograd.grad(other_loss, layer, retain_graph=True)[0]
    w = torch.norm(g_main.float()) / (torch.norm(g_other.float()) + 1e-4)
    return torch.clamp(w, 0.0, max_value).detach() * scale


def dinov2_targets(dino, x: torch.Tensor, grid: tuple[int, int], lc: TokenizerLossConfig, precision: str = "fp32"):
    """Frozen DINOv2 (patch (B, D', h, w), cls (B, D')) at the latent grid, under ``no_grad`` and bf16
    autocast on CUDA, returned in fp32 (the alignment losses run in fp32)."""
    from .. import dinov2_features
    from .distributed import autocast

    with torch.no_grad(), autocast(x.device, precision):
        patch, cls = dinov2_features(dino, x, grid=grid, resize=lc.dinov2_resize, normalize=lc.dinov2_normalize)
    return patch.float(), cls.float()


def load_dino(lc: TokenizerLossConfig, device: torch.device):
    from .. import load_dinov2

    model = load_dinov2(lc.dinov2, checkpoint=lc.dinov2_checkpoint, pretrained=lc.dinov2_pretrained,
                        **lc.dinov2_kwargs)
    return model.to(device).eval().requires_grad_(False)


FEATURE_KEYS = ("dinov2", "dinov2_checkpoint", "dinov2_kwargs", "dinov2_pretrained", "dinov2_resize", "dinov2_normalize")


def feature_mismatch(info: dict, cfg: TokenizerConfig, grid: tuple[int, int]) -> list[str]:
    """How precomputed features (their ``info.json``) differ from what this config would compute."""
    lc, out = cfg.loss, []
    for k in FEATURE_KEYS:
        if info.get(k) != getattr(lc, k):
            out.append(f"loss.{k}: features {info.get(k)!r}, config {getattr(lc, k)!r}")
    if list(info.get("grid", [])) != list(grid):
        out.append(f"latent grid: features {info.get('grid')}, config {list(grid)}")
    if info.get("image_size") != cfg.train.image_size:
        out.append(f"train.image_size: features {info.get('image_size')}, config {cfg.train.image_size}")
    return out


def dino_feature_dim(dino) -> int:
    for attr in ("embed_dim", "num_features"):
        v = getattr(dino, attr, None)
        if isinstance(v, int):
            return v
    raise ValueError("DINOv2 model exposes neither embed_dim nor num_features")


# ----------------------------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def evaluate(ae, lpips_model, images: torch.Tensor, device: torch.device, batch_size: int,
             precision: str, grid: Path | None = None) -> dict[str, float]:
    """PSNR / SSIM / LPIPS of posterior-mode reconstructions of ``images`` (N, 3, H, W) in [-1, 1];
    ``grid``: also write the first batch's inputs (top row) and reconstructions (below) there as a PNG."""
    from ..nn import DiagonalGaussianDistribution
    from .distributed import autocast
    from .metrics import psnr, ssim

    ae.eval()
    ps, ss, lp = [], [], []
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size].to(device)
        with autocast(device, precision):
            z = DiagonalGaussianDistribution(ae.encode(x).float()).mode()
            r = ae.decode(z).float().clamp(-1, 1)
        if grid is not None and i == 0:
            from .images import save_reconstruction_grid

            save_reconstruction_grid(x, r, grid)
        ps.append(psnr(r, x).cpu())
        ss.append(ssim(r, x).cpu())
        if lpips_model is not None:
            lp.append(lpips_model(r, x).flatten().cpu())
    ae.train()
    out = {"psnr": torch.cat(ps).mean().item(), "ssim": torch.cat(ss).mean().item()}
    if lp:
        out["lpips"] = torch.cat(lp).mean().item()
    return out


@torch.no_grad()
def latent_stats(ae, images: torch.Tensor, device: torch.device, batch_size: int, precision: str,
                 mode: str = "sample", seed: int = 0) -> dict:
    """Per-channel mean and std (population) of latents of ``images``: the normalization train-dit uses."""
    from ..nn import DiagonalGaussianDistribution
    from .distributed import autocast

    ae.eval()
    s1 = s2 = None
    n = 0
    g = torch.Generator(device=device).manual_seed(seed)
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size].to(device)
        with autocast(device, precision):
            moments = ae.encode(x).float()
        post = DiagonalGaussianDistribution(moments)
        z = post.sample(generator=g) if mode == "sample" else post.mode()
        z = z.double()
        a, b = z.sum((0, 2, 3)), (z * z).sum((0, 2, 3))
        s1, s2 = (a, b) if s1 is None else (s1 + a, s2 + b)
        n += z.shape[0] * z.shape[2] * z.shape[3]
    ae.train()
    mean = s1 / n
    std = (s2 / n - mean * mean).clamp_min(1e-12).sqrt()
    return {"mean": mean.tolist(), "std": std.tolist(), "count": n, "mode": mode}


def fixed_images(dataset, n: int, *, from_end: bool = True, spread: bool = False) -> torch.Tensor:
    """``n`` images of ``dataset`` stacked, fixed across runs: the last ``n`` (validation), the first
    ``n``, or ``spread`` evenly over the set (the latent-stats set: a class-sorted folder's first images
    would all be one class)."""
    n = min(n, len(dataset))
    if spread:
        idx = [i * len(dataset) // n for i in range(n)]
    else:
        idx = range(len(dataset) - n, len(dataset)) if from_end else range(n)
    return torch.stack([dataset[i][0] for i in idx])


# ----------------------------------------------------------------------------------------------
# one training step

@dataclasses.dataclass
class TokenizerStep:
    """Everything one training step touches (built by :func:`train`)."""
    cfg: TokenizerConfig
    module: TokenizerTrainModule
    ddp_module: nn.Module  # ``module``, DDP-wrapped when distributed
    disc: nn.Module
    ddp_disc: nn.Module
    opt: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    dino: Optional[nn.Module]
    lpips_model: Optional[nn.Module]
    grid: tuple[int, int]
    device: torch.device
    rank: int
    guard: NonFiniteGuard
    base_lrs: list[list[float]] = dataclasses.field(default_factory=list)  # [ae groups, disc groups]


def _generator_loss(run: TokenizerStep, x: torch.Tensor, patch: torch.Tensor | None, cls: torch.Tensor | None,
                    gan_on: bool) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor]:
    """The autoencoder's loss on one (micro-)batch, its logs (device tensors or numbers) and the
    detached reconstruction (the discriminator's fake input). The adaptive weights use this batch's
    gradients, as each rank's do under DDP."""
    from .distributed import autocast

    lc, tc, device = run.cfg.loss, run.cfg.train, run.device
    module = run.module
    res = run.ddp_module(x, patch, cls, tc.precision)
    recon = res["recon"]
    rec = lc.l1_weight * (x - recon).abs()
    p_loss = None
    if run.lpips_model is not None:
        with autocast(device, tc.precision):
            p_loss = run.lpips_model(recon, x).float()  # (B, 1, 1, 1), broadcast per pixel as in LDM
        rec = rec + lc.lpips_weight * p_loss
    nll = (rec / torch.exp(res["logvar"]) + res["logvar"]).sum() / x.shape[0]
    loss = nll + res["latent_loss"]
    logs: dict[str, Any] = {"nll": nll.detach(), "rec_l1": (x - recon).abs().mean().detach(),
                            "latent": res["latent_loss"].detach()}
    if gan_on:
        run.disc.requires_grad_(False)
        with autocast(device, tc.precision):
            logits_fake = run.disc(recon)
        g_loss = -logits_fake.float().mean()
        w_gan = adaptive_weight(nll, g_loss, module.ae.decoder_last_layer(), max_value=1e4, scale=lc.gan_weight)
        run.disc.requires_grad_(True)
        loss = loss + w_gan * g_loss
        logs.update(g_loss=g_loss.detach(), w_gan=w_gan)
    if lc.align == "vf":
        if lc.vf_adaptive:
            w_vf = adaptive_weight(nll, res["align_loss"], module.ae.encoder_last_layer(), max_value=1e8,
                                   scale=lc.vf_weight)
        else:
            w_vf = lc.vf_weight  # a number: a tensor made on the device here would be a blocking copy
        loss = loss + w_vf * res["align_loss"]
        logs.update(vf=res["align_loss"].detach(), vf_cos=res["align_cos"], vf_dms=res["align_dms"], w_vf=w_vf)
    elif lc.align == "reals":
        loss = loss + lc.reals_weight * res["align_loss"]
        logs.update(reals=res["align_loss"].detach(), reals_cos=res["align_cos"], reals_smooth=res["align_smooth"])
    if p_loss is not None:
        logs["lpips"] = p_loss.mean().detach()
    logs["std_mean"] = res["std"].mean()
    return loss, logs, recon.detach()


def _disc_loss(run: TokenizerStep, x: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator on real ``x`` and detached reconstructions ``fake`` (two forwards,
    as LDM, so BatchNorm sees real and fake batches apart)."""
    from .distributed import autocast

    with autocast(run.device, run.cfg.train.precision):
        real = run.ddp_disc(x)
        logits_fake = run.ddp_disc(fake)
    return 0.5 * (F.relu(1.0 - real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def _accumulate(total: dict[str, Any], part: dict[str, Any], weight: float) -> None:
    for k, v in part.items():
        total[k] = v * weight if k not in total else total[k] + v * weight


def train_step(run: TokenizerStep, batch, step: int) -> dict[str, torch.Tensor | float]:
    """Autoencoder step ``step`` (0-based) on this rank's ``batch`` (images, labels[, DINOv2 patch
    features, class tokens]), then the discriminator's once the GAN is on, with no device->host read:
    returns the logs as device tensors (read at log steps) and feeds the losses and gradient norm to
    ``run.guard``. ``train.grad_accum`` micro-batches each backpropagate ``loss / grad_accum`` (DDP
    syncs on the last only); logs are their means. Every random draw comes from
    ``reseed(seed, step, rank)`` (bitwise resume); flips are part of the data (``FlipDataset``)."""
    from .distributed import grad_sync, reseed
    from .schedule import apply_lr, lr_factor

    cfg, lc, tc, oc, device = run.cfg, run.cfg.loss, run.cfg.train, run.cfg.optim, run.device
    reseed(cfg.seed, step, run.rank, device)
    x = batch[0].to(device, non_blocking=True)
    if tc.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    patch = cls = None
    if len(batch) > 2:  # precomputed DINOv2 features
        patch, cls = batch[2].to(device, non_blocking=True).float(), batch[3].to(device, non_blocking=True).float()
    elif run.dino is not None:  # once for the whole batch, before it is split into micro-batches
        patch, cls = dinov2_targets(run.dino, x, run.grid, lc, tc.precision)
    factor = lr_factor(step, oc, tc.steps)
    apply_lr([run.opt, run.opt_d], run.base_lrs, factor)
    gan_on = lc.gan_weight > 0 and step >= lc.gan_start
    k = tc.grad_accum
    mb = x.shape[0] // k
    parts = [slice(i * mb, (i + 1) * mb) for i in range(k)]
    logs: dict[str, Any] = {}
    fakes = []
    run.opt.zero_grad(set_to_none=True)
    for i, sl in enumerate(parts):
        with grad_sync(run.ddp_module, i == k - 1):
            loss, part, fake = _generator_loss(run, x[sl], None if patch is None else patch[sl],
                                               None if cls is None else cls[sl], gan_on)
            (loss / k).backward()
        part["loss"] = loss.detach()
        _accumulate(logs, part, 1.0 / k)
        fakes.append(fake)
    gnorm = torch.nn.utils.clip_grad_norm_(run.module.parameters(), oc.grad_clip) if oc.grad_clip > 0 else None
    if gnorm is not None:
        logs["grad_norm"] = gnorm
    run.opt.step()

    d_loss = None
    if gan_on:
        run.opt_d.zero_grad(set_to_none=True)
        for i, sl in enumerate(parts):
            with grad_sync(run.ddp_disc, i == k - 1):
                d = _disc_loss(run, x[sl], fakes[i])
                (d / k).backward()
            d_loss = d.detach() / k if d_loss is None else d_loss + d.detach() / k
        if oc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(run.disc.parameters(), oc.grad_clip)
        run.opt_d.step()
        logs["d_loss"] = d_loss
    logs["lr"] = oc.lr * factor
    run.guard.update(step + 1, loss=logs["loss"], grad_norm=gnorm, d_loss=d_loss)
    return logs


# ----------------------------------------------------------------------------------------------
# command

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tokenizer_f16d32_ve.yaml",
                        help="YAML config: a path or the name of a shipped config (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.batch_size=16 (repeatable)")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--data", help="class-folder image directory (ROOT/<class>/<image>)")
    src.add_argument("--synthetic", type=int, metavar="N", help="use N procedurally generated images instead")
    parser.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl, config.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an --out that holds a run (deletes its checkpoints, metrics, samples)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                        help="where to train (sets train.device; default: the config's, auto = CUDA when available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


USER_ERRORS = (ConfigError,)


def main(args: argparse.Namespace) -> int:
    overrides = list(args.set) + ([f"train.device={args.device}"] if args.device else [])
    cfg = load_config(TokenizerConfig, args.config, overrides)
    if args.data is None and args.synthetic is None:
        raise ConfigError("train-tokenizer: give --data DIR or --synthetic N")
    if args.data is not None and not Path(args.data).is_dir():
        raise ConfigError(f"--data {args.data!r}: no such directory")
    return train(cfg, out=Path(args.out), data=args.data, synthetic=args.synthetic, resume=args.resume,
                 overwrite=args.overwrite, progress=not args.no_progress)


def _training_data(cfg: TokenizerConfig, base, grid: tuple[int, int]):
    """(training dataset, DINOv2 feature dim from the feature shards or None): flips as a doubled set,
    precomputed features paired with their (possibly flipped) images."""
    from .data import FeatureShards, FlipDataset, ImageFeatureDataset

    lc, tc = cfg.loss, cfg.train
    if lc.dinov2_features is None:
        return (FlipDataset(base) if tc.flip else base), None
    try:
        shards = FeatureShards(lc.dinov2_features)
        bad = feature_mismatch(shards.info, cfg, grid)
        if bad:
            raise ConfigError(f"loss.dinov2_features {lc.dinov2_features!r} were computed differently from what "
                              f"this config asks: {'; '.join(bad)}")
        return ImageFeatureDataset(base, shards, flip=tc.flip), int(shards.info["feature_dim"])
    except ValueError as e:
        raise ConfigError(str(e)) from None


@ends_process_group
def train(cfg: TokenizerConfig, *, out: Path, data: str | None = None, synthetic: int | None = None,
          resume: bool = False, overwrite: bool = False, progress: bool = True) -> int:
    from ..models.tokenizer import NLayerDiscriminator
    from .checkpoint import check_run_dir, clear_run_dir, latest_checkpoint, load_checkpoint, save_checkpoint
    from .data import make_image_dataset, step_loader
    from .distributed import barrier, init_distributed, replica_divergence, wrap_ddp
    from .metrics import JSONLLogger, NonFiniteGuard, Progress, build_lpips, log_train_step, lpips_check
    from .schedule import base_lrs

    tc, lc, oc = cfg.train, cfg.loss, cfg.optim
    # --- everything that can fail, before any step ---------------------------------------------
    check_run_dir(out, resume=resume, overwrite=overwrite, command="train-tokenizer")
    if lc.lpips_weight > 0:
        lpips_check(lc.lpips_net, lc.lpips_pretrained)
    base = make_image_dataset(data, synthetic, tc.image_size, tc.synthetic_classes, cfg.seed)
    f = 2 ** (len(cfg.model.channel_mult) - 1)
    grid = (tc.image_size // f, tc.image_size // f)
    dataset, feature_dim = _training_data(cfg, base, grid)
    dist_info = init_distributed(tc.device)
    device = dist_info.device
    if len(dataset) < tc.batch_size * dist_info.world_size:
        raise ConfigError(f"data: {len(dataset)} images, fewer than one global batch "
                          f"({tc.batch_size} x {dist_info.world_size} ranks)")
    start_step = 0
    ckpt = None
    if resume:
        if latest_checkpoint(out) is None:
            raise ConfigError(f"--resume: {str(out)!r} has no checkpoint to resume from")
        ckpt = load_checkpoint(out)
        start_step = ckpt.step
        check_resume_config(ckpt.meta.get("config"), cfg, out,
                            fixed=("train.steps",) if oc.depends_on_run_length() else ())

    dino = None
    if lc.align != "none" and lc.dinov2_features is None:
        torch.manual_seed(cfg.seed)  # a random-init DINOv2 (tests) is the same as extract-features'
        dino = load_dino(lc, device)
        feature_dim = dino_feature_dim(dino)
    torch.manual_seed(cfg.seed)  # the trained modules' init: the same with online or precomputed DINOv2
    module = TokenizerTrainModule(cfg, feature_dim).to(device)
    disc = NLayerDiscriminator(3, lc.disc_channels, lc.disc_layers, lc.disc_norm).to(device)
    lpips_model = build_lpips(lc.lpips_net, lc.lpips_pretrained).to(device) if lc.lpips_weight > 0 else None
    if tc.channels_last:
        for m in (module, disc, lpips_model):
            if m is not None:
                m.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(module.parameters(), lr=oc.lr, betas=oc.betas, weight_decay=oc.weight_decay)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=oc.disc_lr or oc.lr, betas=oc.betas, weight_decay=oc.weight_decay)
    lrs = base_lrs([opt, opt_d])  # before a checkpoint's (scheduled) lrs load
    if ckpt is not None:
        sd = {f"ae.{k}": v for k, v in ckpt.tensors("model").items()}
        sd.update(ckpt.tensors("aux"))
        module.load_state_dict(sd)
        disc.load_state_dict(ckpt.tensors("disc"))
        opt.load_state_dict(ckpt.state("opt"))
        opt_d.load_state_dict(ckpt.state("opt_disc"))
    if cfg.model.compile:
        module.ae.encoder.compile()
        module.ae.decoder.compile()
    ddp_module = wrap_ddp(module, dist_info)
    # The discriminator runs in train mode only: its BatchNorm running statistics are never read. DDP's
    # default buffer broadcast at each forward would overwrite them in place between the real and the
    # fake forward, which autograd saved for the backward (an error), and costs a collective per forward.
    ddp_disc = wrap_ddp(disc, dist_info, broadcast_buffers=False)

    barrier(dist_info)  # every rank has checked the run directory before rank 0 writes to it
    if dist_info.is_main:
        if overwrite:
            clear_run_dir(out)
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")
    log = JSONLLogger(out / "metrics.jsonl", enabled=dist_info.is_main, tensorboard=tc.tensorboard,
                      wandb=tc.wandb, config=config_to_dict(cfg),
                      resume_step=start_step if resume else None)
    val_images = fixed_images(base, tc.val_images) if dist_info.is_main else None
    stats_images = fixed_images(base, tc.stats_images, spread=True) if dist_info.is_main else None
    loader = step_loader(dataset, tc.batch_size, seed=cfg.seed, rank=dist_info.rank, world_size=dist_info.world_size,
                         start_step=start_step, stop_step=tc.steps, num_workers=tc.num_workers,
                         pin_memory=device.type == "cuda")
    bar = Progress(tc.steps, start_step, tc.batch_size * dist_info.world_size,
                   enabled=progress and dist_info.is_main, desc="train-tokenizer")

    def save(step: int) -> None:
        if dist_info.is_main:
            sd = module.state_dict()
            tensors = {"model": {k[3:]: v for k, v in sd.items() if k.startswith("ae.")},
                       "aux": {k: v for k, v in sd.items() if not k.startswith("ae.")}, "disc": disc.state_dict()}
            states = {"opt": opt.state_dict(), "opt_disc": opt_d.state_dict()}
            run.guard.check_save(step, **tensors, **states)
            stats = latent_stats(module.ae, stats_images, device, tc.batch_size, tc.precision, seed=cfg.seed)
            meta = {"kind": "tokenizer", "config": config_to_dict(cfg), "data_position": step,
                    "rng": {"scheme": "reseed(seed, step, rank); flips are data (FlipDataset index >= N)",
                            "seed": cfg.seed, "kernel_seeds": "draw_seed(default CPU generator, reseeded per step)"},
                    "world_size": dist_info.world_size, "latent_stats": stats}
            save_checkpoint(out, step, tensors=tensors, states=states, meta=meta, keep=tc.keep_checkpoints)
            (out / "latent_stats.json").write_text(json.dumps(stats, indent=1))
        barrier(dist_info)

    run = TokenizerStep(cfg=cfg, module=module, ddp_module=ddp_module, disc=disc, ddp_disc=ddp_disc, opt=opt,
                        opt_d=opt_d, dino=dino, lpips_model=lpips_model, grid=grid, device=device, rank=dist_info.rank,
                        guard=NonFiniteGuard("train-tokenizer", device), base_lrs=lrs)
    step = start_step
    module.train()
    disc.train()
    for batch in loader:
        logs = train_step(run, batch, step)  # device tensors: read at log steps only
        step += 1
        log_train_step(step, tc.steps, tc.log_every, logs, run.guard, bar, log)
        if dist_info.is_main and (step % tc.val_every == 0 or step == tc.steps):
            run.guard.check(step)
            log.log(step, **{f"val_{k}": v for k, v in evaluate(module.ae, lpips_model, val_images, device,
                                                                  tc.batch_size, tc.precision,
                                                                  grid=out / "samples" / f"recon-step-{step:08d}.png").items()})
        if step % tc.ckpt_every == 0 or step == tc.steps:
            if dist_info.distributed:
                log.log(step, replica_max_abs_diff=max(replica_divergence(module, dist_info),
                                                       replica_divergence(disc, dist_info)))
            run.guard.check(step)
            save(step)
    bar.close()
    log.close()
    return 0


def load_tokenizer(run_or_ckpt: str | Path, device: torch.device | str = "cpu"):
    """Kept for callers of the old location: :func:`vefast.recipes.checkpoint.load_tokenizer`."""
    from .checkpoint import load_tokenizer as load

    return load(run_or_ckpt, device)
