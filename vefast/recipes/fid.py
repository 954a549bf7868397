"""``vefast fid``: FID, sFID, Inception Score, precision and recall the way papers report them — ADM's
evaluator (openai/guided-diffusion ``evaluations/evaluator.py``) on the TF-Inception port that
torch-fidelity and pytorch-fid share, offline.

    vefast fid --samples samples.npz --ref VIRTUAL_imagenet256_labeled.npz \\
               --inception-weights weights-inception-2015-12-05-6726825d.pth

What is computed, as ADM's evaluator does:

- images: uint8 NHWC (``arr_0`` of an npz, ADM's format; or a directory of images), fed as uint8 to
  the Inception of the 2015-12-05 TensorFlow graph (``classify_image_graph_def.pb``), ported by
  torch-fidelity (``FeatureExtractorInceptionV3``: TF1-style bilinear resize to 299, ``(x - 128) / 128``);
  its weights come from a local file (torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` or
  pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``, the same tensors under the same names).
  torchvision's Inception (ImageNet-trained again, other weights) gives other numbers: not used.
- FID: pool_3 features (2048), ``mu = mean``, ``sigma = np.cov`` (float64), Fréchet distance
  ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrtm(S1 S2)`` with scipy's sqrtm in float64 (ADM's eps
  fallback and imaginary-part check; sets smaller than the feature dimension take the exact low-rank
  form, see :func:`frechet_distance`).
- sFID: the same on ``mixed_6/conv`` (torch-fidelity's ``Mixed_6d.branch1x1`` output, after its ReLU),
  first 7 channels, flattened in NHWC order (7 x 17 x 17 = 2023 features), as ADM.
- IS: softmax of ``pool_3 @ W`` (the 1008-way softmax layer without its bias, ADM's
  ``softmax/logits/MatMul``), splits of 5000 in order, the mean of ``exp(E KL(p(y|x) || p(y)))``.
- precision / recall (Kynkäänniemi et al. 2019, ADM's ManifoldEstimator): radii = distance to the 3rd
  nearest neighbour (squared Euclidean distances of pool_3 features) within each set; precision = the
  share of samples inside some reference ball, recall = the share of references inside some sample ball.
  ADM computes the distances in float16 (fp32 where not finite); vefast in fp32.
- reference batches: ADM's ``.npz`` with ``mu`` / ``sigma`` / ``mu_s`` / ``sigma_s`` are used as stored
  (FID and sFID); their ``arr_0`` images give the reference features for precision / recall.

Everything runs on one device (``--device``), in batches, with a progress bar or ``--no-progress``
status lines.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

WEIGHT_FILES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
POOL_DIM, SPATIAL_CHANNELS, LOGITS_DIM = 2048, 7, 1008
IS_SPLIT = 5000
PR_NEIGHBOURS = 3
METRICS = ("fid", "sfid", "is", "precision", "recall")
NAMES = {"fid": "FID", "sfid": "sFID", "is": "Inception Score", "precision": "Precision", "recall": "Recall"}


def _inception_class():
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        raise ImportError("FID needs torch-fidelity (the TF-Inception port ADM's numbers come from): "
                          "pip install torch-fidelity") from None
    return FeatureExtractorInceptionV3


def check_inception_weights(weights: str | Path | None) -> Path:
    """The local Inception weights file, or a ValueError saying where to get it (nothing is downloaded)."""
    _inception_class()
    if weights is None or not Path(weights).is_file():
        raise ValueError(
            f"FID needs the Inception-v3 weights of the 2015-12-05 TF graph as a local file (got {weights!r}): "
            f"torch-fidelity's {WEIGHT_FILES[0]} ({WEIGHTS_URL}) or pytorch-fid's {WEIGHT_FILES[1]}; "
            "download it once and pass its path (--inception-weights / sample.inception_weights)")
    return Path(weights)


class InceptionFeatures(nn.Module):
    """torch-fidelity's TF-Inception with ADM's three outputs: ``forward(uint8 NCHW)`` ->
    (pool_3 (N, 2048), spatial (N, 2023) = mixed_6/conv[..., :7] in NHWC order, logits (N, 1008) =
    pool_3 @ W without bias). Build with :func:`load_inception`."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self._spatial: list[torch.Tensor] = []
        net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: self._spatial.append(o))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self._spatial.clear()
        pool, logits = self.net(x)
        sp = self._spatial.pop()[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(x.shape[0], -1).float()
        return pool.float(), sp, logits.float()


def load_inception(weights: str | Path | None, device: torch.device | str = "cpu", *,
                   random_init: bool = False) -> InceptionFeatures:
    """The Inception of the 2015-12-05 TF graph (torch-fidelity's port) from a local weights file, loaded
    with ``torch.load(weights_only=True)`` (no pickle code runs). ``random_init``: random weights (tests
    only: the numbers mean nothing)."""
    cls = _inception_class()

    class _Net(cls):
        """torch-fidelity's network; its constructor's own load (a download, or an unrestricted unpickle
        of the given path) reads only the empty placeholder written below and is skipped."""

        def load_state_dict(self, state_dict, strict=True, assign=False):
            if isinstance(state_dict, dict) and not state_dict:
                return None
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        placeholder = Path(tmp) / "empty.pth"
        torch.save({}, placeholder)
        net = _Net("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(placeholder))
    if random_init:  # He-normal convs and a unit-scale softmax layer: features of order 1 through the depth
        g = torch.Generator().manual_seed(0)
        for mod in net.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, nonlinearity="relu", generator=g)
        nn.init.normal_(net.fc.weight, std=POOL_DIM ** -0.5, generator=g)
    else:
        path = check_inception_weights(weights)
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
            raise ValueError(f"{path}: not a PyTorch weights file ({type(e).__name__}: {e})") from None
        if not isinstance(sd, dict):
            raise ValueError(f"{path}: expected a state dict of the Inception, got {type(sd).__name__}")
        want = set(net.state_dict())
        missing = sorted(k for k in want - set(sd) if not k.endswith("num_batches_tracked"))
        unexpected = sorted(set(sd) - want)
        if missing or unexpected:
            raise ValueError(f"{path}: not the 2015-12-05 Inception weights (missing {missing[:3]}..., unexpected "
                             f"{unexpected[:3]}...); expected {' or '.join(WEIGHT_FILES)}")
        nn.Module.load_state_dict(net, sd, strict=False)
    net.eval().requires_grad_(False)
    return InceptionFeatures(net).to(device)


# ---------------------------------------------------------------------------------------------
# npz images (ADM's format): streaming read and write

class NpzImages:
    """uint8 NHWC images of ``arr_0`` (or ``key``) in an npz, read in batches without loading them all
    (like ADM's ``open_npz_array``). Use as a context manager."""

    def __init__(self, path: str | Path, key: str = "arr_0"):
        self.path, self.key = Path(path), key
        self._zip = zipfile.ZipFile(self.path)
        name = f"{key}.npy"
        if name not in self._zip.namelist():
            self._zip.close()
            raise ValueError(f"{self.path}: no {key!r} array (ADM's sample / reference batches keep images in arr_0)")
        self._f = self._zip.open(name)
        version = np.lib.format.read_magic(self._f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(self._f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(self._f)
        else:
            self.close()
            raise ValueError(f"{self.path}: {key} uses .npy format {version}, which this reader does not stream")
        if fortran or dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
            self.close()
            raise ValueError(f"{self.path}: {key} must be uint8 NHWC images (N, H, W, 3), got {dtype} {shape}"
                             f"{' in Fortran order' if fortran else ''}")
        self.shape = tuple(shape)

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        per = int(np.prod(self.shape[1:]))
        for start in range(0, self.shape[0], batch_size):
            n = min(batch_size, self.shape[0] - start)
            buf = self._f.read(n * per)
            if len(buf) != n * per:
                raise ValueError(f"{self.path}: {self.key} is truncated")
            yield np.frombuffer(buf, dtype=np.uint8).reshape(n, *self.shape[1:])

    def close(self) -> None:
        self._f.close() if hasattr(self, "_f") else None
        self._zip.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@contextmanager
def npz_writer(path: str | Path):
    """``write(name, shape, dtype, chunks)`` streams arrays into an uncompressed npz (``np.load`` reads it;
    ADM's evaluator streams ``arr_0`` from it) without holding them in memory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    zf = zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)

    def write(name: str, shape: tuple[int, ...], dtype, chunks) -> None:
        dtype = np.dtype(dtype)
        with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                     "fortran_order": False, "shape": tuple(shape)})
            total = 0
            for c in chunks:
                c = np.ascontiguousarray(c, dtype=dtype)
                f.write(c.tobytes())
                total += c.shape[0] if c.ndim else 1
            if shape and total != shape[0]:
                raise ValueError(f"npz_writer: {name} got {total} rows, declared {shape[0]}")

    try:
        yield write
        zf.close()
        tmp.replace(path)
    except BaseException:
        zf.close()
        tmp.unlink(missing_ok=True)
        raise


def image_dir_batches(root: str | Path, batch_size: int, image_size: int | None = None):
    """(count, iterator of uint8 NHWC batches) of the images under ``root`` (sorted), center-cropped to
    ``image_size`` with ADM's preprocessing when given (else as they are: they must share one size)."""
    from PIL import Image

    from .data import IMAGE_EXTENSIONS, center_crop_arr

    files = sorted(f for f in Path(root).rglob("*") if f.suffix in IMAGE_EXTENSIONS or f.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"{root}: no images")

    def gen():
        for start in range(0, len(files), batch_size):
            arrs = []
            for f in files[start:start + batch_size]:
                with Image.open(f) as im:
                    im = im.convert("RGB")
                    arrs.append(center_crop_arr(im, image_size) if image_size else np.asarray(im))
            yield np.stack(arrs)

    return len(files), gen()


# ---------------------------------------------------------------------------------------------
# activations and statistics

@dataclasses.dataclass
class Activations:
    pool: np.ndarray      # (N, 2048) float32
    spatial: np.ndarray   # (N, 2023) float32
    logits: np.ndarray    # (N, 1008) float32 (pool @ W, no bias)


def compute_activations(model: InceptionFeatures, batches, *, device: torch.device | str, total: int | None = None,
                        progress=None) -> Activations:
    """Inception outputs of uint8 NHWC batches (numpy or torch)."""
    pools, spatials, logits = [], [], []
    for b in batches:
        x = torch.as_tensor(np.array(b, copy=True)).to(device).permute(0, 3, 1, 2)
        if x.dtype != torch.uint8 or x.shape[1] != 3:
            raise ValueError(f"images must be uint8 NHWC with 3 channels, got {x.dtype} {tuple(x.permute(0, 2, 3, 1).shape)}")
        p, s, lg = model(x.contiguous())
        pools.append(p.cpu().numpy())
        spatials.append(s.cpu().numpy())
        logits.append(lg.cpu().numpy())
        if progress is not None:
            progress.update(x.shape[0])
    if not pools:
        raise ValueError("no images")
    return Activations(np.concatenate(pools), np.concatenate(spatials), np.concatenate(logits))


@dataclasses.dataclass
class FIDStatistics:
    mu: np.ndarray     # float64 (D,)
    sigma: np.ndarray  # float64 (D, D)
    factor: np.ndarray | None = None  # (n, D) with sigma = factor^T factor, kept when n - 1 < D (small sets)

    @classmethod
    def of(cls, activations: np.ndarray) -> FIDStatistics:
        """``np.mean`` and ``np.cov`` (rows are samples) in float64, as ADM; for fewer rows than features
        also the factor ``(a - mu) / sqrt(n - 1)`` (sigma is then singular, see :func:`frechet_distance`)."""
        a = np.asarray(activations, dtype=np.float64)
        if a.ndim != 2 or a.shape[0] < 2:
            raise ValueError(f"FID statistics need at least 2 feature rows, got shape {a.shape}")
        mu = a.mean(axis=0)
        factor = (a - mu) / math.sqrt(a.shape[0] - 1) if a.shape[0] - 1 < a.shape[1] else None
        return cls(mu, np.cov(a, rowvar=False), factor)

    def frechet_distance(self, other: FIDStatistics, eps: float = 1e-6) -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma, eps=eps,
                                factor1=self.factor, factor2=other.factor)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6, *, factor1: np.ndarray | None = None,
                     factor2: np.ndarray | None = None) -> float:
    """``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrtm(S1 S2)`` in float64, ADM's / TTUR's formula: scipy's
    sqrtm, an ``eps`` ridge when it is not finite, an imaginary part above 1e-3 on the diagonal is an
    error. When one covariance comes with a low-rank factor (``S = A^T A``, A of n < D rows: a set smaller
    than the feature dimension), ``tr sqrtm(S1 S2)`` is computed exactly from the n x n matrix
    ``A S_other A^T``, which has the same nonzero eigenvalues (sqrtm is slow and inexact on such
    singular products)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"frechet_distance: mismatched statistics mu {mu1.shape} / {mu2.shape}, "
                         f"sigma {s1.shape} / {s2.shape}")
    diff = mu1 - mu2
    low = [(f, other) for f, other in ((factor1, s2), (factor2, s1)) if f is not None]
    if low:
        f, other = min(low, key=lambda p: p[0].shape[0])
        small = f @ other @ f.T
        tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((small + small.T) / 2), 0, None)).sum())
        return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)
    from scipy import linalg

    covmean = linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid: singular product of covariances; adding {eps} to their diagonals", stacklevel=2)
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: imaginary component {np.max(np.abs(covmean.imag))} in sqrtm(S1 S2)")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT) -> float:
    """ADM's Inception Score: ``softmax(logits)`` (1008 classes) per split of ``split_size`` rows in order,
    ``exp(mean_x KL(p(y|x) || p(y)))`` per split, mean over splits."""
    lg = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    preds = torch.softmax(lg, dim=1).numpy()
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        with np.errstate(divide="ignore", invalid="ignore"):  # 0 log 0 = 0 (ADM's formula gives NaN there)
            kl = np.where(part > 0, part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True))), 0.0)
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def _sq_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances ``max(|a|^2 - 2 a.b + |b|^2, 0)`` (ADM's form), fp32."""
    return ((a * a).sum(1, keepdim=True) - 2.0 * a @ b.T + (b * b).sum(1)[None, :]).clamp_min_(0.0)


def manifold_radii(features: torch.Tensor, k: int = PR_NEIGHBOURS, max_elems: int = 1 << 27) -> torch.Tensor:
    """Squared distance of every row to its k-th nearest other row (the (k+1)-th smallest, self at 0)."""
    n = features.shape[0]
    if n <= k:
        raise ValueError(f"precision/recall need more than k = {k} images per set, got {n}")
    rows = max(1, min(n, max_elems // n))
    out = torch.empty(n, dtype=torch.float32, device=features.device)
    for s in range(0, n, rows):
        d = _sq_distances(features[s:s + rows], features)
        out[s:s + rows] = d.kthvalue(k + 1, dim=1).values
    return out


def precision_recall(ref: np.ndarray, samples: np.ndarray, *, device: torch.device | str = "cpu",
                     k: int = PR_NEIGHBOURS, max_elems: int = 1 << 27) -> tuple[float, float]:
    """(precision, recall) of ADM's ManifoldEstimator (k = 3) on pool_3 features."""
    a = torch.as_tensor(np.asarray(ref), dtype=torch.float32, device=device)
    b = torch.as_tensor(np.asarray(samples), dtype=torch.float32, device=device)
    ra, rb = manifold_radii(a, k, max_elems), manifold_radii(b, k, max_elems)
    a_in = torch.zeros(a.shape[0], dtype=torch.bool, device=device)
    b_in = torch.zeros(b.shape[0], dtype=torch.bool, device=device)
    rows = max(1, min(a.shape[0], max_elems // b.shape[0]))
    for s in range(0, a.shape[0], rows):
        d = _sq_distances(a[s:s + rows], b)
        a_in[s:s + rows] = (d <= rb[None, :]).any(dim=1)          # reference inside some sample ball
        b_in |= (d <= ra[s:s + rows, None]).any(dim=0)           # sample inside some reference ball
    return float(b_in.double().mean()), float(a_in.double().mean())


# ---------------------------------------------------------------------------------------------
# reference batches and the whole evaluation

@dataclasses.dataclass
class Reference:
    stats: FIDStatistics | None
    stats_spatial: FIDStatistics | None
    activations: Activations | None


def load_reference(ref: str | Path, model: InceptionFeatures | None, *, device, batch_size: int,
                   need_activations: bool, image_size: int | None = None, progress_factory=None) -> Reference:
    """An ADM reference batch (``.npz``: stored ``mu``/``sigma``/``mu_s``/``sigma_s`` used as they are,
    ``arr_0`` images for precision / recall), a sample-style ``.npz`` (images only), or a directory of
    images (center-cropped to ``image_size``)."""
    ref = Path(ref)
    stats = stats_s = None
    acts = None
    if ref.is_dir():
        n, batches = image_dir_batches(ref, batch_size, image_size)
    elif ref.suffix == ".npz":
        with np.load(ref) as z:
            keys = set(z.files)
            if "mu" in keys and "sigma" in keys:
                stats = FIDStatistics(z["mu"].astype(np.float64), z["sigma"].astype(np.float64))
                if "mu_s" in keys and "sigma_s" in keys:
                    stats_s = FIDStatistics(z["mu_s"].astype(np.float64), z["sigma_s"].astype(np.float64))
            has_images = "arr_0" in keys
        if stats is not None and (not need_activations or not has_images) and stats_s is not None:
            return Reference(stats, stats_s, None)
        if not has_images:
            raise ValueError(f"--ref {ref}: no arr_0 images and no stored mu/sigma + mu_s/sigma_s statistics")
        reader = NpzImages(ref)
        n, batches = len(reader), reader.batches(batch_size)
    else:
        raise ValueError(f"--ref {ref}: expected an ADM reference .npz or a directory of images")
    if model is None:
        raise ValueError(f"--ref {ref}: computing reference features needs the Inception")
    bar = progress_factory(n, "fid: reference") if progress_factory else None
    acts = compute_activations(model, batches, device=device, progress=bar)
    if bar is not None:
        bar.close()
    if stats is None:
        stats = FIDStatistics.of(acts.pool)
    if stats_s is None:
        stats_s = FIDStatistics.of(acts.spatial)
    return Reference(stats, stats_s, acts)


def evaluate(samples: Activations, ref: Reference, metrics=METRICS, *, device="cpu") -> dict[str, float]:
    """The requested metrics of sample activations against a reference."""
    out: dict[str, float] = {"num_samples": int(samples.pool.shape[0])}
    if "is" in metrics:
        out["is"] = inception_score(samples.logits)
    if "fid" in metrics:
        out["fid"] = FIDStatistics.of(samples.pool).frechet_distance(ref.stats)
    if "sfid" in metrics and ref.stats_spatial is not None:
        out["sfid"] = FIDStatistics.of(samples.spatial).frechet_distance(ref.stats_spatial)
    if ("precision" in metrics or "recall" in metrics) and ref.activations is not None:
        out["precision"], out["recall"] = precision_recall(ref.activations.pool, samples.pool, device=device)
    return out


def fid_of_images(images_u8, reference: str | Path, weights: str | Path | None, *, device, batch_size: int = 100,
                  metrics=("fid",), random_init: bool = False) -> dict[str, float]:
    """Metrics of uint8 NHWC images (an array, or an iterable of batches) against ``reference`` (see
    :func:`load_reference`; a directory of reference images is center-cropped to the samples' size);
    what ``train-dit`` calls for its in-training FID."""
    model = load_inception(weights, device, random_init=random_init)
    if isinstance(images_u8, (np.ndarray, torch.Tensor)):
        images_u8 = [images_u8[i:i + batch_size] for i in range(0, len(images_u8), batch_size)]
    sizes: list[int] = []

    def recorded():
        for b in images_u8:
            sizes.append(int(b.shape[1]))
            yield b

    acts = compute_activations(model, recorded(), device=device)
    need = "precision" in metrics or "recall" in metrics
    ref = load_reference(reference, model, device=device, batch_size=batch_size, need_activations=need,
                         image_size=sizes[0])
    return evaluate(acts, ref, metrics, device=device)


# ---------------------------------------------------------------------------------------------
# command

def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .progress import add_progress_arguments

    parser.add_argument("--samples", required=True, help="sample batch: .npz with uint8 NHWC arr_0 (ADM's format)")
    parser.add_argument("--ref", required=True,
                        help="reference batch: ADM's .npz (stored mu/sigma used as they are) or a directory of images")
    parser.add_argument("--inception-weights", default=None,
                        help=f"local weights file ({WEIGHT_FILES[0]} or {WEIGHT_FILES[1]})")
    parser.add_argument("--metrics", default=",".join(METRICS), help=f"comma-separated subset of {','.join(METRICS)}")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--out", default=None, help="also write the metrics as JSON here")
    parser.add_argument("--random-inception", action="store_true", help=argparse.SUPPRESS)  # tests only
    add_progress_arguments(parser)


USER_ERRORS = (ValueError, ImportError, FileNotFoundError)


def main(args: argparse.Namespace) -> int:
    return run(args)


def run(args: argparse.Namespace) -> int:
    from .distributed import pick_device
    from .progress import ProgressReporter

    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    bad = sorted(set(metrics) - set(METRICS))
    if bad or not metrics:
        raise ValueError(f"--metrics: unknown {bad}; choose from {', '.join(METRICS)}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = pick_device(args.device)
    if not args.random_inception:
        check_inception_weights(args.inception_weights)
    if not Path(args.samples).is_file():
        raise FileNotFoundError(f"--samples {args.samples}: no such file")
    if not Path(args.ref).exists():
        raise FileNotFoundError(f"--ref {args.ref}: no such file or directory")
    model = load_inception(args.inception_weights, device, random_init=args.random_inception)

    def bar(total: int, desc: str) -> ProgressReporter:
        return ProgressReporter(total, desc=desc, bar=not args.no_progress, every_s=args.status_every)

    with NpzImages(args.samples) as reader:
        b = bar(len(reader), "fid: samples")
        acts = compute_activations(model, reader.batches(args.batch_size), device=device, progress=b)
        b.close()
        image_size = reader.shape[1]
    need = "precision" in metrics or "recall" in metrics
    ref = load_reference(args.ref, model, device=device, batch_size=args.batch_size, need_activations=need,
                         image_size=image_size, progress_factory=bar)
    res = evaluate(acts, ref, metrics, device=device)
    if need and ref.activations is None:
        print("fid: the reference has no images (arr_0): no precision / recall", file=sys.stderr)
    for k in METRICS:
        if k in res:
            print(f"{NAMES[k]}: {res[k]:.6g}")
    if args.out:
        Path(args.out).write_text(json.dumps({**res, "samples": str(args.samples), "ref": str(args.ref)}, indent=1))
    return 0
