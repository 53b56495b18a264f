"""One spelling per concept on every command line (docs/cli.md, metroem.cliargs)."""

from __future__ import annotations

import importlib

import pytest

from metroem import cli, cliargs
from metroem.errors import MetroemError

# command -> the function that builds its parser (download_* have two, one per script)
PARSERS = {
    "demo": "metroem.demo_pipeline:build_parser",
    "demo-volume": "metroem.demo_volume:build_parser",
    "ingest": "metroem.ingest:build_parser",
    "registered": "metroem.registered:build_parser",
    "download-image": "metroem.download:build_image_parser",
    "download-field": "metroem.download:build_field_parser",
    "train": "metroem.training.cli:build_parser",
    "generate": "metroem.generate:build_parser",
    "align": "metroem.inference:build_parser",
    "worker": "metroem.workers:build_parser",
    "export": "metroem.export:build_parser",
    "eval": "metroem.eval.cli:build_parser",
    "pretrained": "metroem.pretrained:build_parser",
}

# The flag table of docs/cli.md: concept -> (canonical flag, commands that take it)
TABLE = {
    "pyramid_path": ("--pyramid_path", {"demo", "train", "generate", "align", "export", "eval"}),
    "checkpoint_name": ("--checkpoint_name", {"train", "generate", "align", "export", "eval"}),
    "device": ("--device", {"demo", "train", "generate", "align", "eval"}),
}
ALIASES = {  # old spellings kept, same option
    ("train", "--gpu"): "device",
    ("eval", "--pyramid"): "pyramid_path",
    ("eval", "--checkpoint"): "checkpoint_name",
    ("eval", "--cv_path"): "image_path",
    ("demo", "--pyramid"): "pyramid_path",
}


def parser(command: str):
    module, func = PARSERS[command].split(":")
    return getattr(importlib.import_module(module), func)()


def options(command: str) -> dict[str, str]:
    """option string -> dest, over the parser and its sub-parsers."""
    out = {}
    todo = [parser(command)]
    while todo:
        p = todo.pop()
        for action in p._actions:
            for s in action.option_strings:
                out[s] = action.dest
            if action.choices and isinstance(action.choices, dict):
                todo.extend(action.choices.values())
    return out


def test_every_command_has_a_parser_here():
    assert set(PARSERS) == set(cli.COMMANDS)


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_one_parser_class_and_the_common_flags(command):
    p = parser(command)
    assert isinstance(p, cliargs.Parser)
    with pytest.raises(MetroemError, match=r"; see \S+( \S+)? --help$") as e:
        p.parse_args(["--nope"])
    assert "\n" not in str(e.value)  # one line, as every bad input
    opts = options(command)
    assert {"-v", "-q"} <= set(opts)
    if command != "pretrained":  # lists and copies files: nothing to compute
        assert "--threads" in opts


@pytest.mark.parametrize("concept", sorted(TABLE))
def test_each_concept_has_one_flag_on_every_command(concept):
    flag, commands = TABLE[concept]
    for command in PARSERS:
        opts = options(command)
        if command in commands:
            assert opts.get(flag) == concept, (command, flag)
        else:
            assert concept not in opts.values(), (command, concept)
        # never another spelling of the concept (apart from the kept aliases)
        other = {s for s, d in opts.items() if d == concept and s != flag}
        assert other == {s for (c, s), d in ALIASES.items() if c == command and d == concept}


@pytest.mark.parametrize("command, alias", sorted(ALIASES))
def test_aliases_set_the_same_option(command, alias):
    assert options(command)[alias] == ALIASES[(command, alias)]


def test_no_positional_pyramid():
    for command in ("align", "export"):
        p = parser(command)
        assert not [a for a in p._actions if not a.option_strings and a.dest == "pyramid"]
    a = parser("align").parse_args(["--pyramid_path", "isbi", "--src", "s.png"])
    assert a.pyramid_path == "isbi"
    a = parser("eval").parse_args(["--pyramid", "isbi", "--checkpoint", "c", "--cv_path", "v"])
    assert (a.pyramid_path, a.checkpoint_name, a.image_path) == ("isbi", "c", "v")
    a = parser("train").parse_args(["--pyramid_path", "p", "--dataset_path", "d",
                                    "--checkpoint_name", "c", "--gpu", "0"])
    assert a.device == "0"


def test_upstream_flags_stay():
    """Upstream MetroEM's train.py / download_image.py / download_field.py spellings."""
    train = options("train")
    for flag in ("--pyramid_path", "--checkpoint_name", "--train_mode", "--train_params_path",
                 "--gpu", "--train_stages", "--generate_field_stages", "--dataset_path"):
        assert flag in train
    for command in ("download-image", "download-field"):
        opts = options(command)
        for flag in ("--cv_path", "--dst_folder", "--z_start", "--z_end", "--x_offset",
                     "--y_offset"):
            assert flag in opts
    image = options("download-image")
    assert {"--mips", "--patch_sizes", "--field_dset"} <= set(image)


def test_python_dash_m_metroem_is_the_metroem_command():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "metroem", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "usage: metroem <command>" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "metroem", "nope"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "unknown command 'nope'" in bad.stderr
