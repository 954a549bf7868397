"""The package itself: lazy public API, build metadata, extension loading, info(), CLI, shared checks."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import vefast
from vefast import _ext
from vefast.ops import _common


def test_import_does_no_kernel_or_cuda_work():
    code = ("import sys, vefast; t = sys.modules.get('torch'); "
            "print(sorted(m for m in ('triton', 'vefast._C', 'vefast.ops.reparam') if m in sys.modules), "
            "sorted(t.ops.loaded_libraries) if t else [])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] []"  # nothing compiled, no extension library loaded


@pytest.mark.parametrize("name", vefast.__all__)
def test_every_public_name_resolves(name):
    assert getattr(vefast, name) is not None


@pytest.mark.parametrize("name", __import__("vefast.nn", fromlist=["__all__"]).__all__)
def test_every_nn_name_resolves(name):
    import vefast.nn

    assert getattr(vefast.nn, name) is not None


def test_unknown_attribute_is_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'not_an_op'"):
        vefast.not_an_op  # noqa: B018


def test_extension_builds_imports_and_carries_metadata():
    info = _ext.build_info()
    assert info is not None, "vefast/_build_info.json missing: the extension was not built"
    assert _ext.available(), _ext.unavailable_reason()
    binary = dict(_ext.load().build_info())
    assert binary["torch_version"] == info["torch_version"] == torch.__version__
    assert binary["cuda_archs"] == ";".join(info["cuda_archs"])


def test_extension_is_an_operator_library():
    """Loaded by torch.ops.load_library, not imported: ops under torch.ops.vefast_cuda with typed schemas."""
    ext = _ext.load()
    assert ext.path.name == "_C.abi3.so" and "vefast._C" not in sys.modules
    assert str(ext.path) in torch.ops.loaded_libraries
    fwd = str(torch.ops.vefast_cuda.attention_fwd.default._schema)
    assert "Tensor? q_weight=None" in fwd and "-> (Tensor out, Tensor lse)" in fwd
    assert "Tensor(a!) dq" in str(torch.ops.vefast_cuda.attention_bwd.default._schema)
    assert ext.attention_fwd is torch.ops.vefast_cuda.attention_fwd.default
    assert not hasattr(ext, "not_an_op")


def _elf_symbols(path, *flags):
    out = subprocess.run(["nm", "-D", *flags, str(path)], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


def test_extension_does_not_depend_on_the_python_version():
    """No PyInit_, no CPython or libtorch_python symbol, no cpython tag: the same .so loads under 3.11 and 3.12."""
    import shutil

    if shutil.which("nm") is None or shutil.which("readelf") is None:
        pytest.skip("binutils (nm, readelf) not installed")
    path = _ext.load().path
    assert "cpython" not in path.name
    assert not [s for s in _elf_symbols(path, "--defined-only") if s.startswith("PyInit")]
    undefined = _elf_symbols(path, "--undefined-only")
    assert not [s for s in undefined if s.startswith(("Py", "_Py"))], "the library calls the CPython API"
    assert not [s for s in undefined if "pybind11" in s]
    needed = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=True).stdout
    assert "libpython" not in needed and "libtorch_python" not in needed


def _other_python():
    import glob
    import shutil

    mine = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for name in ("python3.12", "python3.13", "python3.10"):
        for cand in [shutil.which(name), *sorted(glob.glob(f"/root/.pyenv/versions/{name[6:]}*/bin/{name}"))]:
            if cand and name != mine and subprocess.run([cand, "-c", "pass"], capture_output=True).returncode == 0:
                return cand
    return None


LOAD_WITHOUT_TORCH_PYTHON = """
import ctypes, os, sys
lib, torch_lib, cudart = sys.argv[1:4]
for name in ("libc10.so", "libtorch_cpu.so", "libc10_cuda.so"):
    ctypes.CDLL(os.path.join(torch_lib, name), mode=ctypes.RTLD_GLOBAL)
if cudart:
    ctypes.CDLL(cudart, mode=ctypes.RTLD_GLOBAL)
handle = ctypes.CDLL(lib)  # runs the TORCH_LIBRARY registrations (an error there aborts the process)
print("loaded", sys.version_info[:2], hasattr(handle, "PyInit__C"))
"""


def test_extension_loads_under_another_python(tmp_path):
    """Another CPython (no torch installed there) loads the library next to libtorch's own libraries."""
    import glob
    import os

    other = _other_python()
    if other is None:
        pytest.skip("no other CPython version on this machine")
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    site = os.path.dirname(os.path.dirname(torch.__file__))
    cudart = (sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", "libcudart.so*"))) or [""])[0]
    script = tmp_path / "load.py"
    script.write_text(LOAD_WITHOUT_TORCH_PYTHON)
    run = subprocess.run([other, str(script), str(_ext.load().path), torch_lib, cudart], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-1] == "False", "the library has a Python module init"


@pytest.fixture
def fresh_ext_load():
    """``_ext._load``'s cache cleared before and after the test: the paths it patches are read afresh, and
    what it saw is not what the next test sees."""
    _ext._load.cache_clear()
    yield
    _ext._load.cache_clear()


def test_version_mismatch_is_explained_not_loaded(tmp_path, monkeypatch, fresh_ext_load):
    fake = tmp_path / "_build_info.json"
    fake.write_text(json.dumps({"torch_version": "1.13.0+cu117", "torch_cuda_version": "11.7"}))
    monkeypatch.setattr(_ext, "_INFO_PATH", fake)
    assert not _ext.available()
    reason = _ext.unavailable_reason()
    assert "built for torch 1.13.0+cu117" in reason and torch.__version__ in reason
    with pytest.raises(_ext.ExtensionUnavailable, match="reinstall vefast"):
        _ext.load()


def test_missing_build_is_explained(tmp_path, monkeypatch, fresh_ext_load):
    monkeypatch.setattr(_ext, "_INFO_PATH", tmp_path / "absent.json")
    reason = _ext.unavailable_reason()
    assert "was not built" in reason and "pip install --no-build-isolation -e ." in reason
    assert "optional" in reason


def test_missing_library_is_explained(tmp_path, monkeypatch, fresh_ext_load):
    """Metadata present but no library (e.g. not carried to another machine): says which file is missing."""
    monkeypatch.setattr(_ext, "_HERE", tmp_path)
    (tmp_path / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    reason = _ext.unavailable_reason()
    assert "vefast/_C.abi3.so is missing" in reason and "older build" in reason


def test_info_explains_a_missing_extension(tmp_path, monkeypatch, fresh_ext_load):
    monkeypatch.setattr(_ext, "_INFO_PATH", tmp_path / "absent.json")
    line = vefast._info.format_info(vefast.info(verbose=False))
    assert "extension  : not loaded: the CUDA extension was not built" in line and "build it with nvcc" in line
    assert "pip install --no-build-isolation -e ." in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_probe_without_gpu_raises_clearly():
    with pytest.raises(RuntimeError, match=r"probe_arch\(device=0\) failed"):
        _ext.load().probe_arch(0)


@pytest.mark.gpu
def test_probe_runs_extension_kernel_on_gpu():
    major, minor = torch.cuda.get_device_capability()
    assert _ext.load().probe_arch(torch.cuda.current_device()) // 10 == major * 10 + minor


def test_info_reports_every_part(capsys):
    report = vefast.info()
    printed = capsys.readouterr().out
    assert report["torch"] == torch.__version__
    assert report["triton"]["available"] and report["triton"]["version"] == "3.6.0"
    assert report["extension"]["loaded"] is True
    assert "extension  : _C.abi3.so loaded as torch.ops.vefast_cuda" in printed and "device" in printed
    quiet = vefast.info(verbose=False)
    assert quiet["extension"] == report["extension"] and capsys.readouterr().out == ""


def test_cli_info_json():
    out = subprocess.run([sys.executable, "-m", "vefast", "info", "--json"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["vefast"] == vefast.__version__


def test_cli_without_command_prints_help():
    out = subprocess.run([sys.executable, "-m", "vefast"], capture_output=True, text=True)
    assert out.returncode == 2 and "vr-table" in out.stdout and "train-dit" in out.stdout


def test_dispatch_follows_device_and_interpreter(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _common.use_triton(x)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not _common.use_triton(x)
    assert _common.use_triton(torch.zeros(2, device="meta")) is False


def test_draw_seed_follows_generator_state():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = _common.draw_seed(g1), _common.draw_seed(g2)
    assert a.dtype == torch.int64 and a.shape == () and a.device.type == "cpu"
    assert a.item() == b.item() and _common.draw_seed(g1).item() != a.item()
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        _common.draw_seed(3)


def test_checks_name_the_argument():
    with pytest.raises(TypeError, match="mean must have dtype"):
        _common.check_tensor("mean", torch.zeros(2, dtype=torch.int32))
    with pytest.raises(TypeError, match="noise must be a torch.Tensor"):
        _common.check_tensor("noise", [1.0])
    with pytest.raises(ValueError, match=r"logvar must have the shape of mean \(2,\), got \(3,\)"):
        _common.check_same_shape(mean=torch.zeros(2), logvar=torch.zeros(3))
    with pytest.raises(ValueError, match="noise must be on the device of mean"):
        _common.check_same_device(mean=torch.zeros(2), noise=torch.zeros(2, device="meta"))
    with pytest.raises(ValueError, match="reduction must be one of"):
        _common.check_reduction("max")
    with pytest.raises(ValueError, match="delta must be >= 0"):
        _common.check_finite_number("delta", -1.0, min_value=0.0)
    with pytest.raises(ValueError, match="tau must be finite"):
        _common.check_finite_number("tau", float("nan"))
    with pytest.raises(TypeError, match="lambda_var must be a real number"):
        _common.check_finite_number("lambda_var", "0.1")


LAUNCHERS = {"reparam": ["_fwd_launch", "_bwd_launch"], "vf_loss": ["_vf_fwd_launch", "_vf_bwd_launch"],
             "align_loss": ["_align_fwd_launch", "_align_bwd_launch"], "norm_modulate": ["_nm_fwd", "_nm_bwd"],
             "gated_residual": ["_gr_fwd", "_gr_bwd"], "swiglu": ["_swiglu_fwd", "_swiglu_bwd"],
             "separation": ["_launch_separation"], "timestep_sample": ["_launch_sample"]}


def test_launchers_run_on_the_tensors_gpu(monkeypatch):
    """Triton launches on the current device: every launcher switches to its first tensor's GPU."""
    import importlib
    import types

    entered = []

    class Recorder:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Recorder)
    for mod, names in LAUNCHERS.items():
        module = importlib.import_module(f"vefast.ops.{mod}")
        for name in names:
            launch = getattr(module, name)
            assert getattr(launch, "__wrapped__", None) is not None, f"{mod}.{name} is not wrapped by on_tensor_device"
    fake = types.SimpleNamespace(device=torch.device("cuda", 1))
    assert _common.on_tensor_device(lambda t, x: x + 1)(fake, 1) == 2
    assert entered == [torch.device("cuda", 1)]
    assert _common.on_tensor_device(lambda t: "cpu")(torch.zeros(1)) == "cpu" and len(entered) == 1


def test_grid_axis_limit_is_a_clear_error():
    _common.check_grid_axis("norm_modulate: batch size B", 65535)
    with pytest.raises(ValueError, match=r"batch size B = 65536 exceeds 65535"):
        _common.check_grid_axis("norm_modulate: batch size B", 65536)


def test_int_and_generator_checks_are_one_helper_each():
    """check_int refuses bools and non-ints with TypeError and values below the minimum with ValueError,
    naming the argument; check_generator refuses anything but a torch.Generator or None. The public APIs
    use them (one message everywhere)."""
    from vefast.ops._common import check_generator, check_int

    check_int("n", 0, min_value=0)
    for bad in (True, 1.0, "3", None):
        with pytest.raises(TypeError, match="n must be an int"):
            check_int("n", bad, min_value=0)
    with pytest.raises(ValueError, match="width must be a positive int, got 0"):
        check_int("width", 0, min_value=1)
    with pytest.raises(ValueError, match="num_t must be an int >= 2, got 1"):
        check_int("num_t", 1, min_value=2)
    check_generator(None)
    check_generator(torch.Generator())
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        check_generator(0)
    with pytest.raises(TypeError, match="num_noise must be an int"):
        vefast.separation_function(torch.randn(8, 3), [1.0], num_noise=2.0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        vefast.UniformSampler().sample(3, generator=1)
