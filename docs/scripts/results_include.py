"""Sphinx directives for benchmark results: ``results-include`` and ``verdict``.

``results-include`` shows a committed benchmark result as rendered tables.

Each benchmark writes its results once, as markdown, to ``benchmarks/results/*.md``.
The docs show that file itself, parsed by MyST, so a table lives in one file and
cannot drift from a copy::

    .. results-include:: ../../benchmarks/results/matching.md

    .. results-include:: ../../benchmarks/results/matching.md
       :table: 2

Without options the whole file is shown: its paragraphs, lists and tables. The
file's own ``#`` title is dropped (the page's section heading names it) and any
deeper heading becomes a bold paragraph, so an included file never adds sections
to the page. ``:table: N`` shows only the N-th table of the file (counting from 1).
The output sits in a ``div.results`` (styled by ``_static/results.css``).

``verdict`` opens a results section with its one-sentence verdict, and takes the
numbers it quotes from the benchmark's JSON, so they follow a rerun::

    .. verdict::

       **match_patches is {matching.json:speedup/esvit/match_patches[half]:.0f}x
       faster than EsViT's matching** on the CPU.

A field ``{FILE:PATH:FORMAT}`` reads ``FILE`` from the ``results_dir`` config value
(``../benchmarks/results`` from ``docs/``), follows ``PATH`` (``/``-separated: a
key of a mapping, an index of a list, or ``key=value,key=value`` to pick the list
item with those fields; ``PATH_A|PATH_B`` is the ratio of the two values) and
formats the value with the Python format spec
``FORMAT`` (optional; a leading ``ms`` first turns seconds into milliseconds,
e.g. ``ms.1f``). A missing file or key stops the build with its name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from docutils.utils import new_document
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def markdown_blocks(text: str) -> list[list[str]]:
    """Split markdown into blocks: runs of non-blank lines, a pipe table being one block.

    A pipe table is a run of lines starting with ``|``; it ends a paragraph even
    without a blank line before or after it, as in GitHub's renderer.
    """
    blocks: list[list[str]] = []
    current: list[str] = []
    in_table = False
    for line in text.splitlines():
        is_table_line = line.lstrip().startswith("|")
        if not line.strip() or (current and is_table_line != in_table):
            if current:
                blocks.append(current)
            current = []
        if line.strip():
            current.append(line)
            in_table = is_table_line
    if current:
        blocks.append(current)
    return blocks


def is_table(block: list[str]) -> bool:
    """Whether a block is a pipe table: header, delimiter row of ``-`` and ``:``, rows."""
    return (
        len(block) >= 2
        and all(line.lstrip().startswith("|") for line in block)
        and re.fullmatch(r"\s*\|?(\s*:?-+:?\s*\|)*\s*:?-+:?\s*\|?\s*", block[1]) is not None
    )


def select_markdown(text: str, table: int | None = None) -> str:
    """The markdown to render: the whole file without its headings, or its ``table``-th table.

    Parameters
    ----------
    text : str
        The markdown file's content.
    table : int, optional
        1-based index of the pipe table to keep alone; ``None`` keeps everything.

    Raises
    ------
    ValueError
        If ``table`` is given and the file has fewer tables.
    """
    blocks = markdown_blocks(text)
    if table is not None:
        tables = [block for block in blocks if is_table(block)]
        if not 1 <= table <= len(tables):
            raise ValueError(f"table must be in 1..{len(tables)} (tables in the file), got {table}")
        return "\n".join(tables[table - 1]) + "\n"
    kept: list[str] = []
    for block in blocks:
        heading = _HEADING.match(block[0])
        if heading and len(heading.group(1)) == 1:
            block = block[1:]  # the file's title: the page's section names it
        elif heading:
            block = [f"**{heading.group(2)}**", *block[1:]]
        if block:
            kept.append("\n".join(block))
    return "\n\n".join(kept) + "\n"


class ResultsInclude(SphinxDirective):
    """Render a benchmark's markdown results file (or one of its tables) in place."""

    required_arguments = 1
    option_spec = {"table": directives.positive_int}

    def run(self) -> list[nodes.Node]:
        from myst_parser.parsers.sphinx_ import MystParser

        rel_path, path = self.env.relfn2path(self.arguments[0], self.env.docname)
        self.env.note_dependency(rel_path)
        try:
            text = Path(path).read_text(encoding="utf-8")
            markdown = select_markdown(text, self.options.get("table"))
        except (OSError, ValueError) as error:
            raise self.error(f"results-include {self.arguments[0]}: {error}") from error
        document = new_document(path, self.state.document.settings)
        MystParser().parse(markdown, document)
        container = nodes.container(classes=["results"])
        container.extend(document.children)
        return [container]


_FIELD = re.compile(r"\{([\w.-]+\.json):([^:{}]+)(?::([^{}]*))?\}")


def lookup(data: Any, path: str) -> Any:
    """Follow a ``/``-separated path through parsed JSON (see the module docstring).

    Raises
    ------
    KeyError
        If a step of the path is not there, naming the step.
    """
    for step in path.split("/"):
        if isinstance(data, dict) and step in data:
            data = data[step]
        elif isinstance(data, list) and step.lstrip("-").isdigit() and -len(data) <= int(step) < len(data):
            data = data[int(step)]
        elif isinstance(data, list) and "=" in step:
            wanted = dict(pair.split("=", 1) for pair in step.split(","))
            matches = [item for item in data if isinstance(item, dict)
                       and all(str(item.get(k)) == v for k, v in wanted.items())]
            if len(matches) != 1:
                raise KeyError(f"{step!r} picks {len(matches)} items, not one")
            data = matches[0]
        else:
            raise KeyError(f"no {step!r}")
    return data


def fill_fields(text: str, read_json) -> str:
    """Replace each ``{FILE:PATH:FORMAT}`` field of ``text`` by the formatted value."""

    def value(match: re.Match[str]) -> str:
        name, path, spec = match.groups()
        try:
            data = read_json(name)
            found, *divisor = (lookup(data, part) for part in path.split("|"))
            if divisor:
                found = found / divisor[0]
        except KeyError as error:
            raise KeyError(f"{name}:{path}: {error.args[0]}") from None
        spec = spec or ""
        if spec.startswith("ms"):
            found, spec = found * 1000.0, spec[2:]
        return format(found, spec)

    return _FIELD.sub(value, text)


class Verdict(SphinxDirective):
    """A results section's verdict, its numbers read from the benchmark's JSON."""

    has_content = True

    def run(self) -> list[nodes.Node]:
        results_dir = Path(self.env.app.confdir) / self.config.results_dir

        def read_json(name: str) -> Any:
            path = results_dir / name
            self.env.note_dependency(str(path))
            return json.loads(path.read_text(encoding="utf-8"))

        try:
            text = fill_fields("\n".join(self.content), read_json)
        except (OSError, KeyError, ValueError, TypeError) as error:
            raise self.error(f"verdict: {error}") from error
        container = nodes.container(classes=["verdict"])
        self.state.nested_parse(StringList(text.splitlines(), source=self.content.source(0)),
                                self.content_offset, container)
        return [container]


def setup(app: Sphinx) -> dict[str, object]:
    app.setup_extension("myst_parser")
    app.add_config_value("results_dir", "../benchmarks/results", "env")
    app.add_directive("results-include", ResultsInclude)
    app.add_directive("verdict", Verdict)
    app.add_css_file("results.css")
    return {"parallel_read_safe": True, "parallel_write_safe": True}
