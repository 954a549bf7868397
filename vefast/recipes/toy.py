"""``vefast toy``: KL vs VE tokenizer + flow model on the tree-shaped 2D mixture ([VE-supp] app. C, [VE] fig. 1).

For each variant (``kl``: reconstruction + 1e-3 KL; ``ve``: reconstruction + VE loss with
``lambda_var = 1e-2``, ``lambda_reg = 1e-6``, ``tau = 1``) it trains an MLP tokenizer with a 2D
latent through :func:`vefast.kl_loss` / :func:`vefast.ve_loss`, then a flow-matching MLP on that
latent space (linear path ``z_t = t z1 + (1 - t) eps``, target ``z1 - eps``, ``t = 1`` data),
samples it with 20 Euler steps, decodes, and scores the samples exactly under the true mixture.

Choices (docs/toy.md says why):
- losses are per-sample sums over the 2 coordinates, averaged over the batch: reconstruction
  ``||x - D(z)||^2`` and the regularizer with ``reduction="sum"``; the paper's "VE coefficient
  1e-2" is read as ``lambda_var`` (the lambda of eq. 14), ``lambda_reg`` keeps its default 1e-6;
- the flow model learns the sampled latents ``z = mean + std * eps`` (fresh ``eps`` each step),
  standardized per axis by their exact pool moments (LDM's scale factor); samples are mapped back
  before decoding;
- both variants start from the same initial weights and see the same data stream.
Determinism: fixed thread count, ``torch.use_deterministic_algorithms(True)``, every random draw
from a ``torch.Generator`` seeded from ``--seed``.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch

from ..models.toy import ToyTokenizer, ToyVelocity
from .toy_mixture import GaussianMixture2D

VARIANTS = ("kl", "ve")


@dataclass(frozen=True)
class ToyConfig:
    """Sizes and schedule of one run (the same for both variants)."""
    width: int = 256
    depth: int = 4
    act: str = "relu"
    flow_width: int = 256
    flow_depth: int = 4
    flow_act: str = "silu"
    time_features: int = 16
    batch: int = 2048
    tok_steps: int = 2000
    flow_steps: int = 4000
    lr: float = 2e-3
    schedule: str = "cosine"        # "cosine": linear warmup then cosine to 0; "rsqrt": lr / sqrt(max(i / warmup, 1))
    warmup: int = 200
    ema: float = 0.999              # EMA decay of the flow model (0 disables)
    kl_weight: float = 1e-3
    ve_lambda_var: float = 1e-2
    ve_lambda_reg: float = 1e-6
    ve_tau: float = 1.0
    euler_steps: int = 20
    samples: int = 10000
    real_samples: int = 50000       # real points for the 1st-percentile threshold
    pool: int = 131072              # encoded data points the flow model trains on
    data_seed: int = 0              # the tree itself (independent of --seed)


PRESETS = {
    "default": ToyConfig(),
    # paper sizes ([VE-supp] app. C): 8 layers, 512 wide, ReLU, Adam lr 1e-3, batch 4096, 200k
    # iterations, AutoGuidance's schedule lr / sqrt(max(i / 512, 1)); our EMA on the flow model.
    "full": ToyConfig(width=512, depth=8, act="relu", flow_width=512, flow_depth=8, flow_act="relu",
                      batch=4096, tok_steps=200_000, flow_steps=200_000, lr=1e-3, schedule="rsqrt",
                      warmup=512, ema=0.9999, pool=1 << 20),
    # seconds, for tests: the pipeline end to end, not its quality
    "quick": ToyConfig(width=32, depth=3, flow_width=32, flow_depth=3, time_features=4, batch=256,
                       tok_steps=40, flow_steps=40, warmup=5, ema=0.9, samples=1000, real_samples=2000,
                       pool=4096),
}


# ----------------------------------------------------------------------------------------------
# command line

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true",
                      help="paper sizes: 8x512 ReLU MLPs, batch 4096, Adam lr 1e-3, 200k iterations per model (GPU)")
    size.add_argument("--quick", action="store_true", help="tiny models and few steps (tests, smoke runs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, data stream and noise (default 0)")
    parser.add_argument("--out", default="toy_out", help="output folder for toy.png and toy.json (default toy_out/)")
    parser.add_argument("--steps", type=_positive_int, help="training iterations of every model (tokenizer and flow)")
    parser.add_argument("--tok-steps", type=_positive_int, help="tokenizer iterations (overrides --steps)")
    parser.add_argument("--flow-steps", type=_positive_int, help="flow-model iterations (overrides --steps)")
    parser.add_argument("--width", type=_positive_int, help="hidden width of all MLPs")
    parser.add_argument("--depth", type=_positive_int, help="Linear layers per MLP (>= 2)")
    parser.add_argument("--batch", type=_positive_int, help="batch size")
    parser.add_argument("--lr", type=_positive_float, help="peak learning rate (Adam)")
    parser.add_argument("--samples", type=_positive_int, help="generated samples per variant (default 10000)")
    parser.add_argument("--threads", type=_positive_int, default=2,
                        help="torch CPU threads (fixed so that runs repeat exactly; default 2)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu; e.g. cuda)")
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bars")


def config_from_args(args: argparse.Namespace) -> ToyConfig:
    """The preset (default / --quick / --full) with the command-line overrides applied."""
    cfg = PRESETS["full" if args.full else "quick" if args.quick else "default"]
    if args.depth is not None and args.depth < 2:
        raise ValueError(f"--depth must be >= 2 (Linear layers per MLP), got {args.depth}")
    # option -> the config fields it sets; later options win (--tok-steps over --steps)
    fields = {"steps": ("tok_steps", "flow_steps"), "tok_steps": ("tok_steps",), "flow_steps": ("flow_steps",),
              "width": ("width", "flow_width"), "depth": ("depth", "flow_depth"), "batch": ("batch",),
              "lr": ("lr",), "samples": ("samples",)}
    over = {f: getattr(args, opt) for opt, fs in fields.items() if getattr(args, opt) is not None for f in fs}
    cfg = replace(cfg, **over)
    if cfg.warmup >= min(cfg.tok_steps, cfg.flow_steps) and cfg.schedule == "cosine":
        cfg = replace(cfg, warmup=max(min(cfg.tok_steps, cfg.flow_steps) // 10, 0))
    return cfg


# ----------------------------------------------------------------------------------------------
# training

def _seed(seed: int, *stream: int) -> int:
    """A distinct 63-bit seed per (run seed, stream ids)."""
    h = seed & 0xFFFFFFFFFFFF
    for s in stream:
        h = (h * 1_000_003 + s + 0x9E3779B9) % (1 << 63)
    return h


def _generator(seed: int, *stream: int, device: torch.device = torch.device("cpu")) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(_seed(seed, *stream))


def lr_at(step: int, total: int, cfg: ToyConfig) -> float:
    """Learning rate of iteration ``step`` (0-based) of ``total``."""
    if cfg.schedule == "rsqrt":
        return cfg.lr / math.sqrt(max(step / max(cfg.warmup, 1), 1.0))
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(total - cfg.warmup, 1)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def _reparam(variant: str, mean: torch.Tensor, logvar: torch.Tensor, cfg: ToyConfig,
             generator: torch.Generator):
    """The fused op of the variant: ``vefast.kl_loss`` or ``vefast.ve_loss`` (per-sample sum)."""
    import vefast

    if variant == "kl":
        out = vefast.kl_loss(mean, logvar, reduction="sum", generator=generator)
        return out.z, cfg.kl_weight * out.loss
    out = vefast.ve_loss(mean, logvar, lambda_var=cfg.ve_lambda_var, lambda_reg=cfg.ve_lambda_reg,
                         tau=cfg.ve_tau, reduction="sum", generator=generator)
    return out.z, out.loss


def _progress(iterable, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, disable=not enabled, leave=False, mininterval=1.0, file=sys.stderr,
                dynamic_ncols=True)


def train_tokenizer(variant: str, mixture: GaussianMixture2D, cfg: ToyConfig, seed: int,
                    device: torch.device, progress: bool = True) -> tuple[ToyTokenizer, list[float]]:
    """Reconstruction + KL / VE loss, fresh mixture samples every step. Returns model, loss curve."""
    torch.manual_seed(_seed(seed, 1))  # same initial weights for both variants
    model = ToyTokenizer(cfg.width, cfg.depth, cfg.act).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    g_data = _generator(seed, 2)
    g_noise = _generator(seed, 3, device=device)
    curve = []
    for step in _progress(range(cfg.tok_steps), f"tokenizer {variant}", progress):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.tok_steps, cfg)
        x = mixture.sample(cfg.batch, g_data).to(device)
        mean, logvar = model.encode(x)
        z, reg = _reparam(variant, mean, logvar, cfg, g_noise)
        rec = (model.decode(z) - x).square().sum(1).mean()
        loss = rec + reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == cfg.tok_steps - 1:
            curve.append(loss.item())
    return model.eval().requires_grad_(False), curve


@dataclass
class LatentPool:
    """Encoded data the flow model trains on, and the per-axis standardization of sampled latents."""
    mean: torch.Tensor
    logvar: torch.Tensor
    shift: torch.Tensor
    scale: torch.Tensor


@torch.no_grad()
def encode_pool(model: ToyTokenizer, mixture: GaussianMixture2D, cfg: ToyConfig, seed: int,
                device: torch.device) -> LatentPool:
    x = mixture.sample(cfg.pool, _generator(seed, 4)).to(device)
    mean, logvar = model.encode(x)
    var = logvar.clamp(-30, 20).exp()
    # exact moments of z = mean + std * eps over the pool: E[z] = E[mean], Var[z] = Var[mean] + E[var]
    shift = mean.mean(0)
    scale = (mean.var(0, unbiased=False) + var.mean(0)).sqrt()
    return LatentPool(mean, logvar, shift, scale)


def train_flow(variant: str, pool: LatentPool, cfg: ToyConfig, seed: int, device: torch.device,
               progress: bool = True) -> tuple[ToyVelocity, list[float]]:
    """Flow matching on standardized sampled latents; returns the EMA model and the loss curve."""
    torch.manual_seed(_seed(seed, 5))
    model = ToyVelocity(cfg.flow_width, cfg.flow_depth, cfg.flow_act, time_features=cfg.time_features).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    g_idx = _generator(seed, 6)
    g_noise = _generator(seed, 7, device=device)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    curve = []
    for step in _progress(range(cfg.flow_steps), f"flow {variant}", progress):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.flow_steps, cfg)
        idx = torch.randint(pool.mean.shape[0], (cfg.batch,), generator=g_idx).to(device)
        with torch.no_grad():
            z, _ = _reparam(variant, pool.mean[idx], pool.logvar[idx], cfg, g_noise)
            z1 = (z - pool.shift) / pool.scale
            eps = torch.randn(z1.shape, generator=g_noise, device=device)
            t = torch.rand(cfg.batch, generator=g_noise, device=device)
            zt = t[:, None] * z1 + (1 - t[:, None]) * eps
        loss = (model(zt, t) - (z1 - eps)).square().sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            decay = min(cfg.ema, (1 + step) / (10 + step))  # short warm-up of the average
            torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        if step % 100 == 0 or step == cfg.flow_steps - 1:
            curve.append(loss.item())
    return (ema if cfg.ema > 0 else model).eval(), curve


@torch.no_grad()
def euler_sample(model: ToyVelocity, n: int, steps: int, generator: torch.Generator,
                 device: torch.device) -> torch.Tensor:
    """``z_{k+1} = z_k + v(z_k, k / N) / N`` from ``z_0 ~ N(0, I)`` ([VE-supp] eq. 31)."""
    z = torch.randn(n, 2, generator=generator, device=device)
    for k in range(steps):
        t = torch.full((n,), k / steps, device=device)
        z = z + model(z, t) / steps
    return z


# ----------------------------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def evaluate(variant: str, tok: ToyTokenizer, flow: ToyVelocity, pool: LatentPool, mixture: GaussianMixture2D,
             threshold: float, cfg: ToyConfig, seed: int, device: torch.device) -> tuple[dict, dict]:
    """Metrics of one variant, and the arrays the figure draws."""
    x = mixture.sample(cfg.samples, _generator(seed, 8)).to(device)
    mean, logvar = tok.encode(x)
    rec = tok.decode(mean)
    std = (0.5 * logvar.clamp(-30, 20)).exp()
    # held-out flow-matching loss of the final model (same latents, noise and times for both variants)
    g = _generator(seed, 9, device=device)
    z, _ = _reparam(variant, mean, logvar, cfg, g)
    z1 = (z - pool.shift) / pool.scale
    eps = torch.randn(z1.shape, generator=g, device=device)
    t = torch.rand(z1.shape[0], generator=g, device=device)
    flow_loss = (flow(t[:, None] * z1 + (1 - t[:, None]) * eps, t) - (z1 - eps)).square().sum(1).mean()
    z_gen = euler_sample(flow, cfg.samples, cfg.euler_steps, _generator(seed, 10, device=device), device)
    samples = tok.decode(z_gen * pool.scale + pool.shift)
    logp = mixture.log_prob(samples.cpu())
    rec_logp = mixture.log_prob(rec.cpu())
    metrics = {
        "rec_mse": float((rec - x).square().mean()),
        "latent_std": float(std.mean()),
        "rel_latent_std": float((std / pool.scale).mean()),
        "flow_loss": float(flow_loss),
        "sample_loglik": float(logp.mean()),
        "sample_loglik_median": float(logp.median()),
        "off_data": float((logp < threshold).double().mean()),
        "rec_off_data": float((rec_logp < threshold).double().mean()),
    }
    arrays = {"x": x.cpu(), "rec": rec.cpu(), "mean": ((mean - pool.shift) / pool.scale).cpu(),
              "z": z1.cpu(), "z_gen": z_gen.cpu(), "samples": samples.cpu(), "off": (logp < threshold)}
    return metrics, arrays


COLUMNS = (("rec_mse", "rec MSE", "{:.2e}"), ("latent_std", "latent std", "{:.2e}"),
           ("rel_latent_std", "std/spread", "{:.3f}"), ("flow_loss", "flow loss", "{:.3f}"),
           ("sample_loglik", "sample log-lik", "{:.3f}"), ("off_data", "off data", "{:.1%}"),
           ("rec_off_data", "rec off data", "{:.1%}"))


def format_table(results: dict, real: dict) -> str:
    """One row per variant plus the real-data reference row."""
    head = ["variant"] + [c[1] for c in COLUMNS]
    rows = [[v] + [fmt.format(results[v][k]) for k, _, fmt in COLUMNS] for v in results]
    rows.append(["real data", "-", "-", "-", "-", f"{real['loglik']:.3f}", f"{real['off_data']:.1%}", "-"])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def plot(path: str, mixture: GaussianMixture2D, arrays: dict, results: dict, real_x: torch.Tensor) -> None:
    """Figure 1 layout: per variant (row) the data with reconstructions, the latent manifold, the samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lim = 1.6
    res = 160
    grid = torch.linspace(-lim, lim, res)
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")
    logp = mixture.log_prob(torch.stack((gx.reshape(-1), gy.reshape(-1)), 1)).reshape(res, res)
    shade = logp.clamp(min=float(logp.max()) - 12)

    def background(ax):
        ax.imshow(shade.numpy(), origin="lower", extent=(-lim, lim, -lim, lim), cmap="Greys", alpha=0.5)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])

    names = {"kl": "KL (1e-3)", "ve": "VE (lambda_var 1e-2)"}
    fig, axes = plt.subplots(len(arrays), 3, figsize=(13.5, 4.5 * len(arrays)), squeeze=False)
    for row, (variant, a) in zip(axes, arrays.items()):
        m = results[variant]
        n = min(4000, a["x"].shape[0])
        background(row[0])
        row[0].scatter(real_x[:n, 0], real_x[:n, 1], s=0.5, c="tab:blue", alpha=0.4, label="data")
        row[0].scatter(a["rec"][:n, 0], a["rec"][:n, 1], s=0.5, c="tab:red", alpha=0.4, label="reconstruction")
        row[0].set_title(f"{names[variant]}: data and D(mean)\nrec MSE {m['rec_mse']:.2e}")
        row[0].legend(loc="lower right", markerscale=10, fontsize=8)
        ax = row[1]
        ax.scatter(a["z"][:n, 0], a["z"][:n, 1], s=0.5, c="lightsteelblue", alpha=0.5, label="sampled z")
        ax.scatter(a["mean"][:n, 0], a["mean"][:n, 1], s=0.5, c=a["x"][:n, 0], cmap="viridis", label="means")
        ax.scatter(a["z_gen"][:n, 0], a["z_gen"][:n, 1], s=0.5, c="tab:orange", alpha=0.4, label="flow samples")
        ax.set_aspect("equal")
        ax.set_title(f"latent manifold (standardized)\nmean std {m['latent_std']:.2e}, flow loss {m['flow_loss']:.3f}")
        ax.legend(loc="lower right", markerscale=10, fontsize=8)
        background(row[2])
        s, off = a["samples"][:n], a["off"][:n]
        row[2].scatter(s[~off, 0], s[~off, 1], s=0.5, c="tab:green", alpha=0.5, label="on data")
        row[2].scatter(s[off, 0], s[off, 1], s=0.8, c="tab:red", alpha=0.7, label="off data")
        row[2].set_title(f"decoded samples (20 Euler steps)\n"
                         f"log-lik {m['sample_loglik']:.2f}, off data {m['off_data']:.1%}")
        row[2].legend(loc="lower right", markerscale=10, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# entry point

def run(cfg: ToyConfig, seed: int, device: torch.device, progress: bool = True, log=None) -> dict:
    """Train and evaluate both variants; returns the report (metrics, real-data row, figure arrays)."""
    log = log or (lambda msg: print(msg, flush=True))
    mixture = GaussianMixture2D.tree(cfg.data_seed)
    real_x = mixture.sample(cfg.real_samples, _generator(seed, 11))
    real_logp = mixture.log_prob(real_x)
    threshold = float(torch.quantile(real_logp, 0.01))
    held = mixture.log_prob(mixture.sample(cfg.samples, _generator(seed, 12)))
    real = {"loglik": float(held.mean()), "off_data": float((held < threshold).double().mean()),
            "threshold_logp": threshold}
    results, arrays, curves, seconds = {}, {}, {}, {}
    for variant in VARIANTS:
        t0, c0 = time.perf_counter(), time.process_time()
        tok, tok_curve = train_tokenizer(variant, mixture, cfg, seed, device, progress)
        t1, c1 = time.perf_counter(), time.process_time()
        pool = encode_pool(tok, mixture, cfg, seed, device)
        flow, flow_curve = train_flow(variant, pool, cfg, seed, device, progress)
        t2, c2 = time.perf_counter(), time.process_time()
        results[variant], arrays[variant] = evaluate(variant, tok, flow, pool, mixture, threshold, cfg, seed, device)
        # wall and process CPU seconds (CPU / threads estimates the wall time on an idle machine)
        seconds[variant] = {"tokenizer": t1 - t0, "flow": t2 - t1, "eval": time.perf_counter() - t2,
                            "tokenizer_cpu": c1 - c0, "flow_cpu": c2 - c1, "eval_cpu": time.process_time() - c2}
        curves[variant] = {"tokenizer": tok_curve, "flow": flow_curve}
        log(f"{variant}: tokenizer {t1 - t0:.0f} s, flow {t2 - t1:.0f} s, "
            f"off data {results[variant]['off_data']:.1%}")
    return {"metrics": results, "real": real, "curves": curves, "seconds": seconds,
            "arrays": arrays, "mixture": mixture, "real_x": real_x}


def main(args: argparse.Namespace) -> int:
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    cfg = config_from_args(args)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device must name a torch device (cpu, cuda, cuda:1), got {args.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device!r}: CUDA is not available on this machine")
    os.makedirs(args.out, exist_ok=True)
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        preset = "full" if args.full else "quick" if args.quick else "default"
        print(f"vefast toy: preset {preset}, seed {args.seed}, {args.threads} threads, device {device}; "
              f"tokenizer {cfg.depth}x{cfg.width} {cfg.act}, flow {cfg.flow_depth}x{cfg.flow_width} "
              f"{cfg.flow_act}, batch {cfg.batch}, {cfg.tok_steps} + {cfg.flow_steps} steps per variant", flush=True)
        t0, c0 = time.perf_counter(), time.process_time()
        report = run(cfg, args.seed, device, progress=not args.no_progress)
        total, total_cpu = time.perf_counter() - t0, time.process_time() - c0
        table = format_table(report["metrics"], report["real"])
        print(table)
        png = os.path.join(args.out, "toy.png")
        plot(png, report["mixture"], report["arrays"], report["metrics"], report["real_x"])
        payload = {
            "command": "vefast toy", "preset": preset, "seed": args.seed, "threads": args.threads,
            "device": str(device), "config": asdict(cfg), "metrics": report["metrics"], "real": report["real"],
            "curves": report["curves"], "seconds": report["seconds"], "total_seconds": total,
            "total_cpu_seconds": total_cpu,
            "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        }
        with open(os.path.join(args.out, "toy.json"), "w") as f:
            json.dump(payload, f, indent=1)
        print(f"wrote {png} and {os.path.join(args.out, 'toy.json')} ({total:.0f} s)")
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)
    return 0
