"""Build this module folder's aligner: the modelhouse / corgie entry point of a metroem module.

Layout of the folder around this file (written by ``metroem.modules.create_module``)::

    create.py                       this file
    code/__init__.py                frozen copy of the metroem code the module was trained with
    code/fields.py
    code/nets.py
    model/model_spec.json           {"format": "metroem-module", "spec": {...},
                                     "default_checkpoint": "<name>" or null}
    model/<name>.state.pth.tar      plain state_dicts (torch.load(..., weights_only=True))

``create()`` needs only torch, not metroem, and reads every file before it returns, because
modelhouse deletes its temporary copy of the folder right after calling it. Loading a module
executes this file and ``code/``: only load modules you trust.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import re
import sys
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SPEC_FILE = os.path.join("model", "model_spec.json")
WEIGHTS_SUFFIX = ".state.pth.tar"
CODE_FILES = ("__init__.py", "fields.py", "nets.py")  # load order: nets imports fields
SPEC_FORMAT = "metroem-module"
CHECKPOINT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

try:  # metroem's one-line error type when metroem is installed; a look-alike otherwise
    from metroem.errors import MetroemError as ModuleLoadError
except ImportError:

    class ModuleLoadError(RuntimeError):
        """A module folder that cannot be loaded, explained in one line."""


OUTPUTS = ("tensor", "torchfields")


def create(
    checkpoint_name: str | None = None, device: str = "cpu", output: str = "tensor", **kwargs
) -> torch.nn.Module:
    """The aligner of this folder with weights loaded, in eval mode, on ``device``.

    ``checkpoint_name`` picks ``model/<checkpoint_name>.state.pth.tar``; by default the spec's
    ``default_checkpoint``, else the only (or most recently modified) checkpoint. Without any
    checkpoint the model is untrained (with a warning). ``output="tensor"`` returns the plain
    stage model (fields are plain tensors); ``output="torchfields"`` wraps it as a corgie
    processor (:class:`CorgieProcessor`) whose fields are torchfields DisplacementFields.
    Other keyword arguments (corgie passes its processor params through) are ignored.
    """
    if output not in OUTPUTS:
        raise ModuleLoadError(f"output={output!r} is not one of {', '.join(OUTPUTS)}")
    model = load(HERE, checkpoint_name=checkpoint_name, device=device)
    return CorgieProcessor(model) if output == "torchfields" else model


class CorgieProcessor(torch.nn.Module):
    """A stage model as corgie calls it: keyword tensors in, a ``DisplacementField`` out.

    corgie calls ``processor(src_img=..., tgt_img=..., src_agg_field=..., tgt_agg_field=...,
    **other src_*/tgt_* layers)`` with uint8 ``(1, 1, H, W)`` CPU tensors and without
    ``torch.no_grad()``, and reads the result's ``.x`` / ``.y``. The field is the saturated
    one, in pixels of the module's MIP (channel 0 along the last axis), as a torchfields
    ``DisplacementField`` (``tensor.field()``: a Tensor subclass, values unchanged) on the
    input's device. Extra layers are ignored.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, src_img, tgt_img, src_agg_field=None, tgt_agg_field=None, **kwargs):
        import torchfields  # noqa: F401  (registers Tensor.field)

        agg = None if src_agg_field is None else src_agg_field.as_subclass(torch.Tensor)
        with torch.no_grad():
            field = self.model(
                src_img.as_subclass(torch.Tensor), tgt_img.as_subclass(torch.Tensor), agg
            )
        return field.as_subclass(torch.Tensor).to(src_img.device).contiguous().field()


def load(folder: str, checkpoint_name: str | None = None, device: str = "cpu") -> torch.nn.Module:
    """Build the model of the module ``folder`` from its own code, spec and weights."""
    nets = load_code(folder)
    spec, default = read_spec(folder)
    try:
        model = nets.build_model(spec)
    except Exception as e:
        raise ModuleLoadError(
            f"{os.path.join(folder, SPEC_FILE)}: the frozen code cannot build this spec "
            f"({type(e).__name__}: {e}); fix the spec or re-create the module"
        ) from e
    path = choose_checkpoint(folder, checkpoint_name or default)
    if path is None:
        warnings.warn(
            f"{folder}: no *{WEIGHTS_SUFFIX} checkpoint in model/; returning an untrained model",
            stacklevel=2,
        )
    else:
        load_weights(model, read_weights(path, device), path)
    return model.to(device).eval()


def load_code(folder: str):
    """Import ``folder/code`` as a package named after a hash of its files; return its ``nets``.

    Modules whose frozen code differs get different package names, so they coexist in one
    process; identical code is imported once. Nothing is written to the folder (no bytecode).
    """
    code_dir = os.path.join(folder, "code")
    digest = hashlib.sha256()
    for name in CODE_FILES:
        path = os.path.join(code_dir, name)
        if not os.path.isfile(path):
            raise ModuleLoadError(
                f"{path} is missing; re-create the module or run metroem.modules.refresh_code on it"
            )
        with open(path, "rb") as f:
            digest.update(name.encode() + b"\0" + f.read() + b"\0")
    package = "_metroem_module_" + digest.hexdigest()[:20]
    if package + ".nets" in sys.modules:
        return sys.modules[package + ".nets"]
    dont_write = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        pkg = _exec_file(package, os.path.join(code_dir, "__init__.py"), [code_dir])
        for name in CODE_FILES[1:]:
            sub = name[: -len(".py")]
            setattr(pkg, sub, _exec_file(f"{package}.{sub}", os.path.join(code_dir, name)))
    except BaseException:
        for key in [k for k in sys.modules if k == package or k.startswith(package + ".")]:
            del sys.modules[key]
        raise
    finally:
        sys.dont_write_bytecode = dont_write
    return sys.modules[package + ".nets"]


def _exec_file(name: str, path: str, search: list[str] | None = None):
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=search)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def read_spec(folder: str) -> tuple[dict, str | None]:
    """``(spec, default_checkpoint)`` from ``model/model_spec.json``, ``path`` references inlined.

    The file is either metroem's wrapper ``{"format": "metroem-module", "spec": ...}`` or a bare
    spec. A ``{"path": "other.json"}`` entry is replaced by that JSON file (relative to the file
    that names it), which must lie inside the module folder.
    """
    path = os.path.join(folder, SPEC_FILE)
    doc = _read_json(path, folder)
    if isinstance(doc, dict) and doc.get("format") == SPEC_FORMAT:
        spec, default = doc.get("spec"), doc.get("default_checkpoint")
    else:
        spec, default = doc, None
    if not isinstance(spec, dict):
        raise ModuleLoadError(f"{path}: the spec must be a JSON object; re-create the module")
    return _inline_paths(spec, os.path.dirname(path), folder, depth=0), default


def _read_json(path: str, folder: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ModuleLoadError(
            f"{path} does not exist; {folder} is not a complete metroem module folder"
        ) from None
    except (OSError, ValueError) as e:
        raise ModuleLoadError(f"{path} is not readable JSON ({e}); fix or re-create it") from e


def _inline_paths(node, base: str, folder: str, depth: int):
    if depth > 16:
        raise ModuleLoadError(f"{folder}: spec path references nest too deep (a cycle?)")
    if isinstance(node, list):
        return [_inline_paths(v, base, folder, depth) for v in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("path")
    if not isinstance(ref, str):
        return {k: _inline_paths(v, base, folder, depth) for k, v in node.items()}
    out = {k: _inline_paths(v, base, folder, depth) for k, v in node.items() if k != "path"}
    target = os.path.realpath(os.path.join(base, ref))
    root = os.path.realpath(folder)
    if os.path.isabs(ref) or os.path.commonpath([root, target]) != root:
        raise ModuleLoadError(
            f"spec path reference {ref!r} leaves the module folder {folder}; copy the file into "
            "the folder and reference it relative to model/"
        )
    loaded = _inline_paths(_read_json(target, folder), os.path.dirname(target), folder, depth + 1)
    return {**loaded, **out} if isinstance(loaded, dict) else loaded


def checkpoint_names(folder: str) -> list[str]:
    """Names of the checkpoints in ``folder/model``, oldest first (by modification time)."""
    model_dir = glob.escape(os.path.join(folder, "model"))
    paths = glob.glob(os.path.join(model_dir, "*" + WEIGHTS_SUFFIX))
    paths.sort(key=lambda p: (os.path.getmtime(p), p))
    return [os.path.basename(p)[: -len(WEIGHTS_SUFFIX)] for p in paths]


def choose_checkpoint(folder: str, checkpoint_name: str | None) -> str | None:
    """Path of the named checkpoint, or of the most recent one; None when there is none."""
    names = checkpoint_names(folder)
    if checkpoint_name is None:
        return os.path.join(folder, "model", names[-1] + WEIGHTS_SUFFIX) if names else None
    if checkpoint_name.endswith(WEIGHTS_SUFFIX):
        checkpoint_name = checkpoint_name[: -len(WEIGHTS_SUFFIX)]
    if not CHECKPOINT_NAME_RE.match(checkpoint_name) or checkpoint_name not in names:
        raise ModuleLoadError(
            f"no checkpoint {checkpoint_name!r} in {os.path.join(folder, 'model')}; "
            f"available: {', '.join(names) or 'none'}"
        )
    return os.path.join(folder, "model", checkpoint_name + WEIGHTS_SUFFIX)


def read_weights(path: str, device: str = "cpu") -> dict:
    """A plain state_dict from ``path`` (tensors only: ``weights_only=True``)."""
    try:
        state = torch.load(path, weights_only=True, map_location=device)
    except Exception as e:
        raise ModuleLoadError(
            f"{path} is not a readable state_dict ({type(e).__name__}: {_first_line(e)}); "
            "it may be truncated or corrupt: pick another checkpoint"
        ) from e
    if not isinstance(state, dict):
        raise ModuleLoadError(f"{path} holds a {type(state).__name__}, not a state_dict")
    return state


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else "no details"


def _few(items: list[str], n: int = 3) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def load_weights(model: torch.nn.Module, state: dict, source: str) -> None:
    """``model.load_state_dict(state)``, or one line naming the keys that do not fit."""
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
        raise ModuleLoadError(
            f"{source} was saved from another architecture ({'; '.join(problems)}); load it "
            "with the module folder it was trained in"
        )
    model.load_state_dict(state)
