"""README.md's code blocks run as written (CPU lane; the Triton ops interpreted, tests/conftest.py).

- Every ```python block runs, in README order, in one namespace that holds only the stand-ins below for
  the user's own objects (``encoder``, ``images``, ``latents``, ``model``...): small CPU tensors and
  modules, so imports the snippets forget fail here. ``vefast.load_dinov2`` returns a random-weight
  DINOv2 (no download) and files go to a temporary directory. After each block its comments' claims
  (types, shapes) are checked.
- Every ```bash line starting with ``vefast`` is parsed by the real CLI parser (nothing runs), and a
  ``--config`` must name a shipped config; ``make X`` targets must exist in the Makefile,
  ``python -m X`` modules must be importable, ``VEFAST_*`` variables must be read by setup.py and an
  sdist file name must carry the package version. Other lines, and unfenced blocks (output), are ignored.
- Inline `vefast ... --flag` commands of the prose are parsed the same way.
- Self-checks: the block runner and the line checkers reject deliberately broken input.
"""
from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vefast
import vefast.dinov2

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(?P<lang>[^\n`]*)\n(?P<code>.*?)^```[ \t]*$", re.M | re.S)


# ---------------------------------------------------------------------------------------------- parsing
def fenced_blocks(text: str) -> list[tuple[str, str, int]]:
    """``(language, code, first code line number)`` of every fenced block of a Markdown text."""
    return [(m["lang"].strip(), m["code"], text.count("\n", 0, m.start("code")) + 1) for m in FENCE.finditer(text)]


def readme_blocks(lang: str) -> list[tuple[str, int]]:
    blocks = [(code, line) for kind, code, line in fenced_blocks(README.read_text()) if kind == lang]
    assert blocks, f"README.md has no ```{lang} block (fence parsing broken?)"
    return blocks


def run_block(code: str, namespace: dict, line: int = 1) -> None:
    """Execute a snippet; tracebacks point at README.md's own line numbers."""
    exec(compile("\n" * (line - 1) + code, str(README), "exec"), namespace)


# ---------------------------------------------------------------------------------------------- stand-ins
# The user's own objects each snippet assumes, keyed by a line of the snippet that identifies it.
def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ve_objects() -> dict:
    C = 4
    return {
        "x": torch.rand(2, 3, 8, 8, generator=_g(0)) * 2 - 1,
        "encoder": nn.Conv2d(3, 2 * C, kernel_size=2, stride=2),        # moments (B, 2C, 4, 4)
        "decoder": nn.ConvTranspose2d(C, 3, kernel_size=2, stride=2),
        "rec_loss": F.mse_loss,
        "w_ve": 0.1,
        "mean": torch.randn(2, C, 4, 4, generator=_g(1), requires_grad=True),
        "logvar": torch.randn(2, C, 4, 4, generator=_g(2), requires_grad=True),
    }


def check_ve(ns: dict) -> None:
    from vefast.nn import DiagonalGaussianDistribution
    assert isinstance(ns["posterior"], DiagonalGaussianDistribution)
    assert isinstance(ns["out"], vefast.VEOutput) and ns["out"].z.shape == ns["mean"].shape
    assert isinstance(ns["kl"], vefast.KLOutput)
    loss = ns["loss"]
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()                                                      # the fused loss is differentiable
    assert ns["encoder"].weight.grad is not None


def alignment_objects() -> dict:
    B, h, w, hidden = 2, 4, 4, 32
    return {
        "images": torch.rand(B, 3, 32, 32, generator=_g(3)) * 2 - 1,
        "z": torch.randn(B, 32, h, w, generator=_g(4), requires_grad=True),
        "hidden": torch.randn(B, h * w, hidden, generator=_g(5)),
        "projector": vefast.nn.REPAProjector(hidden, 1024, proj_dim=64),
        "dino_tokens": torch.randn(B, h * w, 1024, generator=_g(6)),
    }


def check_alignment(ns: dict) -> None:
    B, _, h, w = ns["z"].shape
    assert ns["feats"].shape == (B, 1024, h, w) and ns["cls"].shape == (B, 1024)
    assert isinstance(ns["out"], vefast.VFOutput) and torch.isfinite(ns["out"].loss)
    ns["out"].loss.backward()
    assert ns["z"].grad is not None
    assert ns["repa"].dim() == 0 and -1.0 <= float(ns["repa"].detach()) <= 1.0


def vr_objects() -> dict:
    # M = 64 rows (latents[:200] takes them all), d = 64: ~1 s on CPU (M = 200 would take ~1 min)
    return {"latents": torch.randn(64, 4, 4, 4, generator=_g(7))}


def check_vr(ns: dict) -> None:
    t = ns["t"]
    assert t.shape == (256,) and t.dtype == torch.float32 and t.device == ns["latents"].device
    assert bool(((t > 0) & (t < 1)).all())
    assert isinstance(ns["m"], float) and ns["vr"].meta["M"] == 64 and ns["vr"].meta["K"] == 500
    assert Path("vr.json").is_file(), "the snippet's vr.save(...) wrote no file"
    loaded = vefast.VRTimestepSampler.load("vr.json")
    torch.testing.assert_close(loaded.cdf_knots, ns["vr"].cdf_knots)


def dit_objects() -> dict:
    from vefast.models.lightningdit import LightningDiT
    from vefast.ops.rope import rope_2d_freqs

    B, n, H, hd, D = 2, 4, 2, 64, 32
    cos, sin = rope_2d_freqs(hd, n)
    q, k, v = (torch.randn(B, n * n, H, hd, generator=_g(s)) for s in (8, 9, 10))
    return {
        "q": q, "k": k, "v": v, "cos": cos, "sin": sin,
        "qkv": torch.randn(B, n * n, 3, H, hd, generator=_g(11)),
        "q_w": torch.rand(hd, generator=_g(12)) + 0.5, "k_w": torch.rand(hd, generator=_g(13)) + 0.5,
        "x": torch.randn(B, n * n, D, generator=_g(14)),
        "shift": torch.randn(B, D, generator=_g(15)), "scale": torch.randn(B, D, generator=_g(16)),
        "model": LightningDiT(input_size=4, patch_size=1, hidden_size=D, depth=1, num_heads=2, num_classes=10,
                              in_channels=4),
    }


def check_dit(ns: dict) -> None:
    from vefast.nn.dit_modules import FusedDiTBlock, FusedFinalLayer
    assert ns["out"].shape == ns["q"].shape
    assert ns["h"].shape == ns["x"].shape
    assert all(isinstance(b, FusedDiTBlock) for b in ns["model"].blocks)
    assert isinstance(ns["model"].final_layer, FusedFinalLayer)


# marker (a line of the snippet) -> (its stand-ins, the check of what its comments say, environment).
# The VR snippet's separation estimate (K = 500 noises, 128 SNR values) would take minutes interpreted:
# it runs on the eager CPU path, what a CPU user without TRITON_INTERPRET gets (declared fallbacks below).
EAGER = {"TRITON_INTERPRET": "0"}
SNIPPETS = {
    "DiagonalGaussianDistribution(encoder(x))": (ve_objects, check_ve, {}),
    "vefast.load_dinov2(": (alignment_objects, check_alignment, {}),
    "VRTimestepSampler.from_data(": (vr_objects, check_vr, EAGER),
    "vefast.attention(q, k, v)": (dit_objects, check_dit, {}),
}


@pytest.fixture
def offline_dinov2(monkeypatch):
    """``load_dinov2`` builds the requested DINOv2 (ViT-L/14 by default: 1024 features) with random
    weights and 1 block instead of reading a checkpoint; records its calls."""
    real, calls = vefast.dinov2.load_dinov2, []

    def fake(name: str = "vit_large_patch14_dinov2.lvd142m", *, checkpoint=None, pretrained=True, download=False,
             **timm_kwargs):
        calls.append({"name": name, "checkpoint": checkpoint, "download": download})
        return real(name, pretrained=False, **{"img_size": 56, "depth": 1, **timm_kwargs})

    monkeypatch.setattr(vefast.dinov2, "load_dinov2", fake)
    monkeypatch.setattr(vefast, "load_dinov2", fake)        # the lazy re-export (recipes import it from here)
    return calls


@pytest.mark.expect_fallback("separation_function:cpu", "timestep_sample:cpu")  # the EAGER snippet only
@pytest.mark.filterwarnings("ignore:vefast. (separation_function|timestep_sample). CPU tensors:RuntimeWarning")
def test_python_blocks_run_in_order(tmp_path, monkeypatch, offline_dinov2):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {}
    used = set()
    for code, line in readme_blocks("python"):
        hits = [m for m in SNIPPETS if m in code]
        assert len(hits) <= 1, f"README.md:{line}: block matches several stand-in markers {hits}"
        make, check, env = SNIPPETS[hits[0]] if hits else (dict, None, {})
        used.update(hits)
        namespace.update(make())
        with monkeypatch.context() as mp:
            for name, value in env.items():
                mp.setenv(name, value)
            try:
                run_block(code, namespace, line)
            except Exception as exc:
                raise AssertionError(f"README.md:{line}: the ```python block fails: {type(exc).__name__}: "
                                     f"{exc}") from exc
        if check is not None:
            check(namespace)
    assert used == set(SNIPPETS), f"no README block for the stand-ins of {sorted(set(SNIPPETS) - used)}"
    assert offline_dinov2 and all(c["checkpoint"] is not None and not c["download"] for c in offline_dinov2), \
        "the alignment snippet should load DINOv2 from a local checkpoint, offline"


# ---------------------------------------------------------------------------------------------- bash lines
def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", (ROOT / "Makefile").read_text(), re.M))


def check_vefast_line(argv: list[str]) -> None:
    """Parse ``vefast ARGV`` with the CLI's own parser; a named --config must resolve."""
    from vefast.cli import build_parser
    from vefast.recipes.config import resolve_config_path

    parser, _ = build_parser(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"`vefast {shlex.join(argv)}` does not parse (exit {exc.code})") from None
    assert args.command is not None, f"`vefast {shlex.join(argv)}` names no command"
    if getattr(args, "config", None):
        resolve_config_path(args.config)


def check_shell_line(line: str) -> bool:
    """Check one bash line where cheap; returns whether it was checked (False: ignored)."""
    words = shlex.split(line.removeprefix("$ "), comments=True)
    env = []
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        env.append(words.pop(0).split("=", 1)[0])
    setup = (ROOT / "setup.py").read_text()
    for name in env:
        if name.startswith("VEFAST_"):
            assert name in setup, f"{line!r}: setup.py reads no {name}"
    if not words:
        return bool(env)
    cmd, rest = words[0], words[1:]
    if cmd == "vefast":
        check_vefast_line(rest)
    elif cmd == "make":
        targets = [w for w in rest if not w.startswith("-") and "=" not in w]
        missing = sorted(set(targets) - make_targets())
        assert not missing, f"{line!r}: no Makefile target {missing}"
    elif cmd in ("python", "python3") and rest[:1] == ["-m"] and len(rest) > 1:
        assert importlib.util.find_spec(rest[1]) is not None, f"{line!r}: module {rest[1]!r} is not importable"
    elif cmd == "pip":
        for w in rest:
            m = re.fullmatch(r"vefast-(.+)\.tar\.gz", w)
            if m:
                assert m[1] == vefast.__version__, f"{line!r}: the sdist is vefast-{vefast.__version__}.tar.gz"
        return False
    else:
        return bool(env)
    return True


def bash_lines() -> list[tuple[str, int]]:
    out = []
    for code, first in readme_blocks("bash"):
        out += [(s.strip(), first + i) for i, s in enumerate(code.splitlines()) if s.strip()]
    return out


def test_bash_lines():
    checked = [(line, n) for line, n in bash_lines() if check_shell_line(line)]
    vefast_lines = [line for line, _ in checked if line.startswith("vefast ")]
    assert vefast_lines and any(line.startswith("make ") for line, _ in checked), checked


INLINE_VEFAST = re.compile(r"`(vefast [^`]*--[^`]*)`")


def test_inline_vefast_commands_parse():
    """Inline `vefast ... --flag` commands of the prose parse too (a renamed flag fails here)."""
    commands = INLINE_VEFAST.findall(README.read_text())
    assert commands, "README.md has no inline `vefast ... --flag` command"
    for command in commands:
        check_vefast_line(shlex.split(command)[1:])


# ---------------------------------------------------------------------------------------------- self-checks
SAMPLE_MD = """text
```python
a = 1
```
```
$ vefast info
output, ignored
```
```bash
make demo
```
"""


def test_runner_can_fail():
    assert [(lang, line) for lang, _, line in fenced_blocks(SAMPLE_MD)] == [("python", 3), ("", 6), ("bash", 10)]
    ns: dict = {}
    run_block("y = 2 * 3", ns)
    assert ns["y"] == 6
    with pytest.raises(NameError):
        run_block("y = undefined_object + 1", {})
    with pytest.raises(AttributeError):
        run_block("import vefast\nvefast.no_such_function()", {})
    with pytest.raises(SyntaxError) as info:
        run_block("def broken(:\n", {}, line=42)
    assert info.value.lineno == 42 and info.value.filename == str(README)


@pytest.mark.parametrize("line, match", [
    ("vefast train-dit --latents l --out o --no-such-flag", "does not parse"),
    ("vefast train-dit --out o", "does not parse"),                       # --latents is required
    ("vefast no-such-command", "does not parse"),
    ("make no-such-target", "no Makefile target"),
    ("python -m no_such_module_xyz", "not importable"),
    ("VEFAST_NO_SUCH_KNOB=1 python -m build", "setup.py reads no"),
    ("pip install vefast-9.9.9.tar.gz", "the sdist is"),
])
def test_line_checks_can_fail(line, match):
    with pytest.raises(AssertionError, match=match):
        check_shell_line(line)


def test_line_check_bad_config():
    from vefast.recipes.config import ConfigError
    with pytest.raises(ConfigError, match="not a shipped config"):
        check_shell_line("vefast train-dit --config no_such.yaml --latents l --out o")
