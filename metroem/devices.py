"""``--device``: the one parser of device names, for every command and :func:`load_aligner`.

``cpu``; ``gpu`` / ``cuda`` (the first GPU; under torchrun, this process's GPU); ``cuda:N`` or
``N`` (GPU N); ``all`` (every GPU, else the CPU); ``0,2`` (those GPUs). ``metroem align``
spreads its chunks over several devices (:func:`parse_devices`); the other commands run on one
(:func:`parse_device`). Naming a GPU that is not there is a MetroemError, never a silent CPU
fallback. See docs/cli.md.
"""

from __future__ import annotations

import torch

from metroem.errors import MetroemError

__all__ = ["parse_devices", "parse_device", "HELP"]

HELP = "cpu | gpu | cuda:N | N | all | GPU ids like 0,2"


def _gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parse_devices(spec: str | torch.device | None, local_rank: int = 0) -> list[torch.device]:
    """The devices ``spec`` names (see the module docstring); ``None`` is the CPU.

    ``gpu`` / ``cuda`` mean GPU ``local_rank`` (torchrun's ``LOCAL_RANK``; 0 otherwise).
    """
    text = "cpu" if spec is None else str(spec).strip()
    name = text.lower()
    n = _gpu_count()
    if name == "cpu":
        return [torch.device("cpu")]
    if name == "all":
        return [torch.device(f"cuda:{i}") for i in range(n)] or [torch.device("cpu")]
    if name in ("gpu", "cuda"):
        ids = [int(local_rank)]
    else:
        try:
            ids = [int(p.strip()) for p in name.replace("cuda:", "").split(",") if p.strip()]
        except ValueError:
            raise MetroemError(f"unknown --device {text!r}; use {HELP}") from None
        if not ids:
            raise MetroemError(f"--device is empty; use {HELP}")
    missing = [i for i in ids if i >= n or i < 0]
    if missing:
        have = f"this machine has GPUs 0..{n - 1}" if n else "this machine has no GPU"
        raise MetroemError(
            f"--device {text!r} asks for GPU {missing[0]}, which is not available ({have}); "
            "use --device cpu or a visible GPU index"
        )
    return [torch.device(f"cuda:{i}") for i in ids]


def parse_device(spec: str | torch.device | None, local_rank: int = 0) -> torch.device:
    """The one device ``spec`` names, for commands that run on one device."""
    found = parse_devices(spec, local_rank)
    if len(found) != 1:
        raise MetroemError(
            f"--device {str(spec).strip()!r} names {len(found)} devices; this runs on one: "
            "cpu, gpu, cuda:N or N"
        )
    return found[0]
