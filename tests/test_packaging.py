"""Packaging (issue 12 §2): `pip install vefast` keeps the user's torch; `python -m build` makes an sdist that
builds the CUDA extension and a pure-Python wheel without it.

The builds run on a copy of the sources (the shared tree stays untouched) without build isolation (no
network), with torch hidden from the build backend: that is what an isolated build sees, so the sdist must
not need torch and the wheel made from it must come out pure-Python. A stale extension and its build
metadata are planted in the copy (an in-tree build leaves them) to prove that neither reaches a pure wheel.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "requirements.txt",
           "vefast", "csrc", "kernels", "docs", "tests"]
PLANTED = ["vefast/_C.abi3.so", "vefast/_build_info.json", "build/vefast_generated/vefast_build_info.h"]
HIDE_TORCH = "raise ImportError('torch is hidden from the build backend by tests/test_packaging.py')\n"


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirement(specs: list[str], name: str) -> str:
    found = [s for s in specs if re.match(rf"{name}\s*($|[<>=!~;\[ ])", s)]
    assert len(found) == 1, f"expected one requirement on {name}, got {found}"
    return found[0]


def _floor(spec: str) -> str:
    m = re.search(r">=\s*([0-9][0-9.]*)", spec)
    assert m, f"{spec!r} has no lower bound"
    return m.group(1)


def test_user_requirements_are_ranges_and_dev_pins_exact():
    project = _pyproject()
    deps = project["project"]["dependencies"]
    for name in ("torch", "triton"):
        spec = _requirement(deps, name)
        assert "==" not in spec and "<" not in spec and ">=" in spec, f"{spec!r}: a range keeps the user's {name}"
    vision = _requirement(project["project"]["optional-dependencies"]["vision"], "torchvision")
    assert "==" not in vision, f"{vision!r} would pin torch through torchvision"
    assert project["project"]["license"] == "Apache-2.0"  # the SPDX string (PEP 639), not the deprecated table
    build_requires = project["build-system"]["requires"]
    assert not [r for r in build_requires if re.match(r"(torch|pybind11)\b", r)], build_requires
    assert tuple(map(int, _floor(_requirement(build_requires, "setuptools")).split("."))) >= (77,)

    lines = [ln.split("#")[0].strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    lines = [ln for ln in lines if ln]
    loose = [ln for ln in lines if not re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][A-Za-z0-9.+\-]*", ln)]
    assert not loose, f"requirements.txt pins exactly (the development and CI stack): {loose}"
    assert not [ln for ln in lines if ln.lower().startswith("pybind11")]

    # CI's lowest-torch lane installs the floor that pyproject declares.
    lane = (ROOT / ".ci" / "lowest_torch.sh").read_text()
    default = re.search(r'VEFAST_LOWEST_TORCH:-([0-9.]+)', lane).group(1)
    assert default.startswith(_floor(_requirement(deps, "torch")))
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M) and re.search(r"^make test-lowest$", ci, re.M), ci
    assert re.search(r"^test-lowest:.*\n\t.*\.ci/lowest_torch\.sh", (ROOT / "Makefile").read_text(), re.M)


def _copy_sources(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "_build_info.json", ".hypothesis")
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)
    for rel in PLANTED:
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}\n" if rel.endswith(".json") else "planted by tests/test_packaging.py\n")


def _build(src: Path, out: Path, *args: str, env: dict[str, str]) -> str:
    run = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "-o", str(out), *args], cwd=src,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout + run.stderr


def _package_data(src: Path) -> set[str]:
    data = {f"vefast/recipes/configs/{p.name}" for p in (src / "vefast" / "recipes" / "configs").glob("*.yaml")}
    if (src / "vefast" / "_attention_table.json").is_file():
        data.add("vefast/_attention_table.json")
    return data


@pytest.mark.slow
def test_sdist_and_pure_wheel_build_and_carry_the_right_files(tmp_path):
    pytest.importorskip("build")
    src, dist, hidden = tmp_path / "src", tmp_path / "dist", tmp_path / "hidden"
    src.mkdir()
    _copy_sources(src)
    (hidden / "torch").mkdir(parents=True)
    (hidden / "torch" / "__init__.py").write_text(HIDE_TORCH)
    env = {k: v for k, v in os.environ.items() if k not in ("VEFAST_SKIP_CUDA_BUILD", "PYTHONPATH")}
    env["PYTHONPATH"] = str(hidden)

    # `python -m build` as in an isolated env (no torch): the sdist, then the wheel from the unpacked sdist.
    _build(src, dist, env=env)
    version = re.search(r'__version__\s*=\s*"([^"]+)"', (src / "vefast" / "_version.py").read_text()).group(1)
    sdist, wheel = dist / f"vefast-{version}.tar.gz", dist / f"vefast-{version}-py3-none-any.whl"
    assert sdist.is_file() and wheel.is_file(), sorted(p.name for p in dist.iterdir())

    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for folder, patterns in (("csrc", ("*.cpp", "*.h")), ("kernels", ("*.cu", "*.cuh"))):
        wanted = {f"{folder}/{p.name}" for pat in patterns for p in (src / folder).glob(pat)}
        assert wanted and wanted <= names, f"sdist lacks {sorted(wanted - names)}"
    assert {"setup.py", "pyproject.toml", "MANIFEST.in", "README.md"} <= names
    assert _package_data(src) <= names
    assert not [n for n in names if n.startswith("build/") or n.endswith(".so") or n.endswith("_build_info.json")]

    _check_pure_wheel(wheel, src)

    # The documented pure-wheel command, straight from the source tree with torch importable.
    env_skip = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env_skip["VEFAST_SKIP_CUDA_BUILD"] = "1"
    log = _build(src, tmp_path / "dist_skip", "--wheel", env=env_skip)
    assert "VEFAST_SKIP_CUDA_BUILD=1" in log
    _check_pure_wheel(tmp_path / "dist_skip" / wheel.name, src)

    # Installed on its own (no source tree on sys.path), it reports the extension absent, and why.
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, timeout=120)
    code = ("import json, vefast; e = vefast.info(verbose=False)['extension']; "
            "print(json.dumps([vefast.__file__, e['loaded'], e.get('reason', '')]))")
    run_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run_env["PYTHONPATH"] = str(site)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=run_env, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    path, loaded, reason = json.loads(out.strip().splitlines()[-1])
    assert path.startswith(str(site)) and loaded is False
    assert "was not built" in reason and "VEFAST_SKIP_CUDA_BUILD" in reason


def _check_pure_wheel(wheel: Path, src: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        tag = zf.read(next(n for n in names if n.endswith(".dist-info/WHEEL"))).decode()
    assert "Tag: py3-none-any" in tag and "Root-Is-Purelib: true" in tag
    assert not [n for n in names if n.endswith(".so") or n.endswith("_build_info.json")], sorted(names)
    modules = {str(p.relative_to(src)) for p in (src / "vefast").rglob("*.py")}
    assert modules <= names, f"wheel lacks {sorted(modules - names)}"
    assert _package_data(src) <= names, f"wheel lacks {sorted(_package_data(src) - names)}"
    assert not [n for n in names if n.startswith(("tests/", "csrc/", "kernels/"))]
    assert "License-Expression: Apache-2.0" in meta
    assert re.search(r"^Requires-Dist: torch>=", meta, re.M) and not re.search(r"^Requires-Dist: torch==", meta, re.M)


@pytest.mark.slow
def test_unpacked_sdist_has_every_source_and_header_of_the_extension(tmp_path):
    """setup.py run from an unpacked sdist: its extension's sources exist, the generated build-info header is
    written there, and every header those sources include is found (``nvcc -M``, no compilation)."""
    pytest.importorskip("build")
    src = tmp_path / "src"
    src.mkdir()
    _copy_sources(src)
    for rel in PLANTED:  # an sdist has none of these: the unpacked one must regenerate what it needs
        (src / rel).unlink()
    env = {k: v for k, v in os.environ.items() if k not in ("VEFAST_SKIP_CUDA_BUILD", "PYTHONPATH")}
    _build(src, tmp_path / "dist", "--sdist", env=env)
    with tarfile.open(next((tmp_path / "dist").glob("vefast-*.tar.gz"))) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    unpacked = next((tmp_path / "unpacked").iterdir())

    # setup.py's extension as `setup.py build_ext` would define it, with setuptools.setup() captured.
    probe = ("import json, os, runpy, sys, setuptools\n"
             "seen = {}\n"
             "setuptools.setup = lambda **kw: seen.update(kw)\n"
             "sys.argv = ['setup.py', 'build_ext']\n"
             "runpy.run_path('setup.py', run_name='__main__')\n"
             "exts = [{'sources': e.sources, 'include_dirs': e.include_dirs} for e in seen.get('ext_modules') or []]\n"
             "print(json.dumps([exts, os.environ.get('CUDA_HOME')]))\n")
    run = subprocess.run([sys.executable, "-c", probe], cwd=unpacked, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    exts, cuda_home = json.loads(run.stdout.strip().splitlines()[-1])
    if not exts:
        pytest.skip(f"setup.py builds no extension here: {run.stderr.strip()[-300:]}")
    [ext] = exts
    generated = unpacked / "build" / "vefast_generated" / "vefast_build_info.h"
    assert generated.is_file() and (unpacked / "vefast" / "_build_info.json").is_file()
    missing = [s for s in ext["sources"] if not (unpacked / s).is_file()]
    assert ext["sources"] and not missing, missing

    includes = [f"-I{d}" for d in ext["include_dirs"]]
    local: set[str] = set()
    for source in ext["sources"]:
        dep = subprocess.run([str(Path(cuda_home, "bin", "nvcc")), "-M", "-std=c++17", "-x", "cu", *includes, source],
                             cwd=unpacked, capture_output=True, text=True, timeout=300)
        assert dep.returncode == 0, f"{source} from the unpacked sdist: {dep.stderr[-2000:]}"
        deps = dep.stdout.replace("\\\n", " ").split()
        local |= {str(Path(t).resolve().relative_to(unpacked)) for t in deps if t.startswith(str(unpacked))}
    assert str(generated.relative_to(unpacked)) in local  # the header setup.py writes, found where it wrote it
    assert [h for h in local if h.startswith("kernels/") and h.endswith(".cuh")], sorted(local)


def test_features_of_newer_torch_name_the_version_they_need(monkeypatch):
    """On the lowest supported torch, what it lacks is a clear error naming the torch that has it."""
    import torch

    from vefast.recipes.config import ConfigError
    from vefast.recipes.dit import DiTOptimConfig, build_optimizers
    from vefast.recipes.distributed import fsdp_shard

    monkeypatch.delattr(torch.optim, "Muon", raising=False)  # added in torch 2.9
    with pytest.raises(ConfigError, match=r"optim.name='muon' needs torch.optim.Muon \(torch >= 2\.9\), this is torch"):
        build_optimizers(None, DiTOptimConfig(name="muon"))

    class CpuStreamOfTorch26:  # torch.cpu.Stream before 2.7: no record_event, which FSDP2 calls
        pass

    monkeypatch.setattr(torch.cpu, "Stream", CpuStreamOfTorch26)
    with pytest.raises(ConfigError, match=r"train.parallel=fsdp on CPU \(gloo\) needs torch >= 2\.7"):
        fsdp_shard(torch.nn.Linear(2, 2), [], torch.device("cpu"), "fp32")
