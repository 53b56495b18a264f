"""Pyramids of module folders: naming, discovery, creation, weights and loading.

A pyramid is a folder of module folders named ``<STAGE>_mip<IN_MIP>in_<SUFFIX>`` (for example
``0_mip8in_coarse``, ``12_mip10in_x``). Stages train in increasing order and run coarse to
fine, so IN_MIP never increases with the stage. A module folder is data, loadable by
modelhouse and corgie (see docs/modules.md)::

    create.py                   a few lines that call metroem.corgie.create (modelhouse's hook)
    model/model_spec.json       {"format": "metroem-module", "metroem_version": ...,
                                 "spec": {"arch": ..., ...}, "default_checkpoint": ...}
    model/<name>.state.pth.tar  plain state_dicts

The network is built by the architecture the spec names (``spec["arch"]``, versioned in
:mod:`metroem.nets`), never by code stored in the folder, so loading a module runs no code from
it. Folders written by metroem before 0.2 also carry a ``code/`` copy; it is ignored.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from metroem import __version__, regularize
from metroem.atomic import atomic_write_bytes
from metroem.errors import MetroemError

log = logging.getLogger(__name__)

__all__ = [
    "ModuleInfo",
    "MODULE_NAME_RE",
    "NAME_PATTERN",
    "module_name",
    "parse_module_name",
    "discover",
    "select_stages",
    "create_module",
    "write_entry_point",
    "load_module",
    "build_stage",
    "choose_checkpoint",
    "default_checkpoint",
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
ENTRY_POINT = Path(__file__).resolve().parent / "templates" / "create.py"  # the create.py shim


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
        from metroem import pretrained  # (pretrained imports this module)

        if str(pyramid_path) in pretrained.REGISTRY:
            raise MetroemError(
                f"pyramid folder {pyramid} does not exist; {str(pyramid_path)!r} is a shipped "
                f"pyramid, read-only here: copy it to train it (metroem pretrained copy "
                f"{pyramid_path} DEST, then --pyramid_path DEST)")
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
        if not (m.path / SPEC_FILE).is_file():
            raise MetroemError(
                f"module {m.path} lacks {SPEC_FILE}; re-create it (metroem.modules.create_module)"
            )
    return modules


SETTINGS_FILE = "pyramid.json"
# Pyramid-wide settings (all optional): the size of a MIP0 pixel of the data the pyramid runs
# on, and the default smoothing length (metroem.regularize) for aligning with it.
SETTINGS = {"resolution_nm": "nm per MIP0 pixel (> 0)",
            "smoothing_nm": "default smoothing length in nm (>= 0; 0 = off)",
            "smoothing_gate": "the smoothing's match gate: [low, high] correlations, or \"off\"",
            "translation_init": "true or false: start a pair from its phase-correlation "
                                "translation"}


def pyramid_settings(pyramid_path: str | os.PathLike) -> dict:
    """The pyramid's ``pyramid.json`` (``{}`` when there is none), checked: known keys only,
    finite numbers, ``resolution_nm > 0``, ``smoothing_nm >= 0``, ``smoothing_gate`` two
    correlations (a tuple) or ``"off"``, ``translation_init`` a boolean."""
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
    out: dict = {}
    for key, value in data.items():
        if key not in SETTINGS:
            raise MetroemError(f"{path}: unknown key {key!r}; known: {', '.join(SETTINGS)}")
        if key == "smoothing_gate":
            try:
                gate = regularize.check_gate(value if isinstance(value, (list, str)) else [])
            except MetroemError:
                raise MetroemError(f"{path}: {key} = {json.dumps(value)}; it must be "
                                   f"{SETTINGS[key]}") from None
            out[key] = "off" if gate is None else gate
            continue
        if key == "translation_init":
            if not isinstance(value, bool):
                raise MetroemError(f"{path}: {key} = {json.dumps(value)}; it must be "
                                   f"{SETTINGS[key]}")
            out[key] = value
            continue
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
            value > 0 if key == "resolution_nm" else value >= 0) and value < float("inf")
        if not ok:
            raise MetroemError(f"{path}: {key} = {value!r}; it must be {SETTINGS[key]}")
        out[key] = float(value)
    return out


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
    doc = {"format": SPEC_FORMAT, "metroem_version": __version__, "spec": spec,
           "default_checkpoint": default_checkpoint}
    try:
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
    except (TypeError, ValueError) as e:
        raise MetroemError(f"the model spec is not JSON-serialisable ({e}); fix the spec") from e


def write_entry_point(module_path: str | os.PathLike) -> None:
    """Write the folder's ``create.py``, the few lines modelhouse and corgie import.

    The trainer calls this on the modules it trains, so a folder made by an older metroem
    (with a frozen ``code/`` copy) gets the current entry point.
    """
    module = Path(module_path).expanduser()
    if not ENTRY_POINT.is_file():
        raise MetroemError(f"{ENTRY_POINT} is missing from the metroem installation; reinstall it")
    atomic_write_bytes(str(module / "create.py"), ENTRY_POINT.read_bytes())


def create_module(
    pyramid_path: str | os.PathLike,
    stage: int,
    mip: int,
    suffix: str,
    spec: Mapping | None = None,
) -> ModuleInfo:
    """Create the module folder ``<stage>_mip<mip>in_<suffix>`` in a pyramid (made if absent).

    ``spec`` defaults to ``nets.default_spec()``; it is checked by building the model once and
    written complete (defaults filled in), so a later change of a default never changes what
    the module computes. The folder is assembled under a hidden temporary name and renamed
    into place, so a half-made module never carries a module name.
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
        spec = nets.build_model(spec).spec
    except Exception as e:
        raise MetroemError(f"cannot build a model from the spec ({type(e).__name__}: {e})") from e
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=pyramid))
    try:
        (tmp / "model").mkdir()
        (tmp / SPEC_FILE).write_bytes(_spec_document(spec, None))
        write_entry_point(tmp)
        tmp.chmod(0o755)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return new


def _module_dir(module_path: str | os.PathLike) -> Path:
    module = Path(module_path).expanduser()
    if not (module / SPEC_FILE).is_file():
        if not module.is_dir():
            raise MetroemError(f"module folder {module} does not exist; check the path")
        raise MetroemError(
            f"{module} is not a module folder (no {SPEC_FILE}); pass a folder named "
            f"{NAME_PATTERN} made by metroem"
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
    spec, _ = _read_document(module)
    atomic_write_bytes(str(module / SPEC_FILE), _spec_document(spec, checkpoint_name))


def update_spec(module_path: str | os.PathLike, **changes) -> dict:
    """Change keys of a module's network spec in place (atomic); returns the new spec.

    For settings that change no parameters (e.g. ``lk_iterations``, ``residual_sigma``), which
    can be switched on or off for trained weights. The new spec is checked by building it, and
    refused if its parameters differ from the old spec's (the weights would no longer fit).
    """
    from metroem import nets

    module = _module_dir(module_path)
    spec, default = read_spec(module)
    new = {**spec, **changes}
    try:
        nets.check_same_parameters(spec, new)
    except ValueError as e:
        raise MetroemError(
            f"{module.name}: the spec change {changes} does not build with the module's weights "
            f"({e}); fix the keys"
        ) from e
    atomic_write_bytes(str(module / SPEC_FILE), _spec_document(new, default))
    return new


def _read_json(path: Path, folder: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MetroemError(
            f"{path} does not exist; {folder} is not a complete metroem module folder"
        ) from None
    except (OSError, ValueError) as e:
        raise MetroemError(f"{path} is not readable JSON ({e}); fix or re-create it") from e


def _read_document(module: Path) -> tuple[dict, str | None]:
    """``(spec, default_checkpoint)`` of model_spec.json as written (references not inlined).

    The file is metroem's wrapper ``{"format": "metroem-module", "spec": ...}`` or a bare spec.
    """
    path = module / SPEC_FILE
    doc = _read_json(path, module)
    if isinstance(doc, dict) and doc.get("format") == SPEC_FORMAT:
        spec, default = doc.get("spec"), doc.get("default_checkpoint")
    else:
        spec, default = doc, None
    if not isinstance(spec, dict):
        raise MetroemError(f"{path}: the spec must be a JSON object; re-create the module")
    return spec, default


def read_spec(module_path: str | os.PathLike) -> tuple[dict, str | None]:
    """``(spec, default_checkpoint)`` of a module, with ``{"path": ...}`` references inlined.

    A ``{"path": "other.json"}`` entry is replaced by that JSON file (relative to the file that
    names it), which must lie inside the module folder.
    """
    module = _module_dir(module_path)
    spec, default = _read_document(module)
    return _inline_paths(spec, module / "model", module, depth=0), default


def _inline_paths(node, base: Path, folder: Path, depth: int):
    if depth > 16:
        raise MetroemError(f"{folder}: spec path references nest too deep (a cycle?)")
    if isinstance(node, list):
        return [_inline_paths(v, base, folder, depth) for v in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("path")
    if not isinstance(ref, str):
        return {k: _inline_paths(v, base, folder, depth) for k, v in node.items()}
    out = {k: _inline_paths(v, base, folder, depth) for k, v in node.items() if k != "path"}
    target = Path(os.path.realpath(base / ref))
    root = os.path.realpath(folder)
    if os.path.isabs(ref) or os.path.commonpath([root, str(target)]) != root:
        raise MetroemError(
            f"spec path reference {ref!r} leaves the module folder {folder}; copy the file into "
            "the folder and reference it relative to model/"
        )
    loaded = _inline_paths(_read_json(target, folder), target.parent, folder, depth + 1)
    return {**loaded, **out} if isinstance(loaded, dict) else loaded


def checkpoint_names(module_path: str | os.PathLike) -> list[str]:
    """The module's checkpoint names, oldest first (by modification time)."""
    model_dir = glob.escape(str(_module_dir(module_path) / "model"))
    paths = glob.glob(os.path.join(model_dir, "*" + WEIGHTS_SUFFIX))
    paths.sort(key=lambda p: (os.path.getmtime(p), p))
    return [os.path.basename(p)[: -len(WEIGHTS_SUFFIX)] for p in paths]


def default_checkpoint(module_path: str | os.PathLike) -> str | None:
    """What loading without a name picks: the spec's ``default_checkpoint`` when its weights
    exist, else the most recent checkpoint; None when the module has none."""
    module = _module_dir(module_path)
    names = checkpoint_names(module)
    _, default = _read_document(module)
    if default in names:
        return default
    return names[-1] if names else None


def choose_checkpoint(module_path: str | os.PathLike, checkpoint_name: str | None) -> Path | None:
    """Path of the named checkpoint, or of :func:`default_checkpoint` without a name; None when
    the module has none."""
    module = _module_dir(module_path)
    names = checkpoint_names(module)
    if checkpoint_name is None:
        checkpoint_name = default_checkpoint(module)
        if checkpoint_name is None:
            return None
    if checkpoint_name.endswith(WEIGHTS_SUFFIX):
        checkpoint_name = checkpoint_name[: -len(WEIGHTS_SUFFIX)]
    if not CHECKPOINT_NAME_RE.match(checkpoint_name) or checkpoint_name not in names:
        raise MetroemError(
            f"no checkpoint {checkpoint_name!r} in {module / 'model'}; "
            f"available: {', '.join(names) or 'none'}"
        )
    return module / "model" / (checkpoint_name + WEIGHTS_SUFFIX)


def read_weights(path: str | os.PathLike, device: str = "cpu") -> dict:
    """A plain state_dict from ``path`` (tensors only: ``weights_only=True``)."""
    try:
        state = torch.load(path, weights_only=True, map_location=device)
    except Exception as e:
        raise MetroemError(
            f"{path} is not a readable state_dict ({type(e).__name__}: {_first_line(e)}); "
            "it may be truncated or corrupt: pick another checkpoint"
        ) from e
    if not isinstance(state, dict):
        raise MetroemError(f"{path} holds a {type(state).__name__}, not a state_dict")
    return state


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else "no details"


def _few(items: list[str], n: int = 3) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def load_state_dict(model: torch.nn.Module, state: Mapping, source: str) -> None:
    """``model.load_state_dict(state)``, or one MetroemError line naming the keys that misfit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape
    ]
    problems = [
        f"{label}: {_few(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
        if keys
    ]
    if problems:
        raise MetroemError(
            f"{source} was saved from another architecture ({'; '.join(problems)}); load it "
            "with the module folder it was trained in"
        )
    model.load_state_dict(dict(state))


def build_stage(module_path: str | os.PathLike, spec_changes: Mapping | None = None
                ) -> torch.nn.Module:
    """The untrained network of a module, built from its spec (with ``spec_changes`` on top)
    by :mod:`metroem.nets`."""
    from metroem import nets

    module = _module_dir(module_path)
    spec, _ = read_spec(module)
    try:
        return nets.build_model({**spec, **dict(spec_changes or {})})
    except Exception as e:
        raise MetroemError(
            f"{module / SPEC_FILE}: this metroem ({__version__}) cannot build the spec "
            f"({type(e).__name__}: {_first_line(e)}); fix the spec, or use the metroem that "
            "wrote it"
        ) from e


def load_module(
    module_path: str | os.PathLike, checkpoint_name: str | None = None, device: str = "cpu",
    spec_changes: Mapping | None = None,
) -> torch.nn.Module:
    """A module's network with its weights, in eval mode on ``device``; fields are plain tensors.

    ``checkpoint_name`` picks ``model/<name>.state.pth.tar`` (default: :func:`choose_checkpoint`).
    ``spec_changes`` overrides spec keys that add no parameters (a training run's
    ``model.train_spec``).
    Without any checkpoint the network is untrained, with a warning. Only the folder's spec and
    weights are read; no code from the folder runs.
    """
    module = _module_dir(module_path)
    model = build_stage(module, spec_changes)
    path = choose_checkpoint(module, checkpoint_name)
    if path is None:
        warnings.warn(f"{module}: no *{WEIGHTS_SUFFIX} checkpoint in model/; the network is "
                      "untrained", stacklevel=2)
    else:
        load_state_dict(model, read_weights(path, device), str(path))
    return model.to(device).eval()
