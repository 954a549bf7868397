"""``vefast train-tokenizer``: VE/KL conv tokenizer with DINOv2 alignment, LPIPS and PatchGAN.

Objective per step (LDM's ``LPIPSWithDiscriminator`` plus VA-VAE's VF term), losses in fp32:

    rec   = l1_weight |x - x_hat| + lpips_weight LPIPS(x, x_hat)          (per pixel, LDM)
    nll   = sum(rec / exp(s) + s) / B                                      (s: learned log-variance, LDM)
    L     = nll + latent + w_gan * g + w_align * align
    latent: ve  -> vefast VE loss (MATH §2; lambda_var, lambda_reg, tau in the config)
            kl  -> kl_weight * KL (MATH §1)
    g     = -mean D(x_hat)  (hinge generator loss), active from ``loss.gan_start`` on
    w_gan = clamp(||grad nll|| / (||grad g|| + 1e-4), 0, 1e4) * gan_weight, grads at the decoder's conv_out
    align: vf    -> vefast.vf_loss(z, DINOv2 patches, W) (MATH §3a); adaptive
                    w = clamp(||grad nll|| / (||grad vf|| + 1e-4), 0, 1e8) * vf_weight at the encoder's conv_out
           reals -> ReaLS heads (MATH §3b), fixed weight
    D: hinge loss 0.5 (relu(1 - D(x)) + relu(1 + D(x_hat))), its own AdamW.

AdamW(betas 0.5, 0.9), fixed lr (1e-4; VA-VAE notes that scaling it with the batch collapses VF
training), gradient clipping, bf16 autocast for the networks on CUDA. Validation: PSNR, SSIM,
LPIPS; the per-channel latent mean/std is saved with every checkpoint (``train-dit`` needs it).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ConfigError, check_resume_config, config_to_dict, dump_config, load_config, require


# ----------------------------------------------------------------------------------------------
# config schema

@dataclasses.dataclass
class TokenizerModelConfig:
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    latent_channels: int = 32
    norm_groups: int = 32
    dropout: float = 0.0
    mid_attn: bool = True

    def check(self) -> None:
        require(self.base_channels > 0, f"model.base_channels must be > 0, got {self.base_channels}")
        require(len(self.channel_mult) >= 1 and all(m > 0 for m in self.channel_mult),
                f"model.channel_mult must be positive integers, got {list(self.channel_mult)}")
        require(self.latent_channels > 0, f"model.latent_channels must be > 0, got {self.latent_channels}")
        require(self.num_res_blocks >= 1, f"model.num_res_blocks must be >= 1, got {self.num_res_blocks}")
        for m in self.channel_mult:
            require((self.base_channels * m) % self.norm_groups == 0,
                    f"model.norm_groups={self.norm_groups} must divide every width base_channels*mult "
                    f"({self.base_channels}*{m})")


@dataclasses.dataclass
class TokenizerLossConfig:
    l1_weight: float = 1.0
    lpips_weight: float = 1.0
    lpips_net: Literal["vgg", "alex", "squeeze"] = "vgg"
    lpips_pretrained: bool = True
    logvar_init: float = 0.0
    latent: Literal["ve", "kl"] = "ve"
    latent_reduction: Literal["sum", "mean"] = "sum"
    ve_lambda_var: float = 0.1
    ve_lambda_reg: float = 1e-6
    ve_tau: float = 1.0
    ve_delta: float = 1e-6
    kl_weight: float = 1e-6
    gan_weight: float = 0.5
    gan_start: int = 5000
    disc_channels: int = 64
    disc_layers: int = 3
    disc_norm: Literal["batch", "group"] = "batch"
    disc_lr: Optional[float] = None
    align: Literal["vf", "reals", "none"] = "vf"
    vf_weight: float = 0.1
    vf_adaptive: bool = True
    vf_margin_cos: float = 0.5
    vf_margin_dms: float = 0.25
    vf_weight_cos: float = 1.0
    vf_weight_dms: float = 1.0
    reals_weight: float = 0.5
    reals_hidden: Optional[int] = None
    dinov2: str = "vit_large_patch14_dinov2.lvd142m"
    dinov2_checkpoint: Optional[str] = None
    dinov2_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    dinov2_pretrained: bool = True
    dinov2_resize: Literal["match_grid", "224"] = "match_grid"
    dinov2_normalize: bool = True

    def check(self) -> None:
        for k in ("l1_weight", "lpips_weight", "kl_weight", "gan_weight", "vf_weight", "reals_weight",
                  "ve_lambda_var", "ve_lambda_reg", "ve_delta"):
            require(getattr(self, k) >= 0, f"loss.{k} must be >= 0, got {getattr(self, k)}")
        require(self.ve_tau > 0, f"loss.ve_tau must be > 0, got {self.ve_tau}")
        require(self.gan_start >= 0, f"loss.gan_start must be >= 0, got {self.gan_start}")
        require(self.disc_layers >= 1, f"loss.disc_layers must be >= 1, got {self.disc_layers}")


@dataclasses.dataclass
class TokenizerTrainConfig:
    image_size: int = 256
    batch_size: int = 8
    steps: int = 100_000
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    precision: Literal["bf16", "fp32"] = "bf16"
    num_workers: int = 4
    flip: bool = False
    synthetic_classes: int = 10
    log_every: int = 50
    ckpt_every: int = 5000
    keep_checkpoints: int = 3
    val_every: int = 5000
    val_images: int = 64
    stats_images: int = 256
    device: Literal["auto", "cpu", "cuda"] = "auto"
    tensorboard: bool = False

    def check(self) -> None:
        for k in ("image_size", "batch_size", "steps", "log_every", "ckpt_every", "val_every", "val_images", "stats_images"):
            require(getattr(self, k) > 0, f"train.{k} must be > 0, got {getattr(self, k)}")
        require(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        require(self.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        require(self.num_workers >= 0, f"train.num_workers must be >= 0, got {self.num_workers}")


@dataclasses.dataclass
class TokenizerConfig:
    seed: int = 0
    model: TokenizerModelConfig = dataclasses.field(default_factory=TokenizerModelConfig)
    loss: TokenizerLossConfig = dataclasses.field(default_factory=TokenizerLossConfig)
    train: TokenizerTrainConfig = dataclasses.field(default_factory=TokenizerTrainConfig)

    def check(self) -> None:
        f = 2 ** (len(self.model.channel_mult) - 1)
        require(self.train.image_size % f == 0,
                f"train.image_size={self.train.image_size} must be a multiple of the downsampling factor {f} "
                f"(len(model.channel_mult) - 1 = {len(self.model.channel_mult) - 1} halvings)")


# ----------------------------------------------------------------------------------------------
# model pieces

def build_autoencoder(cfg: TokenizerModelConfig):
    from ..models.tokenizer import AutoencoderKL

    return AutoencoderKL(**dataclasses.asdict(cfg))


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
    (LDM's GAN weight with max 1e4; VA-VAE's VF weight with max 1e8, MATH §3a)."""
    g_main = torch.autograd.grad(main_loss, layer, retain_graph=True)[0]
    g_other = torch.autograd.grad(other_loss, layer, retain_graph=True)[0]
    w = torch.norm(g_main.float()) / (torch.norm(g_other.float()) + 1e-4)
    return torch.clamp(w, 0.0, max_value).detach() * scale


def dinov2_targets(dino, x: torch.Tensor, grid: tuple[int, int], lc: TokenizerLossConfig):
    """Frozen DINOv2 (patch (B, D', h, w), cls (B, D')) at the latent grid, in fp32."""
    from .. import dinov2_features

    with torch.no_grad():
        patch, cls = dinov2_features(dino, x, grid=grid, resize=lc.dinov2_resize, normalize=lc.dinov2_normalize)
    return patch.float(), cls.float()


def load_dino(lc: TokenizerLossConfig, device: torch.device):
    from .. import load_dinov2

    model = load_dinov2(lc.dinov2, checkpoint=lc.dinov2_checkpoint, pretrained=lc.dinov2_pretrained,
                        **lc.dinov2_kwargs)
    return model.to(device).eval().requires_grad_(False)


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
             precision: str) -> dict[str, float]:
    """PSNR / SSIM / LPIPS of posterior-mode reconstructions of ``images`` (N, 3, H, W) in [-1, 1]."""
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


def fixed_images(dataset, n: int, *, from_end: bool = True) -> torch.Tensor:
    """The first / last ``n`` images of ``dataset`` stacked (validation and stats sets, fixed across runs)."""
    n = min(n, len(dataset))
    idx = range(len(dataset) - n, len(dataset)) if from_end else range(n)
    return torch.stack([dataset[i][0] for i in idx])


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
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(TokenizerConfig, args.config, args.set)
        if args.data is None and args.synthetic is None:
            raise ConfigError("train-tokenizer: give --data DIR or --synthetic N")
        if args.data is not None and not Path(args.data).is_dir():
            raise ConfigError(f"--data {args.data!r}: no such directory")
    except ConfigError as e:
        print(f"vefast train-tokenizer: {e}", file=sys.stderr)
        return 2
    return train(cfg, out=Path(args.out), data=args.data, synthetic=args.synthetic, resume=args.resume,
                 progress=not args.no_progress)


def train(cfg: TokenizerConfig, *, out: Path, data: str | None = None, synthetic: int | None = None,
          resume: bool = False, progress: bool = True) -> int:
    from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from .data import make_image_dataset, step_loader
    from .distributed import autocast, barrier, cleanup, init_distributed, replica_divergence, reseed, wrap_ddp
    from .metrics import JSONLLogger, Progress, build_lpips, lpips_check

    tc, lc = cfg.train, cfg.loss
    # --- everything that can fail, before any step ---------------------------------------------
    if lc.lpips_weight > 0:
        lpips_check(lc.lpips_net, lc.lpips_pretrained)
    dataset = make_image_dataset(data, synthetic, tc.image_size, tc.synthetic_classes, cfg.seed)
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
        check_resume_config(ckpt.meta.get("config"), cfg, out)

    torch.manual_seed(cfg.seed)
    dino = load_dino(lc, device) if lc.align != "none" else None
    feature_dim = dino_feature_dim(dino) if dino is not None else None
    module = TokenizerTrainModule(cfg, feature_dim).to(device)
    from ..models.tokenizer import NLayerDiscriminator

    disc = NLayerDiscriminator(3, lc.disc_channels, lc.disc_layers, lc.disc_norm).to(device)
    lpips_model = build_lpips(lc.lpips_net, lc.lpips_pretrained).to(device) if lc.lpips_weight > 0 else None
    opt = torch.optim.AdamW(module.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=lc.disc_lr or tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
    if ckpt is not None:
        sd = {f"ae.{k}": v for k, v in ckpt.tensors("model").items()}
        sd.update(ckpt.tensors("aux"))
        module.load_state_dict(sd)
        disc.load_state_dict(ckpt.tensors("disc"))
        opt.load_state_dict(ckpt.state("opt"))
        opt_d.load_state_dict(ckpt.state("opt_disc"))
    ddp_module = wrap_ddp(module, dist_info)
    ddp_disc = wrap_ddp(disc, dist_info)

    f = module.ae.downsample_factor
    grid = (tc.image_size // f, tc.image_size // f)
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")
    log = JSONLLogger(out / "metrics.jsonl", enabled=dist_info.is_main, tensorboard=tc.tensorboard)
    val_images = fixed_images(dataset, tc.val_images) if dist_info.is_main else None
    stats_images = fixed_images(dataset, tc.stats_images, from_end=False) if dist_info.is_main else None
    loader = step_loader(dataset, tc.batch_size, seed=cfg.seed, rank=dist_info.rank, world_size=dist_info.world_size,
                         start_step=start_step, stop_step=tc.steps, num_workers=tc.num_workers,
                         pin_memory=device.type == "cuda")
    bar = Progress(tc.steps, start_step, tc.batch_size * dist_info.world_size,
                   enabled=progress and dist_info.is_main, desc="train-tokenizer")

    def save(step: int) -> None:
        if dist_info.is_main:
            stats = latent_stats(module.ae, stats_images, device, tc.batch_size, tc.precision, seed=cfg.seed)
            sd = module.state_dict()
            save_checkpoint(out, step, tensors={
                "model": {k[3:]: v for k, v in sd.items() if k.startswith("ae.")},
                "aux": {k: v for k, v in sd.items() if not k.startswith("ae.")},
                "disc": disc.state_dict()},
                states={"opt": opt.state_dict(), "opt_disc": opt_d.state_dict()},
                meta={"kind": "tokenizer", "config": config_to_dict(cfg), "data_position": step,
                      "rng": {"scheme": "reseed(seed, step, rank)", "seed": cfg.seed},
                      "world_size": dist_info.world_size, "latent_stats": stats}, keep=tc.keep_checkpoints)
            (out / "latent_stats.json").write_text(json.dumps(stats, indent=1))
        barrier(dist_info)

    step = start_step
    module.train()
    disc.train()
    for x, _labels in loader:
        gen = reseed(cfg.seed, step, dist_info.rank, device)
        x = x.to(device, non_blocking=True)
        if tc.flip:
            flip = torch.rand(x.shape[0], generator=gen, device=device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        patch = cls = None
        if dino is not None:
            patch, cls = dinov2_targets(dino, x, grid, lc)
        res = ddp_module(x, patch, cls, tc.precision)
        recon = res["recon"]
        rec = lc.l1_weight * (x - recon).abs()
        p_loss = None
        if lpips_model is not None:
            p_loss = lpips_model(recon, x)  # (B, 1, 1, 1), broadcast per pixel as in LDM
            rec = rec + lc.lpips_weight * p_loss
        nll = (rec / torch.exp(res["logvar"]) + res["logvar"]).sum() / x.shape[0]
        loss = nll + res["latent_loss"]
        logs = {"nll": nll.detach(), "rec_l1": (x - recon).abs().mean().detach(), "latent": res["latent_loss"].detach()}
        gan_on = lc.gan_weight > 0 and step >= lc.gan_start
        if gan_on:
            disc.requires_grad_(False)
            with autocast(device, tc.precision):
                logits_fake = disc(recon)
            g_loss = -logits_fake.float().mean()
            w_gan = adaptive_weight(nll, g_loss, module.ae.decoder_last_layer(), max_value=1e4, scale=lc.gan_weight)
            disc.requires_grad_(True)
            loss = loss + w_gan * g_loss
            logs.update(g_loss=g_loss.detach(), w_gan=w_gan)
        if lc.align == "vf":
            if lc.vf_adaptive:
                w_vf = adaptive_weight(nll, res["align_loss"], module.ae.encoder_last_layer(), max_value=1e8,
                                       scale=lc.vf_weight)
            else:
                w_vf = torch.tensor(lc.vf_weight, device=device)
            loss = loss + w_vf * res["align_loss"]
            logs.update(vf=res["align_loss"].detach(), vf_cos=res["align_cos"], vf_dms=res["align_dms"], w_vf=w_vf)
        elif lc.align == "reals":
            loss = loss + lc.reals_weight * res["align_loss"]
            logs.update(reals=res["align_loss"].detach(), reals_cos=res["align_cos"], reals_smooth=res["align_smooth"])
        if p_loss is not None:
            logs["lpips"] = p_loss.mean().detach()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train-tokenizer: non-finite loss {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            logs["grad_norm"] = torch.nn.utils.clip_grad_norm_(module.parameters(), tc.grad_clip)
        opt.step()

        if gan_on:
            with autocast(device, tc.precision):
                real = ddp_disc(x)
                fake = ddp_disc(recon.detach())
            d_loss = 0.5 * (F.relu(1.0 - real.float()).mean() + F.relu(1.0 + fake.float()).mean())
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(disc.parameters(), tc.grad_clip)
            opt_d.step()
            logs["d_loss"] = d_loss.detach()
        logs["loss"] = loss.detach()
        step += 1
        img_s = bar.update(step, loss=float(loss.detach()))
        if step % tc.log_every == 0 or step == tc.steps:
            log.log(step, **{k: float(v) for k, v in logs.items()}, img_per_s=img_s,
                    std_mean=float(res["std"].mean()))
        if dist_info.is_main and (step % tc.val_every == 0 or step == tc.steps):
            log.log(step, **{f"val_{k}": v for k, v in evaluate(module.ae, lpips_model, val_images, device,
                                                                  tc.batch_size, tc.precision).items()})
        if step % tc.ckpt_every == 0 or step == tc.steps:
            if dist_info.distributed:
                log.log(step, replica_max_abs_diff=max(replica_divergence(module, dist_info),
                                                       replica_divergence(disc, dist_info)))
            save(step)
    bar.close()
    log.close()
    cleanup()
    return 0


def load_tokenizer(run_or_ckpt: str | Path, device: torch.device | str = "cpu"):
    """(autoencoder in eval mode, its config, latent stats) from a train-tokenizer run or checkpoint."""
    from .checkpoint import load_checkpoint

    ckpt = load_checkpoint(run_or_ckpt)
    if ckpt.meta.get("kind") != "tokenizer":
        raise ValueError(f"{str(run_or_ckpt)!r} is not a train-tokenizer checkpoint (kind={ckpt.meta.get('kind')!r})")
    from .config import build_config

    cfg = build_config(TokenizerConfig, ckpt.meta["config"])
    ae = build_autoencoder(cfg.model)
    ae.load_state_dict(ckpt.tensors("model"))
    return ae.to(device).eval().requires_grad_(False), cfg, ckpt.meta.get("latent_stats")
