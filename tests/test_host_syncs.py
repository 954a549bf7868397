"""No device->host synchronization in the training steps of ``train-dit`` and ``train-tokenizer``.

A host read of a device tensor (``.item()``, ``float()``, ``bool()``, ``.tolist()``, ``.cpu()``) or an op
whose output shape depends on the data (``nonzero``, boolean-mask indexing, ``unique``...) makes the
host wait for the GPU queue to drain: the GPU then idles while the host launches the next kernels.
:class:`HostSyncCounter` sees them on the CPU lane, where every tensor is a CPU tensor, by counting:

- every scalar read (``aten._local_scalar_dense`` / ``aten.item``: ``.item()``, ``float()``,
  ``bool()``) except of tensors that are host-side by design on a GPU run too: those marked with
  ``vefast.ops._common.host_tensor`` (Philox seeds, verdicts of checks on CPU inputs) and the
  optimizers' CPU step counters (torch keeps ``state["step"]`` on the CPU unless capturable/fused);
- ``.tolist()`` / ``.numpy()`` / ``.cpu()`` called from vefast code on other tensors;
- device->host copies (``_to_copy`` / ``copy_`` into the CPU from another device: GPU runs only);
- ops with data-dependent output shapes (and ``equal`` / ``is_nonzero``, which return host booleans).

Ops inside vefast's Python custom ops are seen too (the counter runs their implementation under the
mode). The recipes' own loop runs, with ``step_loader`` wrapped so that only the bodies of steps
2..N-1 are counted (the last step logs, checkpoints and samples, which read values on purpose).
The gpu lane runs training steps under ``torch.cuda.set_sync_debug_mode("error")`` and captures a
DiT train step in a CUDA graph. Gradient accumulation, the learning-rate schedule, activation
checkpointing and precomputed DINOv2 features are counted too; FSDP2 (a multi-process run) is not. The design: docs/training.md, "Host syncs and the non-finite guard".
"""
from __future__ import annotations

import collections
import contextlib
import copy
import math
import os
import sys
import traceback

import pytest
import torch
from torch._library.custom_ops import OPDEFS
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import vefast
import vefast.recipes.data as recipe_data
import vefast.recipes.dit as dit_recipe
import vefast.recipes.tokenizer as tok_recipe
from vefast.cli import main as cli
from vefast.ops import _common
from vefast.recipes.checkpoint import load_checkpoint
from vefast.recipes.config import load_config
from vefast.recipes.dit import DiTConfig, ema_update
from vefast.recipes.metrics import NonFiniteGuard, all_finite, host_values
from vefast.recipes.tokenizer import TokenizerConfig

from helpers import needs_interpreter, train_tiny_tokenizer

# Import the Triton ops now, while the lane's TRITON_INTERPRET=1 is set, so their kernels are interpreted
# kernels even when an eager run below imports them first.
import vefast.nn.patch  # noqa: F401,E402
import vefast.ops.gated_residual  # noqa: F401,E402
import vefast.ops.norm_modulate  # noqa: F401,E402
import vefast.ops.reparam  # noqa: F401,E402
import vefast.ops.swiglu  # noqa: F401,E402
import vefast.ops.timestep_sample  # noqa: F401,E402
import vefast.ops.vf_loss  # noqa: F401,E402

pytestmark = pytest.mark.usefixtures("one_thread")

aten = torch.ops.aten
VEFAST_DIR = os.path.dirname(vefast.__file__) + os.sep
TORCH_DIR = os.path.dirname(torch.__file__) + os.sep

SCALAR_READS = {aten._local_scalar_dense.default, aten.item.default}
HOST_BOOLEANS = {aten.equal.default, aten.is_nonzero.default}
DATA_DEPENDENT = {aten.nonzero.default, aten.masked_select.default, aten._unique.default, aten._unique2.default,
                  aten.unique_dim.default, aten.unique_consecutive.default, aten.unique_dim_consecutive.default,
                  aten.repeat_interleave.Tensor, aten.bincount.default}
MASK_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
HOST_METHODS = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu}


def _is_mask(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)


def _host_side(t) -> bool:
    return isinstance(t, torch.Tensor) and (_common.is_host_tensor(t) or id(t) in _OPTIMIZER_STEPS)


_OPTIMIZER_STEPS: set[int] = set()


def _mark_optimizer_steps(opt, args, kwargs) -> None:
    """torch keeps ``state["step"]`` on the CPU (unless capturable / fused) and reads it with ``.item()``."""
    for group in opt.param_groups:
        if group.get("capturable") or group.get("fused"):
            continue
        for p in group["params"]:
            st = opt.state.get(p, {}).get("step")
            if isinstance(st, torch.Tensor) and st.device.type == "cpu":
                _OPTIMIZER_STEPS.add(id(st))


_COUNTER_FRAMES = {"__torch_function__", "__torch_dispatch__", "add", "_where"}


def _where(code_dirs) -> str:
    """The innermost stack frame in ``code_dirs`` (what made the read), the counter's own excluded."""
    for fr in reversed(traceback.extract_stack()):
        if fr.filename.startswith(code_dirs) and not (fr.filename == __file__ and fr.name in _COUNTER_FRAMES):
            return f"{os.path.relpath(fr.filename, os.path.dirname(VEFAST_DIR.rstrip(os.sep)))}:{fr.lineno}: {fr.line}"
    return "<outside vefast>"


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: HostSyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.counter
        if c.counting:
            if func in SCALAR_READS and not _host_side(args[0]):
                c.add("scalar read", func, args[0])
            elif func in HOST_BOOLEANS:
                c.add("scalar read", func)
            elif func in DATA_DEPENDENT or (func in MASK_INDEXING and any(_is_mask(i) for i in args[1] if i is not None)):
                c.add("data-dependent shape", func)
            elif func is aten._to_copy.default and kwargs.get("device") is not None \
                    and torch.device(kwargs["device"]).type == "cpu" and args[0].device.type != "cpu":
                c.add("device->host copy", func)
            elif func is aten.copy_.default and args[0].device.type == "cpu" and args[1].device.type != "cpu":
                c.add("device->host copy", func)
        opdef = OPDEFS.get(func._schema.name) if func.namespace not in ("aten", "prim") else None
        # A Python custom op (torch.library.custom_op): run its body under the mode, so its reads are
        # seen (``_init_fn`` is torch's private handle on it; test_counter_sees_every_kind_of_sync
        # fails if that changes).
        if opdef is not None:
            with self:
                return opdef._init_fn(*args, **kwargs)
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    def __init__(self, counter: HostSyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        c = self.counter
        if c.counting and func in HOST_METHODS and not _host_side(args[0]):
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(TORCH_DIR):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(c.code_dirs):
                c.add("host copy", func, args[0])
        return func(*args, **(kwargs or {}))


class HostSyncCounter(contextlib.AbstractContextManager):
    """Count host syncs (module docstring) while ``counting`` is True, inside the ``with`` block."""

    def __init__(self, code_dirs: tuple[str, ...] = (VEFAST_DIR,)):
        self.code_dirs = tuple(code_dirs)
        self.counting = True
        self.events: list[tuple[str, str, str]] = []

    def add(self, kind: str, func, tensor: torch.Tensor | None = None) -> None:
        name = getattr(func, "__name__", str(func))
        what = name if tensor is None else f"{name} of a {tuple(tensor.shape)} {str(tensor.dtype)[6:]} tensor"
        self.events.append((kind, what, _where(self.code_dirs)))

    def kinds(self) -> collections.Counter:
        return collections.Counter(kind for kind, _, _ in self.events)

    def report(self) -> str:
        return "\n".join(f"{n} x {k}: {w} at {loc}" for (k, w, loc), n in collections.Counter(self.events).most_common())

    def __enter__(self):
        self._hook = register_optimizer_step_pre_hook(_mark_optimizer_steps)
        self._modes = [_Function(self), _Dispatch(self)]
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)
        self._hook.remove()
        _OPTIMIZER_STEPS.clear()
        return False


@contextlib.contextmanager
def count_steps(monkeypatch, first: int, stop: int):
    """Count the bodies of the recipe's steps ``first..stop-1`` (0-based): ``step_loader`` is wrapped so
    that fetching a batch is never counted and counting is on from a step's batch to the next fetch."""
    counter = HostSyncCounter()
    real = recipe_data.step_loader
    steps = []

    def loader(*args, **kwargs):
        it = iter(real(*args, **kwargs))
        i = kwargs.get("start_step", 0)
        while True:
            counter.counting = False
            try:
                batch = next(it)
            except StopIteration:
                return
            counter.counting = first <= i < stop
            if counter.counting:
                steps.append(i)
            yield batch
            i += 1

    monkeypatch.setattr(recipe_data, "step_loader", loader)
    counter.steps = steps
    with counter:
        counter.counting = False
        yield counter
    counter.counting = False


def assert_no_syncs(counter: HostSyncCounter, n_steps: int) -> None:
    assert counter.steps and len(counter.steps) == n_steps, counter.steps
    assert not counter.kinds()["data-dependent shape"], "ops with data-dependent shapes:\n" + counter.report()
    assert not counter.events, (f"{len(counter.events) / n_steps:g} host syncs per step:\n" + counter.report())


# ---------------------------------------------------------------------------------------------
# the counter itself can fail

@torch.library.custom_op("vefast_test::reads_inside", mutates_args=())
def _reads_inside(x: torch.Tensor) -> torch.Tensor:
    return x * x.sum().item()


@_reads_inside.register_fake
def _(x):
    return torch.empty_like(x)


def test_counter_sees_every_kind_of_sync():
    here = os.path.dirname(__file__) + os.sep
    x = torch.tensor([0.5, -1.0, 2.0])
    with HostSyncCounter(code_dirs=(VEFAST_DIR, here)) as c:
        float(x.sum())
        x.max().item()
        bool((x > 0).any())
        x.tolist()
        x.cpu()
        _reads_inside(x)  # a read inside a custom op's body
        x[x > 0]
        torch.nonzero(x)
        torch.unique(x)
        seed = _common.draw_seed(torch.Generator().manual_seed(0))
        int(seed.item())  # a host seed: not counted
        vefast.path("linear").alpha(torch.rand(4))  # a CPU t: checked with a host read by design
    kinds = c.kinds()
    assert kinds == {"scalar read": 4, "host copy": 2, "data-dependent shape": 3}, c.report()
    assert any("test_host_syncs.py" in loc and "float(x.sum())" in loc for _, _, loc in c.events), c.report()


@pytest.mark.expect_fallback
def test_planted_sync_in_the_dit_step_is_caught(dit_latents, tmp_path, monkeypatch):
    """A ``float(loss)`` every step, as the recipe had before, fails the count."""
    real = dit_recipe.velocity

    def velocity_with_read(out, channels):
        v = real(out, channels)
        float(v.mean())
        return v

    monkeypatch.setattr(dit_recipe, "velocity", velocity_with_read)
    with count_steps(monkeypatch, 1, 2) as c:
        _train_dit(dit_latents, tmp_path / "planted", ["model.fused=false"], steps=3)
    with pytest.raises(AssertionError, match="1 host syncs per step"):
        assert_no_syncs(c, 1)


# ---------------------------------------------------------------------------------------------
# train-dit and train-tokenizer: 0 host syncs per step

@pytest.fixture(scope="module")
def dit_latents(tmp_path_factory, eager):
    base = tmp_path_factory.mktemp("syncs")
    train_tiny_tokenizer(base / "tok", steps=1)
    assert cli(["extract-latents", "--tokenizer", str(base / "tok"), "--synthetic", "16", "--out", str(base / "lat"),
                "--batch-size", "16", "--num-workers", "0", "--device", "cpu"]) == 0
    return base / "lat"


def _train_dit(latents, out, overrides, *, steps, log_every=100, ckpt_every=100, device="cpu"):
    cfg = load_config(DiTConfig, "dit_tiny.yaml",
                      [f"train.steps={steps}", f"train.log_every={log_every}", f"train.ckpt_every={ckpt_every}",
                       f"train.device={device}", "sample.steps=1", "sample.num_images=1", "train.batch_size=4",
                       *overrides])
    return dit_recipe.train(cfg, latents=latents, out=out, progress=False)


VR = ["transport.timesteps=vr", "transport.vr_num_data=8", "transport.vr_num_noise=8", "transport.vr_num_t=32"]
DIT_CASES = {
    "reference-logitnormal-muon": ["model.fused=false", "transport.timesteps=logit_normal", "optim.name=muon",
                                   "transport.path=cosine", "optim.warmup_steps=10"],
    "reference-vr": ["model.fused=false", *VR],
    "fused-vr": ["model.fused=true", *VR],
    # issue 13: micro-batches, the schedule and checkpointed blocks add no read either
    "reference-accum-cosine-checkpointing": ["model.fused=false", "train.grad_accum=2", "optim.schedule=cosine",
                                             "optim.warmup_steps=1", "model.grad_checkpointing=true"],
}


def _cases(cases: dict) -> list:
    """Reference cases run the eager ops (their fallbacks are the point); fused cases interpret the Triton
    kernels, in a process started with TRITON_INTERPRET=1 (the VR table's float64 statistics may run eagerly)."""
    fused = [needs_interpreter, pytest.mark.expect_fallback("separation_function:float64")]
    return [pytest.param(c, marks=fused if c.startswith("fused") else [pytest.mark.expect_fallback]) for c in cases]


@pytest.mark.parametrize("case", _cases(DIT_CASES))
def test_dit_steps_make_no_host_syncs(case, dit_latents, tmp_path, monkeypatch):
    interpret = case.startswith("fused")
    monkeypatch.setenv("TRITON_INTERPRET", "1" if interpret else "0")
    with count_steps(monkeypatch, 1, 3) as c:
        assert _train_dit(dit_latents, tmp_path / case, DIT_CASES[case], steps=4) == 0
    assert_no_syncs(c, 2)


TOK_CASES = {
    "reference-ve-vf-lpips-gan": [],
    "reference-kl-reals-flip": ["loss.latent=kl", "loss.align=reals", "train.flip=true"],
    "fused-ve-vf-fixed-weight-gan": ["loss.lpips_weight=0", "loss.vf_adaptive=false"],
    "reference-accum-cosine-checkpointing": ["train.grad_accum=2", "optim.schedule=cosine", "optim.warmup_steps=1",
                                             "model.grad_checkpointing=true", "train.flip=true"],
}


@pytest.mark.parametrize("case", _cases(TOK_CASES))
def test_tokenizer_steps_make_no_host_syncs(case, tmp_path, monkeypatch):
    interpret = case.startswith("fused")
    monkeypatch.setenv("TRITON_INTERPRET", "1" if interpret else "0")
    cfg = load_config(TokenizerConfig, "tokenizer_tiny.yaml",
                      ["train.steps=3", "train.log_every=100", "train.ckpt_every=100", "train.val_every=100",
                       "loss.gan_start=0", "train.stats_images=4", "train.val_images=4", *TOK_CASES[case]])
    with count_steps(monkeypatch, 1, 2) as c:
        assert tok_recipe.train(cfg, out=tmp_path / case, synthetic=8, progress=False) == 0
    assert_no_syncs(c, 1)


@pytest.mark.expect_fallback
def test_tokenizer_steps_with_stored_features_make_no_host_syncs(tmp_path, monkeypatch):
    """DINOv2 targets read from `vefast extract-features` shards (with flips and micro-batches): 0 reads."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    feats = tmp_path / "feats"
    assert cli(["extract-features", "--config", "tokenizer_tiny.yaml", "--synthetic", "8", "--out", str(feats),
                "--flip", "--num-workers", "0", "--device", "cpu"]) == 0
    cfg = load_config(TokenizerConfig, "tokenizer_tiny.yaml",
                      ["train.steps=3", "train.log_every=100", "train.ckpt_every=100", "train.val_every=100",
                       "loss.gan_start=0", "train.stats_images=4", "train.val_images=4", "train.flip=true",
                       "train.grad_accum=2", f"loss.dinov2_features={feats}"])
    with count_steps(monkeypatch, 1, 2) as c:
        assert tok_recipe.train(cfg, out=tmp_path / "run", synthetic=8, progress=False) == 0
    assert_no_syncs(c, 1)


# ---------------------------------------------------------------------------------------------
# host-side pieces: seeds (path checks: tests/test_paths.py)

def test_draw_seed_is_a_host_draw():
    g = torch.Generator().manual_seed(3)
    seed = _common.draw_seed(g)
    assert seed.device.type == "cpu" and seed.dtype == torch.int64 and seed.dim() == 0
    assert _common.is_host_tensor(seed)
    assert int(seed) == int(torch.randint(0, 2**31 - 1, (), generator=torch.Generator().manual_seed(3)))
    assert int(_common.draw_seed(g)) != int(seed)  # the generator advanced
    with pytest.raises(ValueError, match="expected a CPU tensor"):
        _common.host_tensor(torch.zeros((), device="meta"))


def test_timestep_sample_refuses_device_and_float_seeds():
    from vefast.ops.timestep_sample import timestep_sample

    table = torch.linspace(0, 1, 17)
    with pytest.raises(ValueError, match="seed must be a CPU tensor"):
        timestep_sample(table, 4, seed=torch.tensor(5, device="meta"))
    with pytest.raises(TypeError, match="seed must be a 0-dim integer tensor"):
        timestep_sample(table, 4, seed=torch.tensor(5.0))


# ---------------------------------------------------------------------------------------------
# the non-finite guard

def test_guard_records_the_first_bad_step_without_reads():
    g = NonFiniteGuard("train-x", "cpu", ema=True)
    with HostSyncCounter() as c:
        first_ok = g.update(1, loss=torch.tensor(1.0), grad_norm=None).clone()
        g.update(2, loss=torch.tensor(2.0), grad_norm=torch.tensor(float("inf")))
        g.update(3, loss=torch.tensor(float("nan")), grad_norm=torch.tensor(1.0))
    assert not c.events, c.report()
    assert bool(first_ok) and not bool(g.ok)
    with pytest.raises(FloatingPointError, match=r"train-x: non-finite grad_norm at step 2 \(detected at step 5\)"
                                                 r".*the EMA or a checkpoint"):
        g.check(5)
    with pytest.raises(ValueError, match="expected"):
        g.update(4, loss=torch.tensor(1.0))
    ok = NonFiniteGuard("train-x", "cpu")
    ok.update(1, loss=torch.tensor(1.0))
    ok.check(1)
    ok.check_save(1, model={"w": torch.ones(2)}, opt={"state": {0: {"exp_avg": torch.zeros(2), "step": torch.tensor(3.0)}}})
    with pytest.raises(FloatingPointError, match="opt holds non-finite values at step 1; refusing"):
        ok.check_save(1, model={"w": torch.ones(2)}, opt={"state": {0: {"exp_avg": torch.tensor([0.0, float("nan")])}}})
    assert all_finite([torch.ones(3), torch.tensor([1, 2])]) and not all_finite([torch.tensor([float("inf")])])
    assert host_values({"a": torch.tensor(1.5), "b": 2, "c": None, "d": torch.tensor([3.0])}) == {"a": 1.5, "b": 2.0, "d": 3.0}


def test_guarded_ema_update():
    torch.manual_seed(0)
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    plain = copy.deepcopy(ema)
    ema_update(plain, model, 0.9)
    ema_update(ema, model, 0.9, ok=torch.tensor(True))
    for a, b in zip(plain.parameters(), ema.parameters()):
        assert torch.equal(a, b)  # bitwise the unguarded update
    before = [p.clone() for p in ema.parameters()]
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    ema_update(ema, model, 0.9, ok=torch.tensor(False))
    for a, b in zip(before, ema.parameters()):
        assert torch.equal(a, b)  # a flagged step leaves the EMA untouched
    assert list(dit_recipe._chunks([5, 5, 5, 20, 1], 10)) == [(0, 2), (2, 3), (3, 4), (4, 5)]


@pytest.mark.expect_fallback
def test_nan_loss_never_reaches_ema_or_checkpoint(dit_latents, tmp_path, monkeypatch):
    """A NaN loss at step 3: the run fails at the step-4 log/checkpoint, the last checkpoint is step 2's,
    and the EMA keeps its step-2 value through the bad steps."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    calls = {"velocity": 0}
    real_velocity, real_ema = dit_recipe.velocity, dit_recipe.ema_update
    snapshots = []

    def bad_velocity(out, channels):
        calls["velocity"] += 1
        v = real_velocity(out, channels)
        return v * float("nan") if calls["velocity"] == 3 else v

    def recording_ema_update(ema, model, decay, ok=None):
        real_ema(ema, model, decay, ok=ok)
        snapshots.append([p.detach().clone() for p in ema.parameters()])

    monkeypatch.setattr(dit_recipe, "velocity", bad_velocity)
    monkeypatch.setattr(dit_recipe, "ema_update", recording_ema_update)
    out = tmp_path / "nan"
    with pytest.raises(FloatingPointError, match=r"train-dit: non-finite loss, grad_norm, param_norm at step 3 "
                                                 r"\(detected at step 4\)"):
        _train_dit(dit_latents, out, ["model.fused=false"], steps=6, log_every=4, ckpt_every=2)
    assert len(snapshots) == 4
    assert all(all(torch.isfinite(p).all() for p in snap) for snap in snapshots)
    assert all(torch.equal(a, b) for a, b in zip(snapshots[1], snapshots[3]))  # frozen from step 3 on
    ckpt = load_checkpoint(out)
    assert ckpt.step == 2 and all_finite(ckpt.tensors("model").values()) and all_finite(ckpt.tensors("ema").values())


@pytest.mark.expect_fallback
def test_nan_tokenizer_loss_refuses_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    real_step = tok_recipe.train_step

    def step_with_nan(run, batch, step):
        return real_step(run, (batch[0] * float("nan"), *batch[1:]) if step == 1 else batch, step)

    monkeypatch.setattr(tok_recipe, "train_step", step_with_nan)
    cfg = load_config(TokenizerConfig, "tokenizer_tiny.yaml",
                      ["loss.align=none", "loss.lpips_weight=0", "train.steps=3", "train.log_every=100",
                       "train.ckpt_every=1", "train.val_every=100", "train.stats_images=4", "train.val_images=4"])
    with pytest.raises(FloatingPointError, match=r"train-tokenizer: non-finite loss.* at step 2 \(detected at step 2\)"
                                                 r": nothing from step 2 on reached a checkpoint"):
        tok_recipe.train(cfg, out=tmp_path / "tok", synthetic=8, progress=False)
    assert load_checkpoint(tmp_path / "tok").step == 1


# ---------------------------------------------------------------------------------------------
# gpu lane

@contextlib.contextmanager
def sync_errors_during_steps(monkeypatch, first: int, stop: int):
    """Like :func:`count_steps`, with ``torch.cuda.set_sync_debug_mode("error")`` over those step bodies."""
    real = recipe_data.step_loader
    seen = []

    def loader(*args, **kwargs):
        it = iter(real(*args, **kwargs))
        i = kwargs.get("start_step", 0)
        try:
            while True:
                torch.cuda.set_sync_debug_mode("default")
                try:
                    batch = next(it)
                except StopIteration:
                    return
                if first <= i < stop:
                    seen.append(i)
                    torch.cuda.set_sync_debug_mode("error")
                yield batch
                i += 1
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(recipe_data, "step_loader", loader)
    try:
        yield seen
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.expect_fallback  # the VR table's statistics run on CPU data; the point here is syncs
@pytest.mark.parametrize("case", list(DIT_CASES))
def test_gpu_dit_steps_under_sync_debug_error(case, dit_latents, tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with sync_errors_during_steps(monkeypatch, 2, 5) as seen:
        assert _train_dit(dit_latents, tmp_path / case, DIT_CASES[case] + ["train.precision=bf16"], steps=6,
                          device="cuda") == 0
    assert seen == [2, 3, 4]


@pytest.mark.gpu
@pytest.mark.expect_fallback  # latent stats and validation run on CPU images; the point here is syncs
@pytest.mark.parametrize("case", ["ve-vf-lpips-gan", "kl-reals"])
def test_gpu_tokenizer_steps_under_sync_debug_error(case, tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    extra = ["loss.latent=kl", "loss.align=reals"] if case == "kl-reals" else []
    cfg = load_config(TokenizerConfig, "tokenizer_tiny.yaml",
                      ["train.steps=5", "train.log_every=100", "train.ckpt_every=100", "train.val_every=100",
                       "loss.gan_start=0", "train.stats_images=4", "train.val_images=4", "train.device=cuda",
                       "train.precision=bf16", *extra])
    with sync_errors_during_steps(monkeypatch, 2, 4) as seen:
        assert tok_recipe.train(cfg, out=tmp_path / case, synthetic=8, progress=False) == 0
    assert seen == [2, 3]


@pytest.mark.gpu
def test_gpu_draw_seed_from_a_cuda_generator_is_host_side():
    g = torch.Generator(device="cuda").manual_seed(7)
    state = g.get_state()
    torch.cuda.set_sync_debug_mode("error")
    try:
        a, b = _common.draw_seed(g), _common.draw_seed(g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert a.device.type == "cpu" and int(a) != int(b) and 0 <= int(a) < 2**31 - 1
    assert g.get_offset() == state.view(torch.int64)[1].item() + 8
    g.set_state(state)
    assert int(_common.draw_seed(g)) == int(a)  # same generator state -> same seed


def _tiny_dit_module(fused: bool):
    cfg = load_config(DiTConfig, "dit_tiny.yaml", [f"model.fused={str(fused).lower()}", "transport.label_dropout=0"])
    torch.manual_seed(0)
    model, _ = dit_recipe.build_dit(cfg, (4, 4, 4))
    return dit_recipe.DiTTrainModule(model, cfg, None, None).cuda(), cfg


def _static_batch(seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x1 = torch.randn(8, 4, 4, 4, device="cuda", generator=g)
    eps = torch.randn(8, 4, 4, 4, device="cuda", generator=g)
    t = torch.rand(8, device="cuda", generator=g)
    y = torch.randint(0, 4, (8,), device="cuda", generator=g)
    tb = t.view(8, 1, 1, 1)
    return tb * x1 + (1 - tb) * eps, t, y, x1 - eps


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_gpu_dit_train_step_captures_in_a_cuda_graph(fused):
    """Forward + backward + clipping + AdamW (capturable) + guarded EMA of the DiT train module, captured
    once and replayed on new data, matches the same steps run eagerly."""
    eager_mod, _ = _tiny_dit_module(fused)
    graph_mod = copy.deepcopy(eager_mod)

    def make(mod):
        opt = torch.optim.AdamW(mod.parameters(), lr=1e-3, capturable=True)
        ema = copy.deepcopy(mod.model).requires_grad_(False)
        guard = NonFiniteGuard("test", "cuda", ema=True)
        return opt, ema, guard

    def step(mod, opt, ema, guard, xt, t, y, ut):
        out, _ = mod(xt, t, y)
        loss = (dit_recipe.velocity(out.float(), 4) - ut).pow(2).mean()
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(mod.parameters(), 1.0)
        opt.step()
        ok = guard.update(1, loss=loss, grad_norm=gnorm)
        ema_update(ema, mod.model, 0.9, ok=ok)
        return loss.detach()

    e_opt, e_ema, e_guard = make(eager_mod)
    g_opt, g_ema, g_guard = make(graph_mod)
    static = [x.clone() for x in _static_batch(0)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (autotuning, lazy state) outside the capture
        for i in range(3):
            g_opt.zero_grad(set_to_none=True)
            e_opt.zero_grad(set_to_none=True)
            batch = _static_batch(100 + i)
            step(graph_mod, g_opt, g_ema, g_guard, *batch)
            step(eager_mod, e_opt, e_ema, e_guard, *batch)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    g_opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = step(graph_mod, g_opt, g_ema, g_guard, *static)
    for i in range(4):
        batch = _static_batch(200 + i)
        for s, b in zip(static, batch):
            s.copy_(b)
        graph.replay()
        e_opt.zero_grad(set_to_none=True)
        want = step(eager_mod, e_opt, e_ema, e_guard, *batch)
        torch.testing.assert_close(static_loss, want, rtol=2e-3, atol=1e-5)
    for a, b in zip(graph_mod.parameters(), eager_mod.parameters()):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-5)
    for a, b in zip(g_ema.parameters(), e_ema.parameters()):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-5)
    assert bool(g_guard.ok) and bool(e_guard.ok)


@pytest.mark.gpu
def test_gpu_dit_train_step_compiles_with_cuda_graphs():
    """``torch.compile(mode="reduce-overhead")`` of the train module's forward + loss runs as CUDA
    graphs: no cudagraph skip (a sync, a CPU tensor or a data-dependent shape would cause one)."""
    from torch._dynamo.utils import counters

    mod, _ = _tiny_dit_module(fused=True)
    opt = torch.optim.AdamW(mod.parameters(), lr=1e-3, capturable=True)
    torch._dynamo.reset()
    counters.clear()

    @torch.compile(mode="reduce-overhead")
    def loss_fn(xt, t, y, ut):
        out, _ = mod(xt, t, y)
        return (dit_recipe.velocity(out.float(), 4) - ut).pow(2).mean()

    losses = []
    for i in range(5):
        torch.compiler.cudagraph_mark_step_begin()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(*_static_batch(i))
        loss.backward()
        opt.step()
        losses.append(loss.detach().clone())
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert all(math.isfinite(float(v)) for v in losses)
