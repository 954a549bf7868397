"""Typed YAML configs for the training recipes.

A config is a tree of dataclasses. :func:`load_config` reads a YAML file (a path, or the name of a
file shipped in ``vefast/recipes/configs/``), applies ``--set key=value`` overrides (dotted keys,
values parsed as YAML scalars/lists) and checks everything against the schema at start: unknown
keys, wrong types and values outside their allowed set raise :class:`ConfigError` naming the key,
the expected and the actual value — never mid-run.
"""
from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot run: unknown key, wrong type, bad value, missing input."""


def resolve_config_path(name: str | Path) -> Path:
    """A path to an existing YAML file, or the name of one shipped in ``vefast/recipes/configs``."""
    p = Path(name)
    if p.is_file():
        return p
    shipped = CONFIG_DIR / p.name
    if shipped.is_file():
        return shipped
    if not p.suffix:
        shipped = CONFIG_DIR / (p.name + ".yaml")
        if shipped.is_file():
            return shipped
    available = sorted(q.name for q in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config {str(name)!r}: no such file, and not a shipped config (available: {', '.join(available)})")


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (int -> float, list -> tuple)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"config key {key!r}: expected one of {list(allowed)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping (section {tp.__name__}), got {value!r}")
        return _build(tp, value, prefix=key + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r}: expected a list ({_type_name(tp)}), got {value!r} ({type(value).__name__})")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"config key {key!r}: expected {len(args)} values ({_type_name(tp)}), got {list(value)!r}")
            return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
        elem = args[0] if args else Any
        out = [_coerce(f"{key}[{i}]", v, elem) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {value!r} ({type(value).__name__})")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected bool (true/false), got {value!r} ({type(value).__name__})")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r}: expected int, got {value!r} ({type(value).__name__})")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r}: expected float, got {value!r} ({type(value).__name__})")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r}: expected str, got {value!r} ({type(value).__name__})")
        return value
    raise ConfigError(f"config key {key!r}: unsupported schema type {_type_name(tp)}")


def _build(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(repr(prefix + k) for k in unknown)}; "
                          f"valid keys{' in ' + repr(prefix[:-1]) if prefix else ''}: {', '.join(sorted(fields))}")
    kwargs = {name: _coerce(prefix + name, value, hints[name]) for name, value in data.items()}
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        check()
    return obj


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict (lists instead of tuples) of a config, for YAML/JSON."""
    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(cfg)


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``["a.b=1", "c=[1, 2]"]`` -> nested dict, values parsed as YAML."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set: bad key {key!r} in {pair!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {pair!r}: value is not valid YAML ({e})") from None
        parts = key.split(".")
        node = _parent_mapping(out, parts, lambda part, _: f"--set {pair!r}: {part!r} was already set to a value")
        node[parts[-1]] = value
    return out


def _parent_mapping(data: dict[str, Any], parts: list[str], clash: Callable[[str, Any], str]) -> dict[str, Any]:
    """``data[parts[0]]...[parts[-2]]``, creating missing mappings on the way; :class:`ConfigError`
    ``clash(part, value)`` where a key on the way holds something other than a mapping."""
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(clash(part, node))
    return node


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _pop_path(data: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.get(part)
        if not isinstance(node, dict):
            return False, None
    if parts[-1] not in node:
        return False, None
    return True, node.pop(parts[-1])


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> bool:
    """Set ``data[a][b]... = value``; False (nothing set) when the key is already there."""
    parts = dotted.split(".")
    node = _parent_mapping(data, parts, lambda part, value: f"config key {part!r}: expected a mapping, got {value!r}")
    if parts[-1] in node:
        return False
    node[parts[-1]] = value
    return True


def migrate_renamed(cls: type, data: dict[str, Any], *, warn: bool = True) -> dict[str, Any]:
    """Move keys a schema renamed (``cls.RENAMED``: old dotted key -> new dotted key) to their new place.

    A config (YAML, ``--set``) using an old key keeps working, with a ``FutureWarning`` naming the new
    key (``warn``; configs saved in older checkpoints migrate silently); giving both is an error.
    """
    renamed: dict[str, str] = getattr(cls, "RENAMED", {})
    if not renamed:
        return data
    import copy
    import warnings

    data = copy.deepcopy(data)
    for old, new in renamed.items():
        found, value = _pop_path(data, old)
        if not found:
            continue
        if not _set_path(data, new, value):
            raise ConfigError(f"config key {old!r} was renamed to {new!r}: give only {new!r}")
        if warn:
            warnings.warn(f"config key {old!r} is deprecated: it is now {new!r} (same meaning); "
                          f"the old name will stop working in a later release", FutureWarning, stacklevel=4)
    for section in {old.split(".")[0] for old in renamed}:
        if data.get(section) == {}:
            del data[section]
    return data


def build_config(cls: type[T], data: dict[str, Any] | None = None, overrides: list[str] | None = None, *,
                 warn_renamed: bool = True) -> T:
    """Build and check a config of schema ``cls`` from a dict plus ``--set`` overrides."""
    # each source migrates on its own, so an old-named --set still overrides a new-named YAML key
    merged = _merge(migrate_renamed(cls, data or {}, warn=warn_renamed),
                    migrate_renamed(cls, parse_overrides(overrides), warn=warn_renamed))
    return _build(cls, merged)


def load_config(cls: type[T], name: str | Path | None, overrides: list[str] | None = None) -> T:
    """Load the YAML config ``name`` (path or shipped name; None = schema defaults) into ``cls``."""
    data: dict[str, Any] = {}
    if name is not None:
        path = resolve_config_path(name)
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config {str(path)!r}: not valid YAML ({e})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {str(path)!r}: expected a mapping at top level, got {type(loaded).__name__}")
        data = loaded
    return build_config(cls, data, overrides)


def require(cond: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``cond`` (schema ``check()`` methods use it)."""
    if not cond:
        raise ConfigError(message)


def check_train_batching(train: Any, positive: tuple[str, ...]) -> None:
    """The checks every ``train`` section shares: each field of ``positive`` > 0, ``grad_accum`` divides
    ``batch_size``, ``num_workers`` >= 0."""
    for k in positive:
        require(getattr(train, k) > 0, f"train.{k} must be > 0, got {getattr(train, k)}")
    require(train.batch_size % train.grad_accum == 0,
            f"train.grad_accum={train.grad_accum} must divide train.batch_size={train.batch_size} "
            "(the per-GPU batch of one optimizer step, split into grad_accum micro-batches)")
    require(train.num_workers >= 0, f"train.num_workers must be >= 0, got {train.num_workers}")


def dump_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


__all__ = ["ConfigError", "load_config", "build_config", "parse_overrides", "config_to_dict",
           "dump_config", "resolve_config_path", "require", "CONFIG_DIR", "migrate_renamed", "saved_config",
           "check_train_batching"]


# keys that may change when a run is resumed: they do not alter the training trajectory (grad_accum,
# parallel, checkpointing and compile change float rounding at most: the data and every random draw stay
# the same, and DDP and FSDP2 checkpoints have one format)
RESUME_FREE_KEYS = ("train.steps", "train.log_every", "train.ckpt_every", "train.keep_checkpoints", "train.num_workers",
                    "train.tensorboard", "train.wandb", "train.val_every", "train.val_images", "train.device", "train.grad_accum",
                    "train.parallel", "train.check_latent_stats", "model.grad_checkpointing", "model.compile",
                    "model.init_from", "model.init_weights", "sample")


def resume_mismatch(saved: dict[str, Any], current: dict[str, Any], free: tuple[str, ...] = RESUME_FREE_KEYS) -> list[str]:
    """Dotted keys whose values differ between a run's saved config and the current one, ignoring ``free`` keys."""
    out: list[str] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if any(prefix == f or prefix.startswith(f + ".") for f in free):
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        elif a != b:
            out.append(prefix)

    walk(saved, current, "")
    return out


def saved_config(cls: type[T], saved: dict[str, Any], where: str | Path) -> T:
    """The config a checkpoint was written with, read by this version's schema: renamed keys move to
    their new names and keys added since take their defaults."""
    try:
        return build_config(cls, saved, warn_renamed=False)
    except ConfigError as e:
        raise ConfigError(f"the config saved in {str(where)!r} does not fit this version's schema ({e})") from None


def check_resume_config(saved: dict[str, Any] | None, cfg: Any, run_dir: str | Path,
                        fixed: tuple[str, ...] = ()) -> None:
    """Raise :class:`ConfigError` when resuming ``run_dir`` with a config that changes the trajectory.
    ``fixed``: free keys that this run's trajectory does depend on (``train.steps`` under a cosine
    schedule that decays over the run)."""
    if saved is None:
        return
    old = config_to_dict(saved_config(type(cfg), saved, run_dir))
    free = tuple(k for k in RESUME_FREE_KEYS if k not in fixed)
    diff = resume_mismatch(old, config_to_dict(cfg), free)
    if diff:
        raise ConfigError(f"--resume: config keys {diff} differ from those {str(run_dir)!r} was trained with "
                          f"(see {Path(run_dir) / 'config.yaml'}); only {', '.join(free)} may change")
