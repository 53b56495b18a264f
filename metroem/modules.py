"""Pyramids of module folders: naming, discovery, creation, weights and loading.

A pyramid is a folder of module folders named ``<STAGE>_mip<IN_MIP>in_<SUFFIX>`` (for example
``0_mip8in_coarse``, ``12_mip10in_x``). Stages train in increasing order and run coarse to
fine, so IN_MIP never increases with the stage. Each module folder is self-contained and
modelhouse-loadable (see docs/modules.md)::

    create.py                   copied from metroem/templates/create.py
    code/{__init__,fields,nets}.py   frozen copies of metroem's code at creation/training time
    model/model_spec.json       {"format": "metroem-module", "spec": ..., "default_checkpoint": ...}
    model/<name>.state.pth.tar  plain state_dicts

Loading always goes through the folder's own ``create.py`` (as modelhouse and corgie do), so a
module is rebuilt with the code it was trained with. That executes code from the folder: only
load modules you trust.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from metroem.atomic import atomic_write_bytes
from metroem.errors import MetroemError

__all__ = [
    "ModuleInfo",
    "MODULE_NAME_RE",
    "NAME_PATTERN",
    "module_name",
    "parse_module_name",
    "discover",
    "select_stages",
    "create_module",
    "refresh_code",
    "load_module",
    "read_spec",
    "save_weights",
    "set_default_checkpoint",
    "weights_path",
    "checkpoint_names",
]

MODULE_NAME_RE = re.compile(
    r"^(?P<stage>\d+)_mip(?P<mip>\d+)in_(?P<suffix>[A-Za-z0-9][A-Za-z0-9_.-]*)$"
)
NAME_PATTERN = "<STAGE>_mip<IN_MIP>in_<SUFFIX> (e.g. 0_mip8in_coarse)"
CHECKPOINT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
WEIGHTS_SUFFIX = ".state.pth.tar"
SPEC_FORMAT = "metroem-module"
SPEC_FILE = os.path.join("model", "model_spec.json")
FROZEN_CODE = ("fields.py", "nets.py")  # copied from the metroem package into code/

_PACKAGE_DIR = Path(__file__).resolve().parent
TEMPLATE = _PACKAGE_DIR / "templates" / "create.py"


@dataclass(frozen=True)
class ModuleInfo:
    """One module folder of a pyramid."""

    stage: int
    mip: int  # IN_MIP: the MIP the module's images and fields live at
    suffix: str
    path: Path
    name: str

    @property
    def model_dir(self) -> Path:
        return self.path / "model"


def module_name(stage: int, mip: int, suffix: str) -> str:
    """``<STAGE>_mip<IN_MIP>in_<SUFFIX>``, checked so that :func:`discover` parses it back."""
    name = f"{stage}_mip{mip}in_{suffix}"
    if not (isinstance(stage, int) and isinstance(mip, int) and stage >= 0 and mip >= 0):
        raise MetroemError(f"stage and mip must be non-negative integers, got {stage!r}, {mip!r}")
    if not MODULE_NAME_RE.match(name):
        raise MetroemError(
            f"bad module suffix {suffix!r}: use letters, digits, '_', '.', '-' (first a letter "
            f"or digit), giving {NAME_PATTERN}"
        )
    return name


def parse_module_name(name: str) -> tuple[int, int, str] | None:
    """``(stage, mip, suffix)`` for a module folder name, or None if it is not one."""
    m = MODULE_NAME_RE.match(name)
    return (int(m["stage"]), int(m["mip"]), m["suffix"]) if m else None


def _looks_like_module(entry: Path) -> bool:
    """A folder meant as a module but misnamed: 'mip' in its name, or module files inside."""
    return (
        "mip" in entry.name.lower() or (entry / "create.py").exists() or (entry / "model").is_dir()
    )


def _check_order(modules: list[ModuleInfo]) -> None:
    for prev, cur in zip(modules, modules[1:], strict=False):
        if prev.stage == cur.stage:
            raise MetroemError(
                f"duplicate stage {cur.stage}: {prev.name} and {cur.name}; renumber one of them"
            )
        if cur.mip > prev.mip:
            raise MetroemError(
                f"stages must run coarse to fine: {cur.name} (MIP {cur.mip}) follows "
                f"{prev.name} (MIP {prev.mip}); renumber the stages so IN_MIP never increases"
            )


def _scan(pyramid: Path) -> list[ModuleInfo]:
    """Module folders by name only (no content checks), sorted by stage."""
    found = []
    for entry in sorted(pyramid.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        parsed = parse_module_name(entry.name)
        if parsed is None:
            if _looks_like_module(entry):
                raise MetroemError(
                    f"misnamed module folder {entry}: expected {NAME_PATTERN}; rename it or "
                    "move it out of the pyramid"
                )
            continue
        found.append(ModuleInfo(parsed[0], parsed[1], parsed[2], entry, entry.name))
    return sorted(found, key=lambda m: (m.stage, m.name))


def discover(pyramid_path: str | os.PathLike) -> list[ModuleInfo]:
    """The modules of a pyramid, sorted by stage, after checking names, order and contents."""
    pyramid = Path(pyramid_path).expanduser()
    if not pyramid.exists():
        raise MetroemError(f"pyramid folder {pyramid} does not exist; check the pyramid path")
    if not pyramid.is_dir():
        raise MetroemError(f"pyramid path {pyramid} is not a folder; pass the folder of modules")
    modules = _scan(pyramid)
    if not modules:
        raise MetroemError(
            f"no module folders in {pyramid}: expected subfolders named {NAME_PATTERN}"
        )
    _check_order(modules)
    for m in modules:
        for rel in ("create.py", SPEC_FILE):
            if not (m.path / rel).is_file():
                raise MetroemError(
                    f"module {m.path} lacks {rel}; re-create it with metroem.modules.create_module"
                )
    return modules


SETTINGS_FILE = "pyramid.json"
# Pyramid-wide settings (all optional): the size of a MIP0 pixel of the data the pyramid runs
# on, and the default smoothing length (metroem.regularize) for aligning with it.
SETTINGS = {"resolution_nm": "nm per MIP0 pixel (> 0)",
            "smoothing_nm": "default smoothing length in nm (>= 0; 0 = off)"}


def pyramid_settings(pyramid_path: str | os.PathLike) -> dict:
    """The pyramid's ``pyramid.json`` (``{}`` when there is none), checked: known keys only,
    finite numbers, ``resolution_nm > 0``, ``smoothing_nm >= 0``."""
    path = Path(pyramid_path).expanduser() / SETTINGS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MetroemError(f"{path} is not valid JSON ({str(e).splitlines()[0]}); fix or "
                           "delete it") from e
    if not isinstance(data, dict):
        raise MetroemError(f"{path} must hold a JSON object like {{\"resolution_nm\": 4}}")
    for key, value in data.items():
        if key not in SETTINGS:
            raise MetroemError(f"{path}: unknown key {key!r}; known: {', '.join(SETTINGS)}")
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
            value > 0 if key == "resolution_nm" else value >= 0) and value < float("inf")
        if not ok:
            raise MetroemError(f"{path}: {key} = {value!r}; it must be {SETTINGS[key]}")
    return {k: float(v) for k, v in data.items()}


def select_stages(modules: list[ModuleInfo], stages: Iterable[int] | None) -> list[ModuleInfo]:
    """The modules whose stage is in ``stages`` (all when None), in stage order."""
    if stages is None:
        return list(modules)
    wanted = {int(s) for s in stages}
    known = {m.stage for m in modules}
    unknown = sorted(wanted - known)
    if unknown:
        raise MetroemError(
            f"unknown stage(s) {', '.join(map(str, unknown))}; the pyramid has stages "
            f"{', '.join(map(str, sorted(known)))}"
        )
    return [m for m in modules if m.stage in wanted]


# --- module folders ------------------------------------------------------------------------


def _spec_document(spec: Mapping, default_checkpoint: str | None) -> bytes:
    doc = {"format": SPEC_FORMAT, "spec": spec, "default_checkpoint": default_checkpoint}
    try:
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
    except (TypeError, ValueError) as e:
        raise MetroemError(f"the model spec is not JSON-serialisable ({e}); fix the spec") from e


def _write_code(module_path: Path) -> None:
    """Freeze metroem's current fields.py / nets.py (and create.py) into the module folder."""
    code = module_path / "code"
    code.mkdir(parents=True, exist_ok=True)
    sources = {code / name: _PACKAGE_DIR / name for name in FROZEN_CODE}
    sources[module_path / "create.py"] = TEMPLATE
    for src in sources.values():
        if not src.is_file():
            raise MetroemError(f"{src} is missing from the metroem installation; reinstall it")
    atomic_write_bytes(
        str(code / "__init__.py"), b'"""Frozen copy of metroem code for this module."""\n'
    )
    for dst, src in sources.items():
        atomic_write_bytes(str(dst), src.read_bytes())
    shutil.rmtree(code / "__pycache__", ignore_errors=True)


def create_module(
    pyramid_path: str | os.PathLike,
    stage: int,
    mip: int,
    suffix: str,
    spec: Mapping | None = None,
) -> ModuleInfo:
    """Create the module folder ``<stage>_mip<mip>in_<suffix>`` in a pyramid (made if absent).

    ``spec`` defaults to ``nets.default_spec()``; it is checked by building the model once. The
    folder is assembled under a hidden temporary name and renamed into place, so a half-made
    module never carries a module name.
    """
    from metroem import nets

    name = module_name(stage, mip, suffix)
    pyramid = Path(pyramid_path).expanduser()
    pyramid.mkdir(parents=True, exist_ok=True)
    final = pyramid / name
    if final.exists():
        raise MetroemError(f"module {final} already exists; pick another suffix or delete it")
    new = ModuleInfo(stage, mip, suffix, final, name)
    _check_order(sorted([*_scan(pyramid), new], key=lambda m: m.stage))

    spec = json.loads(json.dumps(nets.default_spec() if spec is None else dict(spec)))
    try:
        nets.build_model(spec)
    except Exception as e:
        raise MetroemError(f"cannot build a model from the spec ({type(e).__name__}: {e})") from e
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=pyramid))
    try:
        (tmp / "model").mkdir()
        (tmp / SPEC_FILE).write_bytes(_spec_document(spec, None))
        _write_code(tmp)
        tmp.chmod(0o755)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return new


def refresh_code(module_path: str | os.PathLike) -> None:
    """Re-freeze the module's ``code/`` and ``create.py`` from the installed metroem.

    The trainer calls this when it trains a module, so the folder rebuilds with the code its
    weights were trained with.
    """
    module = _module_dir(module_path)
    _write_code(module)


def _module_dir(module_path: str | os.PathLike) -> Path:
    module = Path(module_path).expanduser()
    if not (module / "create.py").is_file():
        raise MetroemError(
            f"{module} is not a module folder (no create.py); pass a folder named {NAME_PATTERN}"
        )
    return module


def weights_path(module_path: str | os.PathLike, checkpoint_name: str) -> Path:
    """``<module>/model/<checkpoint_name>.state.pth.tar``."""
    if not CHECKPOINT_NAME_RE.match(checkpoint_name) or checkpoint_name.endswith(WEIGHTS_SUFFIX):
        raise MetroemError(
            f"bad checkpoint name {checkpoint_name!r}: use letters, digits, '_', '.', '-' "
            f"(without the {WEIGHTS_SUFFIX} suffix)"
        )
    return Path(module_path).expanduser() / "model" / f"{checkpoint_name}{WEIGHTS_SUFFIX}"


def save_weights(
    module_path: str | os.PathLike,
    checkpoint_name: str,
    state_dict: Mapping[str, torch.Tensor],
    make_default: bool = True,
) -> Path:
    """Write a plain CPU state_dict as checkpoint ``checkpoint_name`` (temp file + os.replace).

    With ``make_default`` the spec's ``default_checkpoint`` becomes this name, so loading
    without a name picks it even after modelhouse's copy has reset every file's mtime.
    """
    module = _module_dir(module_path)
    path = weights_path(module, checkpoint_name)
    state = {k: v.detach().cpu() for k, v in state_dict.items()}
    # Serialised in memory first: torch's own file writer turns a full disk into an opaque
    # RuntimeError; atomic_write_bytes reports it in one line and keeps the old file.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(str(path), buffer.getvalue())
    if make_default:
        _set_default_checkpoint(module, checkpoint_name)
    return path


def set_default_checkpoint(module_path: str | os.PathLike, checkpoint_name: str) -> None:
    """Make ``checkpoint_name`` the module's default (what loading without a name picks)."""
    _set_default_checkpoint(_module_dir(module_path), checkpoint_name)


def _set_default_checkpoint(module: Path, checkpoint_name: str) -> None:
    """Record ``default_checkpoint`` in model_spec.json, leaving the spec itself as written."""
    path = module / SPEC_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MetroemError(f"cannot read {path} ({e}); re-create the module") from e
    spec = doc["spec"] if isinstance(doc, dict) and doc.get("format") == SPEC_FORMAT else doc
    atomic_write_bytes(str(path), _spec_document(spec, checkpoint_name))


def update_spec(module_path: str | os.PathLike, **changes) -> dict:
    """Change keys of a module's network spec in place (atomic); returns the new spec.

    For settings that change no parameters (e.g. ``lk_iterations``, ``residual_sigma``), which
    can be switched on or off for trained weights. The new spec is checked by building the model
    with the module's own frozen code, so a key that code does not know is refused.
    """
    module = _module_dir(module_path)
    spec, default = read_spec(module)
    new = {**spec, **changes}
    try:
        _call_template("load_code", str(module)).build_model(new)
    except Exception as e:
        raise MetroemError(
            f"{module.name}: the spec change {changes} does not build with this module's code "
            f"({e}); refresh its code (modules.refresh_code) or fix the keys"
        ) from e
    atomic_write_bytes(str(module / SPEC_FILE), _spec_document(new, default))
    return new


def read_spec(module_path: str | os.PathLike) -> tuple[dict, str | None]:
    """``(spec, default_checkpoint)`` of a module, read as its create.py reads it."""
    module = _module_dir(module_path)
    return _call_template("read_spec", str(module))


def checkpoint_names(module_path: str | os.PathLike) -> list[str]:
    """The module's checkpoint names, oldest first."""
    return _call_template("checkpoint_names", str(_module_dir(module_path)))


def load_module(
    module_path: str | os.PathLike, checkpoint_name: str | None = None, device: str = "cpu"
) -> torch.nn.Module:
    """Load a module exactly as modelhouse does: import its create.py and call ``create()``.

    This runs the folder's code: only load modules you trust.
    """
    module = _module_dir(module_path).resolve()
    creator = _import_file(module / "create.py")
    return creator.create(checkpoint_name=checkpoint_name, device=device)


def load_state_dict(model: torch.nn.Module, state: Mapping, source: str) -> None:
    """``model.load_state_dict(state)`` or a one-line MetroemError naming the misfit keys."""
    _call_template("load_weights", model, dict(state), source)


# --- helpers -------------------------------------------------------------------------------

_template_module = None


def _call_template(function: str, *args):
    """Run a function of metroem's create.py template: loading logic lives there only."""
    global _template_module
    if _template_module is None:
        _template_module = _import_file(TEMPLATE)
    return getattr(_template_module, function)(*args)


def _import_file(path: Path):
    """Import a Python file under a private name without writing bytecode beside it."""
    name = "_metroem_create_" + re.sub(r"\W", "_", str(path.parent))[-60:]
    spec = importlib.util.spec_from_file_location(name, str(path))
    module = importlib.util.module_from_spec(spec)
    dont_write = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = dont_write
    return module
