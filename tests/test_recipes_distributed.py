"""How the recipes end their process group (vefast/recipes/distributed.py)."""
from __future__ import annotations

import weakref

import pytest
import torch.distributed as dist

from vefast.recipes.distributed import ends_process_group


class _Cycle:
    """An object only a reference cycle keeps alive, as FSDP2 / DDP state is after a recipe returns."""

    def __init__(self) -> None:
        self.me = self


def _group_alive_when_collected(tmp_path, entry_result: int = 0):
    """Run a decorated entry point that forms a 1-rank gloo group and leaves a cycle behind; return whether
    the group was still initialized when the cycle was collected, and the entry point's result."""
    seen: list[bool] = []

    @ends_process_group
    def entry() -> int:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
        weakref.finalize(_Cycle(), lambda: seen.append(dist.is_initialized()))
        return entry_result

    rc = entry()
    return seen, rc


def test_cycles_are_collected_before_the_group_is_destroyed(tmp_path):
    """What the entry point's frame left in cycles is freed while the group lives, then the group ends."""
    seen, rc = _group_alive_when_collected(tmp_path, entry_result=3)
    assert rc == 3
    assert seen == [True]
    assert not dist.is_initialized()


def test_an_exception_leaves_the_group_to_the_caller(tmp_path):
    @ends_process_group
    def entry() -> int:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
        raise RuntimeError("boom")

    try:
        with pytest.raises(RuntimeError, match="boom"):
            entry()
        assert dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_recipe_entry_points_end_their_group():
    """Every entry point that calls init_distributed is decorated (functools.wraps keeps __wrapped__)."""
    from vefast.recipes import dit, extract_features, extract_latents, sample, tokenizer

    for fn in (dit.train, tokenizer.train, extract_features.extract, extract_latents.extract, sample.sample):
        assert getattr(fn, "__wrapped__", None) is not None, fn.__qualname__
