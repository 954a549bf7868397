"""What a new user meets first (issue 12 §4): documented names resolve after ``import vefast``, the CLI's
help reads as plain text and shows defaults."""
from __future__ import annotations

import subprocess
import sys

import pytest

from vefast import cli


def test_subpackages_resolve_after_a_plain_import():
    code = ("import sys, vefast\n"
            "assert 'triton' not in sys.modules and 'vefast.nn' not in sys.modules\n"
            "print(vefast.nn.VFLoss.__name__, vefast.sampling.VRTimestepSampler.__name__, vefast.ops.__name__,"
            " vefast.models.__name__, vefast.recipes.__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["VFLoss", "VRTimestepSampler", "vefast.ops", "vefast.models", "vefast.recipes"]
    import vefast

    assert {"nn", "sampling"} <= set(dir(vefast))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        vefast.nope  # noqa: B018


def test_help_is_plain_text(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text and ":func:" not in text
    assert "COMMAND --help" in text


def test_subcommand_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["vr-table", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 500)" in text and "(default: linear)" in text  # with and without a help text
    assert "(default: None)" not in text


def test_vfloss_names_its_own_arguments():
    import torch
    from vefast.nn import VFLoss

    vf = VFLoss(32, 1024)
    with pytest.raises(ValueError, match=r"features has 384 channels .* feature_dim=1024.*ViT-S/14 gives 384"):
        vf(torch.randn(2, 32, 4, 4), torch.randn(2, 384, 4, 4))
    with pytest.raises(ValueError, match=r"z has 16 channels .* latent_dim=32"):
        vf(torch.randn(2, 16, 4, 4), torch.randn(2, 1024, 4, 4))


def test_ve_loss_refuses_negative_weights():
    import torch
    import vefast

    m = torch.zeros(2, 3)
    for kw in ({"lambda_var": -1.0}, {"lambda_reg": -1e-6}):
        with pytest.raises(ValueError, match=f"{next(iter(kw))} must be >= 0"):
            vefast.ve_loss(m, m, **kw)


def test_attention_takes_sdpa_layout_when_told(device):
    import torch
    import torch.nn.functional as F
    import vefast

    q, k, v = (torch.randn(2, 3, 5, 8, device=device) for _ in range(3))  # SDPA's (B, H, N, hd)
    out = vefast.attention(q, k, v, layout="bhnd")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="layout must be one of"):
        vefast.attention(q, k, v, layout="nbhd")
    with pytest.raises(ValueError, match=r"layout='bhnd' for SDPA's \(B, H, N, head_dim\)"):
        vefast.attention(q[0], k[0], v[0])


@pytest.mark.expect_fallback("vf_loss:cpu", "kl_loss:cpu")
def test_fallback_warnings_point_at_the_callers_line(monkeypatch):
    import warnings

    import torch
    import vefast
    from vefast.ops import _common

    monkeypatch.setenv("TRITON_INTERPRET", "0")   # the eager CPU path: reported
    monkeypatch.setattr(_common, "_reported", {})  # as in a fresh process
    z, f, w = torch.randn(1, 2, 2, 2), torch.randn(1, 3, 2, 2), torch.randn(3, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vefast.vf_loss(z, f, w)
        vefast.nn.DiagonalGaussianDistribution(torch.randn(1, 4, 2, 2)).kl_loss()
    ours = [c for c in caught if "vefast:" in str(c.message)]
    assert len(ours) == 2 and all(c.filename == __file__ for c in ours), [(c.filename, c.lineno) for c in ours]


def test_references_point_at_files_users_have():
    """Docs and docstrings cite docs/math.md and papers by name ([VE], [VR], ...), never the design files
    outside the repository ("MATH.md", "seed 004"), which a user of the package cannot open."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = [root / "README.md", *(root / "docs").glob("*.md"), *(root / "vefast").rglob("*.py")]
    bad = re.compile(r"MATH\.md|shared/design|\bseeds? 00\d\b|\bMATH §")
    hits = [f"{p.relative_to(root)}:{i}" for p in files for i, line in enumerate(p.read_text().splitlines(), 1)
            if bad.search(line)]
    assert (root / "docs" / "math.md").is_file()
    assert not hits, hits
