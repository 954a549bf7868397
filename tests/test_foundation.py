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
    code = ("import sys, vefast; "
            "print(sorted(m for m in ('triton', 'vefast._C', 'vefast.ops.reparam') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


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


def test_version_mismatch_is_explained_not_loaded(tmp_path, monkeypatch):
    fake = tmp_path / "_build_info.json"
    fake.write_text(json.dumps({"torch_version": "1.13.0+cu117", "torch_cuda_version": "11.7"}))
    monkeypatch.setattr(_ext, "_INFO_PATH", fake)
    _ext._load.cache_clear()
    try:
        assert not _ext.available()
        reason = _ext.unavailable_reason()
        assert "built for torch 1.13.0+cu117" in reason and torch.__version__ in reason
        with pytest.raises(_ext.ExtensionUnavailable, match="reinstall vefast"):
            _ext.load()
    finally:
        _ext._load.cache_clear()


def test_missing_build_is_explained(tmp_path, monkeypatch):
    monkeypatch.setattr(_ext, "_INFO_PATH", tmp_path / "absent.json")
    _ext._load.cache_clear()
    try:
        assert "was not built" in _ext.unavailable_reason()
    finally:
        _ext._load.cache_clear()


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
    assert "extension  : vefast._C loaded" in printed and "device" in printed
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


LAUNCHERS = {"reparam": ["_fwd_launch", "_bwd_launch"], "vf_loss": ["_vf_pair_launch"],
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
