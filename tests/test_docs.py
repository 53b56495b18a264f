"""The documentation's links and module names point at things that exist.

Every relative Markdown link (``[text](path)``, ``![alt](path)``, ``path#anchor``) in README.md,
models/README.md, benchmarks/README.md and docs/*.md must name an existing file; a link into a
Markdown file with ``#anchor`` must also name one of its headings (GitHub's slugs). The pages
must not mention a module that does not exist: a path ``metroem/<name>.py`` (or a folder
``metroem/<name>/``) or a dotted name ``metroem.<name>`` whose first part is neither a module of
the package nor a name ``metroem`` exports (this catches renames such as ``metroem/align.py``
-> ``metroem/inference.py``). Code blocks count for module names but not for links.

Plain text processing only: no metroem import, well under a second.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def doc_pages(root: Path = REPO) -> list[Path]:
    pages = [root / "README.md", root / "models" / "README.md", root / "benchmarks" / "README.md"]
    return pages + sorted((root / "docs").glob("*.md"))


FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.M | re.S)
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", re.M)
MODULE_PATH = re.compile(r"(?<![\w./-])metroem/((?:\w+/)*\w+)(\.py\b|/)")
DOTTED = re.compile(r"(?<![\w./-])metroem\.([A-Za-z_]\w*)")


def strip_code(text: str) -> str:
    """The text without fenced code blocks and inline code spans (links there are not links)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: markup and punctuation dropped, lower case, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(page: Path) -> list[str]:
    """``'target (why)'`` for each relative link of ``page`` that points at nothing."""
    problems = []
    for target in LINK.findall(strip_code(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            problems.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor.lower() not in anchors(dest):
            problems.append(f"{target} (no heading #{anchor} in {dest.name})")
    return problems


def stale_modules(page: Path, root: Path = REPO) -> list[str]:
    """Module paths and dotted ``metroem.<name>`` mentions of ``page`` that name nothing."""
    text = page.read_text(encoding="utf-8")
    problems = []
    for name, end in MODULE_PATH.findall(text):
        path = root / "metroem" / (name + ".py" if end == ".py" else name)
        if not path.exists():
            problems.append(f"metroem/{name}{end}")
    package = root / "metroem"
    init = (package / "__init__.py").read_text(encoding="utf-8")
    exported = set(re.findall(r"[\"'](\w+)[\"']", init.split("__all__", 1)[-1].split("]", 1)[0]))
    for name in DOTTED.findall(text):
        if not ((package / f"{name}.py").exists() or (package / name).is_dir()
                or name in exported):
            problems.append(f"metroem.{name}")
    return sorted(set(problems))


def test_relative_links_point_at_existing_files():
    problems = {str(p.relative_to(REPO)): broken_links(p) for p in doc_pages()}
    assert {page: bad for page, bad in problems.items() if bad} == {}


def test_doc_pages_name_only_existing_modules():
    problems = {str(p.relative_to(REPO)): stale_modules(p) for p in doc_pages()}
    assert {page: bad for page, bad in problems.items() if bad} == {}


def test_the_checks_catch_a_broken_link_and_a_renamed_module(tmp_path):
    (tmp_path / "metroem").mkdir()
    (tmp_path / "metroem" / "__init__.py").write_text('__all__ = ["load_aligner"]\n')
    (tmp_path / "metroem" / "inference.py").write_text("")
    (tmp_path / "there.md").write_text("# Top\n\n## Fault injection (`METROEM_FAULT`)\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](there.md) [ok](there.md#top) [ok](there.md#fault-injection-metroem_fault)\n"
        "[gone](missing.md) [bad anchor](there.md#nowhere) ![gone](png/none.png)\n"
        "[web](https://example.org/x) `[code](not/a/link.md)`\n"
        "```\n[also code](nope.md)\n```\n"
        "metroem/inference.py metroem/align.py metroem.inference metroem.load_aligner "
        "metroem.finetune.refine_field metroem_models\n"
    )
    assert broken_links(page) == [
        "missing.md (no such file)",
        "there.md#nowhere (no heading #nowhere in there.md)",
        "png/none.png (no such file)",
    ]
    assert stale_modules(page, tmp_path) == ["metroem.finetune", "metroem/align.py"]
