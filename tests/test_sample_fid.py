"""``vefast sample`` and ``vefast fid`` on a tiny run, on the CPU.

Sampling: ADM's npz layout (uint8 NHWC ``arr_0``, labels ``arr_1``); the same file from 1 rank and from
2 gloo ranks (torchrun), per-image seeds (the first images do not depend on how many are drawn), resume
from the kept chunks. FID: the whole path with a randomly initialised TF-Inception (torch-fidelity's
port) on tiny sets — a set against itself gives FID ~ 0, precision = recall = 1; stored reference
``mu``/``sigma`` are used as they are; the statistics and the Fréchet distance against float64
references; IS and precision/recall against brute-force definitions; missing or wrong weights fail clearly.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import launch_report, train_tiny_tokenizer
import torch

from vefast.cli import main as cli
from vefast.recipes import fid
from vefast.recipes.config import load_config
from vefast.recipes.dit import DiTConfig
from vefast.recipes.dit import train as train_dit

pytest.importorskip("torch_fidelity")
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory, eager):
    """A 4-step tiny DiT on latents of a 2-step tiny tokenizer (synthetic images)."""
    base = tmp_path_factory.mktemp("sample")
    train_tiny_tokenizer(base / "tok")
    assert cli(["extract-latents", "--tokenizer", str(base / "tok"), "--synthetic", "16", "--out", str(base / "lat"),
                "--batch-size", "8", "--num-workers", "0", "--device", "cpu", "--no-progress"]) == 0
    cfg = load_config(DiTConfig, "dit_tiny.yaml", ["model.fused=false", "train.steps=4", "train.ckpt_every=4",
                                                   "sample.steps=1", "sample.num_images=1"])
    assert train_dit(cfg, latents=base / "lat", out=base / "run", progress=False) == 0
    assert (base / "run" / "samples" / "step-00000004-classes-0.png").is_file()  # the class of each grid row
    return base / "run"


SAMPLE = ["--steps", "2", "--sampler", "heun", "--cfg-scale", "2", "--cfg-interval", "0.2,1", "--batch-size", "3",
          "--no-fused", "--device", "cpu", "--no-progress"]


def _sample(run_dir: Path, out: Path, num: int, nproc: int = 1, extra=()):
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    where = [str(run_dir)] if nproc > 1 else ["--run", str(run_dir)]  # torchrun's parser takes --run itself
    cmd = [sys.executable, *launch, "-m", "vefast.cli", "sample", *where, "--num-images", str(num),
           "--out", str(out), *SAMPLE, *extra]
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240, cwd=out.parent)
    assert p.returncode == 0, launch_report(p)
    return p


@pytest.fixture(scope="module")
def samples(run):
    one = run.parent / "one.npz"
    p = _sample(run, one, 10, extra=["--keep-parts"])
    return one, p


@pytest.mark.expect_fallback("*:cpu")
def test_sample_npz_format_and_rank_count_reproducibility(run, samples):
    one, p = samples
    with np.load(one) as z:
        assert z.files == ["arr_0", "arr_1"]
        images, labels = z["arr_0"], z["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (10, 32, 32, 3) and labels.dtype == np.int64
    assert labels.min() >= 0 and labels.max() < 4 and len(set(labels.tolist())) > 1  # random labels
    assert images.std() > 0
    assert json.loads(one.with_suffix(".json").read_text())["sampler"] == "heun"
    assert "sample: 10/10 img (100.0%)" in p.stderr
    two = run.parent / "two.npz"
    _sample(run, two, 10, nproc=2)  # 4 chunks of 3, 3, 3, 1 images: rank 0 makes chunks 0 and 2
    with np.load(two) as z:
        assert np.array_equal(z["arr_0"], images) and np.array_equal(z["arr_1"], labels)
    assert not (run.parent / "two.npz.parts").exists()
    # per-image seeds: the first 6 images of a 6-image set are those of the 10-image set
    six = run.parent / "six.npz"
    _sample(run, six, 6)
    with np.load(six) as z:
        assert np.array_equal(z["arr_0"], images[:6]) and np.array_equal(z["arr_1"], labels[:6])
    # ADM's streaming reader (vefast's) reads the file as np.load does
    with fid.NpzImages(one) as r:
        assert len(r) == 10 and np.array_equal(np.concatenate(list(r.batches(4))), images)


@pytest.mark.expect_fallback("*:cpu")
def test_sample_resumes_from_kept_chunks(run, samples):
    one, _ = samples
    parts = run.parent / "one.npz.parts"
    assert sorted(p.name for p in parts.glob("chunk-*.npz")) == [f"chunk-{k:06d}.npz" for k in range(4)]
    again = run.parent / "again.npz"
    (run.parent / "again.npz.parts").mkdir()
    for k in (0, 3):  # an interrupted run had finished chunks 0 and 3 (with the same settings)
        (run.parent / "again.npz.parts" / f"chunk-{k:06d}.npz").write_bytes((parts / f"chunk-{k:06d}.npz").read_bytes())
    (run.parent / "again.npz.parts" / "extract.json").write_text((parts / "extract.json").read_text())
    _sample(run, again, 10)
    with np.load(again) as a, np.load(one) as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])
    bad = run.parent / "bad.npz"
    (run.parent / "bad.npz.parts").mkdir()
    (run.parent / "bad.npz.parts" / "extract.json").write_text((parts / "extract.json").read_text())
    p = subprocess.run([sys.executable, "-m", "vefast.cli", "sample", "--run", str(run), "--num", "10", "--out", str(bad),
                        *SAMPLE, "--seed", "3"], env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "holds chunks of a sampling run with other settings" in p.stderr


def test_sample_bad_arguments(run, capsys):
    assert cli(["sample", "--run", str(run), "--num", "4", "--out", str(run.parent / "x.png")]) == 2
    assert "--out must end in .npz" in capsys.readouterr().err
    assert cli(["sample", "--run", str(run), "--num", "4", "--out", str(run.parent / "x.npz"),
                "--cfg-interval", "0.5,0.2"]) == 2
    assert "0 <= LO <= HI <= 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# FID

@pytest.fixture(scope="module")
def inception():
    return fid.load_inception(None, "cpu", random_init=True)


def _random_images(n, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 1, 1, 3, generator=g) * 200
    return (base + torch.rand(n, size, size, 3, generator=g) * 55).to(torch.uint8).numpy()


def test_fid_whole_path_a_set_against_itself(tmp_path, capsys, inception, monkeypatch):
    """``vefast fid`` with a random Inception: a 4-image set against itself (its own reference, no stored
    statistics) gives FID ~ 0 and sFID ~ 0 (relative to tr sigma), precision = recall = 1; against an ADM-style reference with
    stored mu/sigma the stored statistics are used as they are."""
    imgs = _random_images(4)
    acts = fid.compute_activations(inception, [imgs], device="cpu")
    s = tmp_path / "s.npz"
    np.savez(s, imgs)
    out = tmp_path / "m.json"
    assert cli(["fid", "--samples", str(s), "--ref", str(s), "--random-inception", "--device", "cpu", "--batch-size", "3",
                "--no-progress", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    tr = float(np.trace(fid.FIDStatistics.of(acts.pool).sigma))
    tr_s = float(np.trace(fid.FIDStatistics.of(acts.spatial).sigma))
    # tr sqrtm(S S) from eigenvalues of a squared (rank-deficient) matrix: the zero eigenvalue comes back as
    # ~eps * lambda_max^2, whose square root is ~sqrt(eps) lambda_max: the error floor is sqrt(eps) ~ 1.5e-8 of tr
    assert abs(res["fid"]) < 1e-6 * tr and abs(res["sfid"]) < 1e-6 * tr_s, (res, tr, tr_s)
    assert res["precision"] == 1.0 and res["recall"] == 1.0 and res["is"] >= 1.0 - 1e-9
    assert res["is"] == pytest.approx(fid.inception_score(acts.logits), rel=1e-6)
    text = capsys.readouterr()
    assert "FID: " in text.out and "fid: samples: 4/4 img" in text.err
    # an ADM reference batch: stored statistics are used as they are (here: those of other features)
    g = np.random.default_rng(0)
    st = fid.FIDStatistics.of(acts.pool + g.normal(0, 0.01, acts.pool.shape))
    sts = fid.FIDStatistics.of(acts.spatial * 1.5)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=imgs[:1], mu=st.mu, sigma=st.sigma, mu_s=sts.mu, sigma_s=sts.sigma)
    loaded = fid.load_reference(ref, None, device="cpu", batch_size=4, need_activations=False)
    assert loaded.activations is None and np.array_equal(loaded.stats.sigma, st.sigma)
    calls = []
    monkeypatch.setattr(fid, "frechet_distance", lambda *a, **k: calls.append(a) or 0.0)  # (sqrtm of 2048^2: slow)
    fid.evaluate(acts, loaded, ("fid", "sfid"))
    want = [(fid.FIDStatistics.of(acts.pool), st), (fid.FIDStatistics.of(acts.spatial), sts)]
    assert len(calls) == 2
    for (mu1, s1, mu2, s2), (a_, b_) in zip(calls, want):
        assert np.array_equal(mu1, a_.mu) and np.array_equal(s1, a_.sigma)
        assert np.array_equal(mu2, b_.mu) and np.array_equal(s2, b_.sigma)  # the stored ones, as they are


def _frechet_float64(mu1, s1, mu2, s2) -> float:
    """|mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr (S1^1/2 S2 S1^1/2)^1/2 with symmetric square roots (eigh)."""
    s1, s2 = torch.as_tensor(s1, dtype=torch.float64), torch.as_tensor(s2, dtype=torch.float64)
    w, v = torch.linalg.eigh(s1)
    r1 = v @ torch.diag(w.clamp_min(0).sqrt()) @ v.T
    inner = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp_min(0).sqrt().sum()
    d = torch.as_tensor(mu1 - mu2, dtype=torch.float64)
    return float(d @ d + s1.trace() + s2.trace() - 2 * inner)


@pytest.mark.parametrize("n,dim", [(300, 16), (50, 64)])  # full-rank and rank-deficient covariances
def test_statistics_and_frechet_against_float64(n, dim):
    g = np.random.default_rng(n)
    a = g.normal(size=(n, dim)).astype(np.float32)
    b = (g.normal(size=(n, dim)) @ g.normal(size=(dim, dim)) * 0.3 + 0.5).astype(np.float32)
    sa, sb = fid.FIDStatistics.of(a), fid.FIDStatistics.of(b)
    a64 = torch.as_tensor(a, dtype=torch.float64)
    centred = a64 - a64.mean(0)
    torch.testing.assert_close(torch.as_tensor(sa.mu), a64.mean(0), rtol=0, atol=1e-14)
    torch.testing.assert_close(torch.as_tensor(sa.sigma), centred.T @ centred / (n - 1), rtol=0, atol=1e-12)
    want = _frechet_float64(sa.mu, sa.sigma, sb.mu, sb.sigma)
    assert (sa.factor is None) == (n > dim)  # fewer rows than features: the low-rank form
    assert sa.frechet_distance(sb) == pytest.approx(want, rel=1e-8, abs=1e-9)
    # ADM's formula as written (scipy sqrtm of S1 S2, float64) agrees, to sqrtm's accuracy on singular products
    adm = fid.frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
    assert adm == pytest.approx(want, rel=1e-7 if n > dim else 1e-4)
    assert abs(sa.frechet_distance(sa)) < 1e-9 * float(np.trace(sa.sigma))
    with pytest.raises(ValueError, match="mismatched statistics"):
        fid.frechet_distance(sa.mu, sa.sigma, sb.mu[:-1], sb.sigma[:-1, :-1])


def test_inception_score_and_precision_recall_definitions():
    uniform = np.zeros((40, 1008))
    assert fid.inception_score(uniform) == pytest.approx(1.0)
    onehot = np.full((48, 1008), -1e4)  # probabilities of exactly 0 (0 log 0 = 0)
    onehot[np.arange(48), np.arange(48) % 8] = 0.0  # 8 classes, each seen 6 times: IS = 8
    assert fid.inception_score(onehot) == pytest.approx(8.0, rel=1e-9)
    assert fid.inception_score(onehot, split_size=24) == pytest.approx(8.0, rel=1e-9)  # 2 splits, 8 classes each
    assert fid.inception_score(onehot, split_size=4) == pytest.approx(4.0, rel=1e-9)   # 12 splits of 4 classes
    g = np.random.default_rng(1)
    ref, smp = g.normal(size=(30, 5)), g.normal(size=(25, 5)) + 0.7
    d = lambda x, y: ((x[:, None] - y[None]) ** 2).sum(-1)  # noqa: E731
    rad = lambda x: np.sort(d(x, x), axis=1)[:, 3]  # noqa: E731  (3rd neighbour, self at 0)
    prec = (d(smp, ref) <= rad(ref)[None, :]).any(1).mean()
    rec = (d(ref, smp) <= rad(smp)[None, :]).any(1).mean()
    got = fid.precision_recall(ref, smp, max_elems=64)  # small blocks: several row blocks
    assert got == pytest.approx((prec, rec), abs=1e-12)


def test_inception_weights_file_loading_and_errors(tmp_path, inception, capsys):
    """A weights file is read with weights_only=True and every key is checked; the random net's own state
    dict round-trips; missing / wrong files fail with a message naming the expected file."""
    f = tmp_path / fid.WEIGHT_FILES[0]
    torch.save({k: v for k, v in inception.net.state_dict().items() if not k.endswith("num_batches_tracked")}, f)
    loaded = fid.load_inception(f, "cpu")
    x = torch.from_numpy(_random_images(2)).permute(0, 3, 1, 2).contiguous()
    for a, b in zip(loaded(x), inception(x)):
        assert torch.equal(a, b)
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="not the 2015-12-05 Inception weights"):
        fid.load_inception(bad, "cpu")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a PyTorch weights file"):
        fid.load_inception(tmp_path / "junk.pth", "cpu")
    s = tmp_path / "s.npz"
    np.savez(s, _random_images(4))
    assert cli(["fid", "--samples", str(s), "--ref", str(s), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "weights-inception-2015-12-05-6726825d.pth" in err and "pt_inception-2015-12-05" in err
    np.savez(tmp_path / "f.npz", np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="must be uint8 NHWC"):
        fid.NpzImages(tmp_path / "f.npz")


def test_npz_writer_streams_what_np_load_reads(tmp_path):
    a = _random_images(7, size=5)
    with fid.npz_writer(tmp_path / "w.npz") as write:
        write("arr_0", a.shape, np.uint8, [a[:3], a[3:]])
        write("arr_1", (7,), np.int64, [np.arange(7)])
    with np.load(tmp_path / "w.npz") as z:
        assert np.array_equal(z["arr_0"], a) and np.array_equal(z["arr_1"], np.arange(7))
    with pytest.raises(ValueError, match="got 3 rows, declared 7"):
        with fid.npz_writer(tmp_path / "x.npz") as write:
            write("arr_0", a.shape, np.uint8, [a[:3]])
    assert not (tmp_path / "x.npz").exists() and not list(tmp_path.glob(".x.npz*"))
