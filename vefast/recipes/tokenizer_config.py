"""Config schema of ``vefast train-tokenizer`` and the autoencoder it describes.

Kept apart from the trainer (``recipes/tokenizer.py``) so that what only needs a trained tokenizer
(``extract-latents``, DiT sampling, :func:`vefast.recipes.checkpoint.load_tokenizer`) does not import it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal, Optional

from .config import check_train_batching, require
from .schedule import LRScheduleConfig


@dataclasses.dataclass
class TokenizerModelConfig:
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    latent_channels: int = 32
    norm_groups: int = 32
    dropout: float = 0.0
    mid_attn: bool = True
    grad_checkpointing: bool = False  # -> AutoencoderKL(use_checkpoint=...): recompute each block in the backward
    compile: bool = False             # torch.compile of the encoder and the decoder (Module.compile: keys unchanged)

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


ARCHITECTURE_KEYS = ("base_channels", "channel_mult", "num_res_blocks", "latent_channels", "norm_groups", "dropout",
                     "mid_attn")


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
    dinov2_features: Optional[str] = None  # a `vefast extract-features` directory: read the targets, run no DINOv2

    def check(self) -> None:
        for k in ("l1_weight", "lpips_weight", "kl_weight", "gan_weight", "vf_weight", "reals_weight",
                  "ve_lambda_var", "ve_lambda_reg", "ve_delta"):
            require(getattr(self, k) >= 0, f"loss.{k} must be >= 0, got {getattr(self, k)}")
        require(self.ve_tau > 0, f"loss.ve_tau must be > 0, got {self.ve_tau}")
        require(self.gan_start >= 0, f"loss.gan_start must be >= 0, got {self.gan_start}")
        require(self.disc_layers >= 1, f"loss.disc_layers must be >= 1, got {self.disc_layers}")
        if self.dinov2_features is not None:
            require(self.align != "none", "loss.dinov2_features is set but loss.align is 'none' (nothing uses them)")


@dataclasses.dataclass
class TokenizerOptimConfig(LRScheduleConfig):
    """AdamW of the autoencoder (and of the discriminator, at ``disc_lr``), with the shared schedule."""
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    disc_lr: Optional[float] = None

    def check(self) -> None:
        require(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        require(self.disc_lr is None or self.disc_lr > 0, f"optim.disc_lr must be > 0, got {self.disc_lr}")
        require(self.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        self.check_schedule()


@dataclasses.dataclass
class TokenizerTrainConfig:
    image_size: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    steps: int = 100_000
    precision: Literal["bf16", "fp32"] = "bf16"
    channels_last: bool = True
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
    wandb: Optional[str] = None  # Weights & Biases project to mirror metrics.jsonl to (None: off)

    def check(self) -> None:
        check_train_batching(self, ("image_size", "batch_size", "grad_accum", "steps", "log_every", "ckpt_every",
                                    "val_every", "val_images", "stats_images"))


@dataclasses.dataclass
class TokenizerConfig:
    seed: int = 0
    model: TokenizerModelConfig = dataclasses.field(default_factory=TokenizerModelConfig)
    loss: TokenizerLossConfig = dataclasses.field(default_factory=TokenizerLossConfig)
    optim: TokenizerOptimConfig = dataclasses.field(default_factory=TokenizerOptimConfig)
    train: TokenizerTrainConfig = dataclasses.field(default_factory=TokenizerTrainConfig)

    # one convention with train-dit: optimizer settings live in ``optim`` (old names still load, with a warning)
    RENAMED = {"train.lr": "optim.lr", "train.betas": "optim.betas", "train.weight_decay": "optim.weight_decay",
               "train.grad_clip": "optim.grad_clip", "loss.disc_lr": "optim.disc_lr"}

    def check(self) -> None:
        f = 2 ** (len(self.model.channel_mult) - 1)
        require(self.train.image_size % f == 0,
                f"train.image_size={self.train.image_size} must be a multiple of the downsampling factor {f} "
                f"(len(model.channel_mult) - 1 = {len(self.model.channel_mult) - 1} halvings)")


def build_autoencoder(cfg: TokenizerModelConfig):
    """The :class:`vefast.models.tokenizer.AutoencoderKL` of ``cfg`` (activation checkpointing per block
    when ``grad_checkpointing``; ``compile`` is applied by the trainer)."""
    from ..models.tokenizer import AutoencoderKL

    return AutoencoderKL(**{k: getattr(cfg, k) for k in ARCHITECTURE_KEYS}, use_checkpoint=cfg.grad_checkpointing)
