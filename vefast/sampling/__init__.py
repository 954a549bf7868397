"""Timestep sampling for flow-matching training (docs/math.md §4-6; [VR]): paths, the separation
function, the VR-sampling density and sampler, logit-normal and uniform samplers."""
from .paths import PATHS, Path, path
from .samplers import LogitNormalSampler, TimestepSampler, UniformSampler
from .separation import separation_function
from .vr import VRTimestepSampler

__all__ = ["PATHS", "Path", "path", "separation_function", "VRTimestepSampler", "LogitNormalSampler",
           "UniformSampler", "TimestepSampler"]
