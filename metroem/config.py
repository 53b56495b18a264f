"""Training configuration: presets, user files, overrides, validation, per-MIP resolution.

A config is a nested dict. The presets ``metroem/presets/{scratch,finetune}.yaml`` are the
schema: a user file (YAML or JSON) and ``--set key=value`` overrides are deep-merged over a
preset and may only use keys the preset has, with the same value types. The ``loss``, ``masks``
and ``augment`` sections take their keys from ``metroem.losses.DEFAULTS``,
``metroem.masks.DEFAULTS`` and ``metroem.augment.DEFAULTS`` (free-form while a module is absent).
Every value rule, those three sections' included, is a row of the tables ENUMS, RANGES,
INTEGERS, ODD and STRUCTURES below: this module is the one place that validates the config
(:func:`check_section` applies the same rules to one section given as a dict).
``per_mip`` maps a MIP to partial overrides of any section; :func:`resolve` applies them for one
stage. Every key is documented in docs/config.md.

Typical use::

    config = load_config("custom", "my_params.yaml", ["train.steps=500"])
    stage_config = resolve(config, mip=6)
    optimizer = build_optimizer(model.parameters(), stage_config)
    scheduler = build_scheduler(optimizer, stage_config)
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import importlib
import inspect
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import yaml

from metroem.atomic import atomic_path
from metroem.errors import MetroemError

log = logging.getLogger(__name__)

__all__ = [
    "PRESETS",
    "MODES",
    "load_config",
    "check_section",
    "differences",
    "load_preset",
    "resolve",
    "save_resolved",
    "parse_overrides",
    "optimizer_names",
    "build_optimizer",
    "build_scheduler",
    "lr_factor",
]

PRESETS = ("scratch", "finetune")
MODES = (*PRESETS, "custom")
PRESET_DIR = Path(__file__).resolve().parent / "presets"
SECTION_MODULES = {"loss": "metroem.losses", "masks": "metroem.masks", "augment": "metroem.augment"}

# Mappings whose keys are not fixed by the schema (an empty mapping in the defaults is free too).
FREE = {"optimizer.params", "per_mip", "model.train_spec"}

# Every value rule of the training config lives in the tables below (the presets and the
# section modules' DEFAULTS give the key sets and value types); keys are globs over the dotted
# key, matched with fnmatch ("*" also spans dots). The loss, masks and augment modules check a
# section given to them as a dict through :func:`check_section`, i.e. these same tables.

ENUMS = {
    "preset": PRESETS,
    "schedule.name": ("none", "cosine", "step", "onecycle"),
    "loss.similarity": ("mse", "ncc", "none"),
    "loss.smoothness": ("rigidity", "laplacian", "tv", "none"),
    "loss.embedding_field": ("auto", "truth", "predicted"),
    "augment.*.on": ("src", "tgt", "both"),
}

# (glob over the dotted key, low, high, low inclusive, high inclusive); all matching rules apply.
RANGES = [
    ("seed", 0, math.inf, True, False),
    ("data.batch_size", 1, math.inf, True, False),
    ("data.crop_size", 1, math.inf, True, False),
    ("data.num_workers", 0, math.inf, True, False),
    ("data.val_fraction", 0, 1, True, False),
    ("data.cache_mb", 0, math.inf, True, False),
    ("optimizer.lr", 0, math.inf, False, False),
    ("schedule.warmup_steps", 0, math.inf, True, False),
    ("schedule.min_lr_ratio", 0, 1, True, True),
    ("schedule.step_size", 1, math.inf, True, False),
    ("schedule.gamma", 0, 1, False, True),
    ("train.steps", 0, math.inf, True, False),
    ("train.grad_clip", 0, math.inf, True, False),
    ("train.*_every", 0, math.inf, True, False),
    ("train.nan_policy.max_skips", 0, math.inf, True, False),
    ("*prob*", 0, 1, True, True),
    ("*.p", 0, 1, True, True),
    ("*weight*", 0, math.inf, True, False),
    ("loss.ncc_window", 3, math.inf, True, False),
    ("loss.fold_margin", 0, 1, True, False),
    ("loss.embedding_margin", 0, 2, False, True),
    ("loss.embedding_radius", 1, 4, True, True),
    ("masks.mask_threshold", 0, math.inf, True, False),
    ("augment.*.*", 0, math.inf, True, False),  # probabilities, counts and magnitudes
    ("augment.intensity.contrast", 0, 1, True, False),
    ("augment.intensity.shading", 0, 1, True, False),
    ("augment.*.elastic_scale", 0, math.inf, False, False),
]

# Why a RANGES row is what it is, added to its error message (the row's glob -> short reason).
NOTES = {
    "loss.embedding_margin": "a distance between unit vectors",
    "loss.embedding_radius": "level pixels",
    "augment.intensity.contrast": "1 or more would invert contrast",
    "augment.intensity.shading": "1 or more would black out a corner of the image",
    "augment.*.elastic_scale": "a correlation length in px",
}

# Numbers that must be whole (the schema's int defaults already refuse floats; this says so
# for any key whose default may change type) and those that must also be odd.
INTEGERS = ("loss.ncc_window", "loss.embedding_radius", "augment.*.count")
ODD = ("loss.ncc_window",)

# Optimizers in torch.optim the training loop cannot drive: LBFGS needs a closure, SparseAdam
# sparse gradients, Muon takes only 2-D parameters (convolution weights are 4-D).
_UNSUPPORTED_OPTIMIZERS = {"Optimizer", "LBFGS", "SparseAdam", "Muon"}


# --- YAML ------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _read_file(path: str | os.PathLike) -> dict:
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MetroemError(
            f"config file {path} does not exist; check --train_params_path"
        ) from None
    except OSError as e:
        raise MetroemError(f"cannot read config file {path}: {e.strerror}") from e
    try:
        doc = json.loads(text) if path.suffix == ".json" else yaml.load(text, Loader=_Loader)
    except (ValueError, yaml.YAMLError) as e:
        detail = " ".join(str(e).split())
        raise MetroemError(f"config file {path} does not parse: {detail}") from e
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise MetroemError(f"config file {path} must hold a mapping of sections, not a list/value")
    return doc


# --- schema and validation ---------------------------------------------------------------------


def _section_module(section: str):
    """The module holding ``DEFAULTS`` for a section, or None while it does not exist yet."""
    name = SECTION_MODULES[section]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            return None
        raise


def _type_name(value) -> str:
    if value is None:
        return "null"
    return {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "dict"}.get(
        type(value), type(value).__name__
    )


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_free(path: str, default) -> bool:
    return path in FREE or (isinstance(default, dict) and not default)


def _coerce(path: str, default, value):
    """``value`` checked against the type of ``default`` (ints are accepted as floats)."""
    if default is None:
        return copy.deepcopy(value)
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
        value = list(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise MetroemError(
            f"{path}: expected {_type_name(default)}, got {_type_name(value)} {_short(value)}"
        )
    return copy.deepcopy(value)


def _validate(schema: Mapping, user: Mapping, prefix: str = "") -> dict:
    """The keys of ``user`` checked against ``schema`` (recursively); returns a coerced copy."""
    out = {}
    for key, value in user.items():
        path = f"{prefix}{key}"
        if not isinstance(key, str) or key not in schema:
            hint = difflib.get_close_matches(str(key), [str(k) for k in schema], n=1)
            did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
            where = f"'{prefix[:-1]}'" if prefix else "the top level"
            raise MetroemError(
                f"unknown key '{path}'{did_you_mean}; valid keys in {where}: "
                f"{', '.join(map(str, schema))}"
            )
        default = schema[key]
        if path == "per_mip":
            out[key] = _validate_per_mip(schema, value)
        elif _is_free(path, default):
            out[key] = copy.deepcopy(_expect_dict(path, value))
        elif isinstance(default, dict):
            out[key] = _validate(default, _expect_dict(path, value), path + ".")
        else:
            out[key] = _coerce(path, default, value)
    return out


def _expect_dict(path: str, value):
    if not isinstance(value, dict):
        raise MetroemError(f"{path}: expected dict, got {_type_name(value)} {_short(value)}")
    return value


def _validate_per_mip(schema: Mapping, per_mip) -> dict[int, dict]:
    if not isinstance(per_mip, dict):
        raise MetroemError(f"per_mip: expected dict, got {_type_name(per_mip)} {_short(per_mip)}")
    sections = {k: v for k, v in schema.items() if k not in ("per_mip", "preset")}
    out = {}
    for key, over in per_mip.items():
        if isinstance(key, bool) or not re.fullmatch(r"\d+", str(key)):
            raise MetroemError(f"per_mip: key {key!r} is not a MIP; use non-negative integers")
        if not isinstance(over, dict):
            raise MetroemError(f"per_mip.{key}: expected dict, got {_type_name(over)}")
        out[int(key)] = _validate(sections, over, f"per_mip.{key}.")
    return out


def _merge(base: Mapping, over: Mapping) -> dict:
    """Deep merge: mappings merge key by key, anything else in ``over`` replaces ``base``."""
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _walk(node: Mapping, prefix: str = ""):
    """``(dotted key, value)`` of every leaf (lists and free mappings are leaves)."""
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and path not in FREE:
            yield from _walk(value, path + ".")
        else:
            yield path, value


def _glob_get(table: Mapping, path: str):
    """The value of ``table``'s first key (a glob) matching ``path``, else None."""
    if path in table:
        return table[path]
    return next((v for k, v in table.items() if fnmatch.fnmatchcase(path, k)), None)


def _matches(patterns: Iterable[str], path: str) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value) -> bool:
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    )


# --- structural checks of list-valued and optional keys (one line per failure) ---


def _null_or_number(path: str, value) -> None:
    if value is not None and not _is_finite_number(value):
        raise MetroemError(f"{path}: must be a finite number or null, got {_short(value)}")


def _rings(path: str, value) -> None:
    if not isinstance(value, (list, tuple)):
        raise MetroemError(
            f"{path}: must be a list of [radius_px, weight] pairs, got {_short(value)}"
        )
    for ring in value:
        ok = isinstance(ring, (list, tuple)) and len(ring) == 2
        ok = ok and _is_int(ring[0]) and ring[0] >= 1
        ok = ok and _is_finite_number(ring[1]) and ring[1] >= 0
        if not ok:
            raise MetroemError(
                f"{path}: each ring must be [radius_px >= 1 (int), weight >= 0], "
                f"got {_short(ring)}"
            )


def _encoder_levels(path: str, value) -> None:
    if not isinstance(value, (list, tuple)) or not all(_is_int(i) and i >= 1 for i in value):
        raise MetroemError(
            f"{path}: must be a list of encoder levels >= 1 (level 0 is the image and has no "
            f"weights) or [] for all, got {_short(value)}"
        )


# glob -> check(path, value); for keys whose value is a list or may be null.
STRUCTURES = {
    "masks.valid_min": _null_or_number,
    "masks.valid_max": _null_or_number,
    "masks.*_rings": _rings,
    "loss.embedding_levels": _encoder_levels,
}


def _check_leaf(path: str, value) -> None:
    """Every rule of the tables above that applies to the value at dotted key ``path``."""
    choices = _glob_get(ENUMS, path)
    if choices is not None and value not in choices:
        hint = difflib.get_close_matches(str(value), choices, n=1)
        did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise MetroemError(
            f"{path}: {_short(value)} is not one of {', '.join(choices)}{did_you_mean}"
        )
    structure = _glob_get(STRUCTURES, path)
    if structure is not None:
        structure(path, value)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if not math.isfinite(value):
        raise MetroemError(f"{path}: must be a finite number, got {value}")
    if _matches(INTEGERS, path) and not _is_int(value):
        raise MetroemError(f"{path}: must be an integer, got {value}")
    if _matches(ODD, path) and value % 2 == 0:
        raise MetroemError(f"{path}: must be an odd integer, got {value}")
    for pattern, lo, hi, lo_in, hi_in in RANGES:
        if not fnmatch.fnmatchcase(path, pattern):
            continue
        if (value < lo or (value == lo and not lo_in)) or (
            value > hi or (value == hi and not hi_in)
        ):
            limits = _interval(lo, hi, lo_in, hi_in)
            note = f" ({NOTES[pattern]})" if pattern in NOTES else ""
            raise MetroemError(f"{path}: must be {limits}{note}, got {value}")


def _check_leaves(node: Mapping, prefix: str = "") -> None:
    for path, value in _walk(node, prefix):
        _check_leaf(path, value)


def _check_values(config: Mapping) -> None:
    """Enumerations, ranges, structures and the optimizer of one (per-MIP resolved) config."""
    _check_leaves({k: v for k, v in config.items() if k != "per_mip"})
    _check_optimizer(config["optimizer"])


def check_section(section: str, values: Mapping | None) -> dict:
    """``values`` (a partial ``loss`` / ``masks`` / ``augment`` section, or None) merged over
    the section module's ``DEFAULTS`` and checked by the same rules as :func:`load_config`:
    known keys, the defaults' value types, then the tables above. Returns the merged, coerced
    section; raises a one-line MetroemError naming the dotted key otherwise."""
    values = {} if values is None else values
    if not isinstance(values, Mapping):
        raise MetroemError(
            f"{section}: expected dict, got {_type_name(values)} {_short(values)}"
        )
    module = _section_module(section)
    defaults = getattr(module, "DEFAULTS", None) or {}
    merged = _merge(defaults, _validate(defaults, dict(values), f"{section}."))
    _check_leaves(merged, f"{section}.")
    return merged


def _interval(lo, hi, lo_in, hi_in) -> str:
    if hi == math.inf:
        return f"{'>=' if lo_in else '>'} {lo}"
    return f"in {'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"


def _schema(preset: str) -> dict:
    """A preset with its loss/masks/augment sections completed from the modules' DEFAULTS."""
    if preset not in PRESETS:
        raise MetroemError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    raw = _read_file(PRESET_DIR / f"{preset}.yaml")
    for section in SECTION_MODULES:
        module = _section_module(section)
        defaults = getattr(module, "DEFAULTS", None) if module else None
        if isinstance(defaults, dict) and defaults:
            given = raw.get(section) or {}
            raw[section] = _merge(defaults, _validate(defaults, given, f"{section}."))
    return raw


def load_preset(name: str) -> dict:
    """A preset as a complete, validated config."""
    schema = _schema(name)
    config = _merge(schema, _validate(schema, schema))
    _check_all(config)
    return config


def _check_all(config: dict) -> None:
    _check_values(config)
    for mip in config.get("per_mip", {}):
        try:
            _check_values(resolve(config, mip, check=False))
        except MetroemError as e:
            raise MetroemError(f"per_mip.{mip} (effective config of MIP {mip}): {e}") from None


# --- public API --------------------------------------------------------------------------------


def parse_overrides(overrides: Mapping | Iterable[str] | None) -> dict:
    """Nested dict from ``{"train.steps": 10}`` or ``["train.steps=10", ...]`` (YAML values)."""
    if overrides is None:
        return {}
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        items = []
        for text in overrides:
            key, sep, raw = str(text).partition("=")
            if not sep or not key.strip():
                raise MetroemError(f"override {text!r} is not KEY=VALUE (e.g. train.steps=500)")
            try:
                value = yaml.load(raw, Loader=_Loader) if raw.strip() else ""
            except yaml.YAMLError as e:
                raise MetroemError(f"override {text!r}: the value does not parse as YAML") from e
            items.append((key.strip(), value))
    out: dict = {}
    for key, value in items:
        parts = str(key).split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise MetroemError(f"override {key!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def load_config(
    mode: str,
    train_params_path: str | os.PathLike | None = None,
    overrides: Mapping | Iterable[str] | None = None,
) -> dict:
    """The validated training config for ``mode`` (scratch, finetune or custom).

    ``custom`` needs ``train_params_path``; its optional ``preset`` key picks the base preset
    (scratch by default). With scratch/finetune a params file is still merged over that preset.
    ``overrides`` are applied last. ``per_mip`` keys come back as ints.
    """
    if mode not in MODES:
        raise MetroemError(f"unknown training mode {mode!r}; use one of {', '.join(MODES)}")
    user = _read_file(train_params_path) if train_params_path is not None else {}
    if mode == "custom" and train_params_path is None:
        raise MetroemError("mode 'custom' needs --train_params_path FILE (YAML or JSON)")
    over = parse_overrides(overrides)
    preset = over.get("preset", user.get("preset", "scratch" if mode == "custom" else mode))
    if mode != "custom" and preset != mode:
        raise MetroemError(
            f"the params file asks for preset {preset!r} but the mode is {mode!r}; "
            "use mode 'custom' or drop the 'preset' key"
        )
    schema = _schema(preset) if preset in PRESETS else None
    if schema is None:
        raise MetroemError(f"preset: {_short(preset)} is not one of {', '.join(PRESETS)}")
    where = f" (in {train_params_path})" if train_params_path is not None else ""
    try:
        config = _merge(schema, _validate(schema, user))
    except MetroemError as e:
        raise MetroemError(f"{e}{where}") from None
    over = _validate(schema, over)
    config = _merge(_command_line_wins(config, over), over)
    try:
        _check_all(config)
    except MetroemError as e:
        raise MetroemError(f"{e}{where}") from None
    return config


def _drop(node: dict, parts: list[str]) -> tuple[bool, object]:
    """Remove the leaf at ``parts`` from nested dict ``node``: ``(found, old value)``."""
    for part in parts[:-1]:
        node = node.get(part)
        if not isinstance(node, dict):
            return False, None
    if parts[-1] not in node:
        return False, None
    return True, node.pop(parts[-1])


def _command_line_wins(config: dict, over: Mapping) -> dict:
    """``config`` without the ``per_mip`` entries that ``--set`` overrides set for every MIP.

    ``--set train.steps=150`` means 150 steps at every MIP, so a params file's
    ``per_mip.<mip>.train.steps`` gives way to it; each entry dropped is logged. Overrides
    of ``per_mip`` itself (``--set per_mip.8.train.steps=10``) are merged as usual.
    """
    per_mip = config.get("per_mip") or {}
    if not per_mip:
        return config
    config = copy.deepcopy(config)
    paths = [p for p, _ in _walk({k: v for k, v in over.items() if k not in ("per_mip",
                                                                           "preset")})]
    for path in paths:
        for mip, entry in config["per_mip"].items():
            found, old = _drop(entry, path.split("."))
            if found:
                log.info("--set %s=%s replaces per_mip.%s.%s=%s of the config (the command "
                         "line wins)", path, _short(_lookup(over, path)), mip, path, _short(old))
    return config


def _lookup(node: Mapping, path: str):
    for part in path.split("."):
        node = node[part]
    return node


def differences(old: Mapping, new: Mapping) -> list[str]:
    """``"key: old -> new"`` for every leaf that differs between two configs (sorted)."""
    a, b = dict(_walk(old)), dict(_walk(new))
    missing = object()
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, missing), b.get(key, missing)
        if va != vb:
            shown = ["(none)" if v is missing else _short(v) for v in (va, vb)]
            out.append(f"{key}: {shown[0]} -> {shown[1]}")
    return out


def resolve(config: Mapping, mip: int, check: bool = True) -> dict:
    """The effective config of a stage at ``mip``: ``per_mip[mip]`` merged in, per_mip dropped."""
    per_mip = config.get("per_mip") or {}
    over = per_mip.get(int(mip), per_mip.get(str(mip), {}))
    out = _merge({k: v for k, v in config.items() if k != "per_mip"}, over)
    if check:
        _check_values(out)
    return out


def save_resolved(config: Mapping, path: str | os.PathLike) -> Path:
    """Write ``config`` beside a run (``.json``, else YAML) through a temp file + os.replace."""
    path = Path(path).expanduser()
    if path.suffix not in (".json", ".yaml", ".yml"):
        raise MetroemError(f"cannot save a config as {path.name}: use a .yaml, .yml or .json name")
    data = copy.deepcopy(dict(config))
    if path.suffix == ".json":
        text = json.dumps(data, indent=2) + "\n"
    else:
        text = yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    with atomic_path(str(path)) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return path


# --- optimizer and schedule --------------------------------------------------------------------


def optimizer_names() -> list[str]:
    """torch.optim optimizers usable by the training loop."""
    return sorted(
        name
        for name, obj in vars(torch.optim).items()
        if isinstance(obj, type)
        and issubclass(obj, torch.optim.Optimizer)
        and name not in _UNSUPPORTED_OPTIMIZERS
    )


def _optimizer_class(name: str) -> type:
    names = optimizer_names()
    match = [n for n in names if n.lower() == str(name).lower()]
    if not match:
        raise MetroemError(f"optimizer.name: unknown optimizer {name!r}; valid: {', '.join(names)}")
    return getattr(torch.optim, match[0])


def _check_optimizer(section: Mapping) -> None:
    cls = _optimizer_class(section["name"])
    params = section["params"]
    accepted = [
        p for p in list(inspect.signature(cls.__init__).parameters)[1:] if p not in ("params", "lr")
    ]
    for key in params:
        if key == "lr":
            raise MetroemError("optimizer.params.lr: set the learning rate as optimizer.lr")
        if key not in accepted:
            raise MetroemError(
                f"optimizer.params.{key}: {cls.__name__} has no such argument; valid: "
                f"{', '.join(accepted)}"
            )
    _make_optimizer(cls, [torch.nn.Parameter(torch.zeros(1))], section)


def _make_optimizer(cls: type, parameters, section: Mapping) -> torch.optim.Optimizer:
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in section["params"].items()}
    try:
        return cls(parameters, lr=section["lr"], **params)
    except Exception as e:
        raise MetroemError(f"optimizer.params: {cls.__name__} rejects them: {e}") from e


def build_optimizer(parameters, config: Mapping) -> torch.optim.Optimizer:
    """The optimizer of ``config["optimizer"]`` over ``parameters`` (e.g. model.parameters())."""
    section = config["optimizer"]
    return _make_optimizer(_optimizer_class(section["name"]), parameters, section)


def lr_factor(step: int, schedule: Mapping, total_steps: int) -> float:
    """Learning-rate multiplier at ``step`` for schedules none / cosine / step.

    Linear warmup over ``warmup_steps`` (reaching 1 at the last warmup step), then constant
    (none), cosine decay to ``min_lr_ratio`` at ``total_steps`` (cosine), or a factor
    ``gamma`` every ``step_size`` steps (step).
    """
    warm = schedule["warmup_steps"]
    if step < warm:
        return (step + 1) / warm
    name = schedule["name"]
    if name == "cosine":
        t = min(1.0, (step - warm) / max(1, total_steps - warm))
        r = schedule["min_lr_ratio"]
        return r + (1 - r) * 0.5 * (1 + math.cos(math.pi * t))
    if name == "step":
        return schedule["gamma"] ** ((step - warm) // schedule["step_size"])
    return 1.0


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: Mapping
) -> torch.optim.lr_scheduler.LRScheduler:
    """The LR schedule of ``config["schedule"]`` over ``config["train"]["steps"]`` steps.

    Call ``scheduler.step()`` once after each optimizer step. ``onecycle`` is torch's
    ``OneCycleLR`` (peak ``optimizer.lr`` after ``warmup_steps``); the others are a
    ``LambdaLR`` of :func:`lr_factor`. Both save a plain, ``weights_only``-loadable state.
    """
    schedule = dict(config["schedule"])
    total = int(config["train"]["steps"])
    if schedule["name"] == "onecycle" and total >= 2:
        defaults = optimizer.defaults
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[group["lr"] for group in optimizer.param_groups],
            total_steps=total,
            pct_start=min(max(schedule["warmup_steps"], 1), total - 1) / total,
            cycle_momentum="betas" in defaults or defaults.get("momentum", 0) > 0,
        )
    if schedule["name"] == "onecycle":
        schedule["name"] = "none"
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, schedule, total)
    )
