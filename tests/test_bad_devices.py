"""Meta tensors (``torch.device("meta")`` deferred / FSDP init: shapes, no data) at the one-off sampling
APIs that read values on the host: a ValueError naming the argument and the meta device, raised before
any work, instead of torch's bare "Tensor.item() cannot be called on meta tensors". The elementwise
path / sampler functions read nothing on the host for non-CPU tensors, so meta in gives meta out."""
from __future__ import annotations

import pytest
import torch

import vefast
from vefast.sampling.separation import standardize
from vefast.sampling.vr import VRTimestepSampler, pchip

META = torch.device("meta")


def data(device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.randn(50, 8, device=device)


def snr(device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor([1.0, 2.0], dtype=torch.float64, device=device)


def meta_error(op: str, arg: str) -> str:
    return rf"^{op}: {arg} is on the meta device \(no data\)"


@pytest.mark.parametrize("arg", ["x1", "snr", "noise"])
def test_separation_function_meta(arg):
    """Each tensor argument on meta, the others on the CPU (a mixed-device call: the meta one is named,
    not reported as a device mismatch)."""
    kwargs = {"x1": data(), "snr": snr(), "noise": torch.randn(10, 8)}
    kwargs[arg] = kwargs[arg].to(META)
    with pytest.raises(ValueError, match=meta_error("separation_function", arg)):
        vefast.separation_function(kwargs.pop("x1"), kwargs.pop("snr"), **kwargs)


def test_separation_function_meta_drawn_noise():
    with pytest.raises(ValueError, match=meta_error("separation_function", "x1")):
        vefast.separation_function(data(META), snr(), num_noise=10)


def test_separation_function_meta_snr_sequence():
    """snr as a list of 0-dim tensors, one of them on meta."""
    with pytest.raises(ValueError, match=meta_error("separation_function", "snr")):
        vefast.separation_function(data(), [torch.tensor(1.0), torch.tensor(2.0, device=META)])


def test_separation_function_all_meta_names_x1():
    with pytest.raises(ValueError, match=meta_error("separation_function", "x1")):
        vefast.separation_function(data(META), snr(META), noise=torch.randn(10, 8, device=META))


def test_separation_function_cpu_still_works():
    """The check refuses meta only: the same call on the CPU returns S_hat in [0, 1]."""
    s = vefast.separation_function(data(), snr(), noise=torch.randn(10, 8))
    assert s.shape == (2,) and bool(((s >= 0) & (s <= 1)).all())


def test_standardize_meta():
    with pytest.raises(ValueError, match=meta_error("standardize", "x")):
        standardize(data(META))


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_from_data_meta(path):
    with pytest.raises(ValueError, match=meta_error(r"VRTimestepSampler\.from_data", "x1")):
        VRTimestepSampler.from_data(data(META), path, num_noise=10, num_t=20)


@pytest.mark.parametrize("arg", ["snr", "S"])
def test_from_separation_meta(arg):
    """Each of snr / S on meta, the other on the CPU (mixed devices)."""
    kwargs = {"snr": snr(), "S": torch.tensor([0.2, 0.6])}
    kwargs[arg] = kwargs[arg].to(META)
    with pytest.raises(ValueError, match=meta_error(r"VRTimestepSampler\.from_separation", arg)):
        VRTimestepSampler.from_separation(kwargs["snr"], kwargs["S"], num_t=20)


@pytest.mark.parametrize("arg", ["snr", "S"])
def test_constructor_meta(arg):
    kwargs = {"snr": snr(), "S": torch.tensor([0.2, 0.6], dtype=torch.float64)}
    kwargs[arg] = kwargs[arg].to(META)
    with pytest.raises(ValueError, match=meta_error("VRTimestepSampler", arg)):
        VRTimestepSampler(kwargs["snr"], kwargs["S"], vefast.path("linear"), num_t=20, t_max=0.9)


@pytest.mark.parametrize("arg", ["xq", "x", "y"])
def test_pchip_meta(arg):
    kwargs = {"xq": torch.linspace(0, 1, 5, dtype=torch.float64), "x": torch.tensor([0.0, 0.5, 1.0]).double(),
              "y": torch.tensor([0.0, 0.3, 1.0]).double()}
    kwargs[arg] = kwargs[arg].to(META)
    with pytest.raises(ValueError, match=meta_error("pchip", arg)):
        pchip(**kwargs)


@pytest.mark.parametrize("sampler", [
    vefast.UniformSampler(), vefast.LogitNormalSampler(0.5, 1.2),
    VRTimestepSampler.from_separation([0.5, 1.0, 4.0], [0.1, 0.5, 0.9], num_t=50)], ids=repr)
def test_elementwise_meta_in_meta_out(sampler):
    """pdf / cdf / icdf and the path coefficients read no value of a non-CPU t (no host sync), so meta in
    gives meta out of the right shape (shape inference under deferred init)."""
    t = torch.rand(7, device=META)
    for out in (sampler.pdf(t), sampler.cdf(t), sampler.icdf(t), vefast.path("vp").snr(t), vefast.path("cosine").h(t)):
        assert out.device.type == "meta" and out.shape == (7,)


@pytest.mark.expect_fallback("timestep_sample:meta")
def test_sample_on_meta_says_meta_not_cpu():
    """A VR sampler asked for meta timesteps gives meta of the right shape, and the fallback names the meta
    device (not "CPU tensors")."""
    vr = VRTimestepSampler.from_separation([0.5, 1.0, 4.0], [0.1, 0.5, 0.9], num_t=50)
    with vefast.record_fallbacks() as events:
        t = vr.sample(5, device=META)
    assert t.device.type == "meta" and t.shape == (5,)
    assert [(e.op, e.reason) for e in events] == [("timestep_sample", "meta")], events
    assert "meta tensors" in events[0].message
