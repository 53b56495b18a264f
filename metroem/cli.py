"""``metroem <command> ...``: one entry point for every command-line tool.

Each command lives in its own module with a ``main(argv)``; this file only dispatches, so
``metroem align ...`` is the same as ``python -m metroem.inference ...``.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("metroem.demo_pipeline:main", "run the whole pipeline on the built-in demo stack"),
    "demo-volume": ("metroem.demo_volume:main",
                    "build a misaligned demo CloudVolume with ground truth"),
    "ingest": ("metroem.ingest:main", "import a folder of section images as a CloudVolume"),
    "download-image": ("metroem.download:download_image_main", "cut image pairs into h5"),
    "registered": ("metroem.registered:main",
                   "write a registered block's neighbour pairs (known zero field) as datasets"),
    "download-field": ("metroem.download:download_field_main", "cut a field volume into h5"),
    "train": ("metroem.training.cli:main", "train a pyramid stage by stage"),
    "generate": ("metroem.generate:main", "generate the fields that feed the next stage"),
    "align": ("metroem.inference:main", "align images or a CloudVolume z range, tile by tile"),
    "worker": ("metroem.workers:main", "run stack-alignment tasks from a task queue"),
    "export": ("metroem.export:main", "export a pyramid as one torch.export program (.pt2)"),
    "eval": ("metroem.eval.cli:main", "measure alignment quality, compare baselines, report"),
    "pretrained": ("metroem.pretrained:main", "list the shipped pyramids, or copy one to train"),
}


def _usage() -> str:
    lines = ["usage: metroem <command> [options]", "", "commands:"]
    lines += [f"  {name:<15} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`metroem <command> --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; `metroem --help` lists the commands",
              file=sys.stderr)
        return 2
    module_name, func = COMMANDS[name][0].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            print(f"error: command {name!r} is not available in this install", file=sys.stderr)
            return 2
        raise
    result = getattr(module, func)(rest)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
