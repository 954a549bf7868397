"""Build of vefast and its CUDA extension ``vefast/_C.abi3.so`` (a torch operator library, see vefast/_ext.py).

Environment:
  VEFAST_SKIP_CUDA_BUILD=1   build no extension (pure Python + Triton install).
  VEFAST_CUDA_ARCHS          ';'-separated SM list, default "80;90". "90a" adds the sm_90a (wgmma) attention
                             forward (kernels/*_sm90a.cu, compiled only then) and replaces "90": its cubin
                             runs every kernel on sm_90 GPUs (e.g. "80;90a").
  MAX_JOBS                   parallel nvcc jobs; default: the CPU count, at most 8.

The extension is built whenever nvcc is found (PATH or CUDA_HOME) and torch imports, with or without a
GPU. It is compiled against the torch installed in the build environment, so build it without build
isolation (``pip install --no-build-isolation vefast-*.tar.gz``); an isolated build has no torch and makes
the pure-Python install. An sdist (``python -m build --sdist``) never needs torch or nvcc, and
``VEFAST_SKIP_CUDA_BUILD=1 python -m build --wheel`` makes the pure-Python wheel (py3-none-any).
Its build metadata (torch, CUDA and Python versions, arch list) is written to
``vefast/_build_info.json`` and compiled into the binary, so that ``vefast._ext`` can explain a
mismatch instead of crashing on load.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _is_toolkit(home: str | os.PathLike) -> bool:
    return Path(home, "bin", "nvcc").exists() and any(Path(home).glob("lib*/libcudart.so*"))


def _find_cuda_home() -> str | None:
    """CUDA_HOME/CUDA_PATH if it holds a toolkit, else the toolkit of the nvcc on PATH.

    nvcc on PATH may be a wrapper script, so the root is what nvcc itself reports (TOP=) rather
    than its parent directory.
    """
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and _is_toolkit(home):
        return home
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    dry = subprocess.run([nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True)
    for line in (dry.stdout + dry.stderr).splitlines():
        if line.startswith("#$ TOP="):
            top = os.path.realpath(line.split("=", 1)[1].strip())
            if _is_toolkit(top):
                return top
    parent = Path(os.path.realpath(nvcc)).parent.parent
    return str(parent) if _is_toolkit(parent) else None


def _arch_list() -> list[str]:
    raw = os.environ.get("VEFAST_CUDA_ARCHS", "80;90")
    archs = [a.strip() for a in raw.replace(",", ";").split(";") if a.strip()]
    for a in archs:
        digits = a.rstrip("a")
        if not digits.isdigit() or len(digits) < 2:
            raise ValueError(f"VEFAST_CUDA_ARCHS: expected entries like 80, 90 or 90a, got {a!r} in {raw!r}")
    if "90a" in archs and "90" in archs:
        # Two cubins for one GPU would leave the choice to the driver; the sm_90a one holds every kernel.
        print("vefast: VEFAST_CUDA_ARCHS names 90 and 90a: building 90a only (it covers sm_90 GPUs)", file=sys.stderr)
        archs = [a for a in archs if a != "90"]
    return archs


def _sm90a_sources(archs: list[str]) -> bool:
    """Whether to compile kernels/*_sm90a.cu (wgmma / sm_90a-only code) and define VEFAST_WITH_SM90A."""
    return "90a" in archs


def _torch_arch(arch: str) -> str:
    """SM name to torch's TORCH_CUDA_ARCH_LIST spelling: "80" -> "8.0", "90a" -> "9.0a"."""
    suffix = "a" if arch.endswith("a") else ""
    digits = arch.rstrip("a")
    return f"{digits[:-1]}.{digits[-1]}{suffix}"


def _nvcc_version(cuda_home: str) -> str:
    out = subprocess.run([str(Path(cuda_home, "bin", "nvcc")), "--version"], capture_output=True, text=True).stdout
    for tok in out.replace(",", " ").split():
        if tok.startswith("V") and tok[1:2].isdigit():
            return tok[1:]
    return "unknown"


# Commands that only describe or pack the sources: they need neither torch nor nvcc (csrc/ and kernels/
# reach the sdist through MANIFEST.in), so ``python -m build --sdist`` works in an isolated env.
_NO_BUILD_COMMANDS = ("sdist", "egg_info", "dist_info")


def _torch_importable() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _extensions():
    if sys.argv[1:2] and sys.argv[1] in _NO_BUILD_COMMANDS:
        return [], {}
    if os.environ.get("VEFAST_SKIP_CUDA_BUILD", "0") == "1":
        print("vefast: VEFAST_SKIP_CUDA_BUILD=1, building without the CUDA extension", file=sys.stderr)
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        print("vefast: nvcc not found (PATH, CUDA_HOME): building without the CUDA extension", file=sys.stderr)
        return [], {}
    if not _torch_importable():
        print("vefast: torch is not importable in the build environment (pip's build isolation?): building "
              "without the CUDA extension; to build it against your torch: pip install --no-build-isolation ...",
              file=sys.stderr)
        return [], {}
    # torch.utils.cpp_extension reads CUDA_HOME at import; without a CUDA runtime it guesses wrong.
    os.environ["CUDA_HOME"] = cuda_home
    archs = _arch_list()
    # "80" -> "8.0", "90a" -> "9.0a": torch turns TORCH_CUDA_ARCH_LIST into -gencode flags. The highest
    # portable arch also ships as PTX, so newer GPUs (sm_100, sm_120) JIT it instead of finding no image.
    arch_list = [_torch_arch(a) for a in archs]
    portable = [a for a in arch_list if not a.endswith("a")]
    if portable:
        top = max(portable, key=lambda a: float(a))
        arch_list[arch_list.index(top)] = top + "+PTX"
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(arch_list)
    os.environ.setdefault("MAX_JOBS", str(min(8, os.cpu_count() or 1)))

    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    info = {
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "nvcc_version": _nvcc_version(cuda_home),
        "cuda_archs": archs,
        "python_version": ".".join(map(str, sys.version_info[:3])),
    }
    (ROOT / "vefast" / "_build_info.json").write_text(json.dumps(info, indent=1) + "\n")
    gen = ROOT / "build" / "vefast_generated"
    gen.mkdir(parents=True, exist_ok=True)
    header = "\n".join(
        [
            "#pragma once",
            f'#define VEFAST_BUILD_TORCH_VERSION "{info["torch_version"]}"',
            f'#define VEFAST_BUILD_CUDA_VERSION "{info["nvcc_version"]}"',
            f'#define VEFAST_BUILD_ARCHS "{";".join(archs)}"',
            "",
        ]
    )
    hpath = gen / "vefast_build_info.h"
    if not hpath.exists() or hpath.read_text() != header:
        hpath.write_text(header)

    sm90a = _sm90a_sources(archs)
    kernel_sources = [f for f in sorted(glob.glob("kernels/*.cu")) if sm90a or not f.endswith("_sm90a.cu")]
    sources = sorted(glob.glob("csrc/*.cpp")) + kernel_sources
    defines = ["-DVEFAST_WITH_SM90A"] if sm90a else []
    nvcc_flags = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
                  "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                  "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", *defines]
    # An operator library, not a CPython module: no pybind11 and no PyInit_ (csrc/bindings.cpp registers the
    # ops with TORCH_LIBRARY), so py_limited_api=True drops libtorch_python and the .so is named
    # _C.abi3.so; vefast._ext loads it with torch.ops.load_library under any Python version.
    ext = CUDAExtension(
        name="vefast._C",
        sources=sources,
        include_dirs=[str(ROOT / "kernels"), str(ROOT / "csrc"), str(gen)],
        extra_compile_args={"cxx": ["-O3", "-std=c++17", *defines], "nvcc": nvcc_flags},
        py_limited_api=True,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(
    packages=["vefast", "vefast.ops", "vefast.nn", "vefast.sampling", "vefast.models", "vefast.recipes",
              "vefast.recipes.configs"],
    # _build_info.json describes the extension: shipped only beside it (a stale one from an earlier
    # in-tree build must not reach a pure-Python wheel).
    package_data={"vefast": ["_attention_table.json"] + (["_build_info.json"] if ext_modules else []),
                  "vefast.recipes.configs": ["*.yaml"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
)
