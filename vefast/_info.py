"""``vefast.info()``: what is available on this machine and why not."""
from __future__ import annotations

import os
import platform
from typing import Any

from . import _ext
from ._version import __version__


def _triton_status() -> dict[str, Any]:
    from .ops._common import interpret_mode

    try:
        import triton
    except ImportError as exc:  # triton is a dependency; report rather than crash
        return {"available": False, "reason": f"triton failed to import: {exc}"}
    import torch

    if torch.cuda.is_available():
        path = "Triton kernels on CUDA tensors"
    elif interpret_mode():
        path = "Triton kernels interpreted on CPU tensors (TRITON_INTERPRET=1)"
    else:
        path = "eager PyTorch on CPU tensors (no CUDA device; TRITON_INTERPRET=1 runs the kernels on CPU)"
    return {"available": True, "version": triton.__version__, "path": path}


def _extension_status() -> dict[str, Any]:
    import torch

    status: dict[str, Any] = {"build": _ext.build_info(), "loaded": _ext.available()}
    if not status["loaded"]:
        status["reason"] = _ext.unavailable_reason()
        return status
    module = _ext.load()
    status["library"] = module.path.name
    status["namespace"] = _ext.NAMESPACE
    status["binary"] = module.build_info()
    if torch.cuda.is_available():
        try:
            status["runs_on_device_arch"] = module.probe_arch(torch.cuda.current_device())
        except RuntimeError as exc:
            status["runs_on_device_arch"] = None
            status["reason"] = str(exc)
    return status


def _attention_status() -> list[dict[str, Any]]:
    """What backend="auto" of the attention ops picks per head dim here, and why."""
    from .ops.attention import attention_backends

    return attention_backends()


def info(*, verbose: bool = True) -> dict[str, Any]:
    """Return (and print unless ``verbose=False``) versions, device, Triton path and extension state."""
    import torch

    from .ops._common import reported_fallbacks

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        device = {"type": "cuda", "name": props.name, "capability": f"{props.major}.{props.minor}",
                  "memory_gib": round(props.total_memory / 2**30, 1)}
    else:
        device = {"type": "cpu", "reason": "torch.cuda.is_available() is False", "cores": os.cpu_count()}
    report = {
        "vefast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device": device,
        "triton": _triton_status(),
        "extension": _extension_status(),
        "attention": _attention_status(),
        "fallbacks_reported": reported_fallbacks(),
    }
    if verbose:
        print(format_info(report))
    return report


def format_info(report: dict[str, Any]) -> str:
    dev = report["device"]
    lines = [f"vefast {report['vefast']}  (python {report['python']}, torch {report['torch']}, CUDA {report['torch_cuda']})"]
    if dev["type"] == "cuda":
        lines.append(f"device     : {dev['name']} (sm_{dev['capability'].replace('.', '')}, {dev['memory_gib']} GiB)")
    else:
        lines.append(f"device     : CPU, {dev['cores']} cores ({dev['reason']})")
    tri = report["triton"]
    lines.append(f"triton     : {tri.get('version', '-')}: {tri['path'] if tri['available'] else tri['reason']}")
    ext = report["extension"]
    if ext["loaded"]:
        b = ext["binary"]
        line = (f"extension  : {ext['library']} loaded as torch.ops.{ext['namespace']} (built for torch "
                f"{b['torch_version']}, CUDA {b['cuda_version']}, SM {b['cuda_archs']})")
        if "runs_on_device_arch" in ext:
            arch = ext["runs_on_device_arch"]
            line += f"; kernels run as sm_{arch // 10}" if arch else f"; kernels do NOT run here: {ext['reason']}"
        lines.append(line)
    else:
        lines.append(f"extension  : not loaded: {ext['reason']}")
    for row in report.get("attention", []):
        lines.append(f"attention  : hd {row['head_dim']}: {row['backend']} ({row['reason']})")
    for key, msg in report["fallbacks_reported"].items():
        lines.append(f"fallback   : {key}: {msg}")
    return "\n".join(lines)
