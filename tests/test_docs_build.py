"""The built docs show results as rendered tables and figures, never as preformatted text.

The docs are built once per session (Sphinx in a subprocess, into a temporary
folder, a few seconds) without the API reference, whose autodoc imports take most
of a full build and which shows no results (``scripts/test.sh`` builds it all
with ``-W``). Their HTML is read back:

* no page shows a table as preformatted text: a ``<pre>`` block whose lines look
  like a markdown pipe table or an rst grid table;
* every page that includes benchmark results (``.. results-include::``) renders
  at least as many ``<table>`` elements as the markdown it includes has tables;
* every results page opens its sections with a ``verdict`` block, whose
  numbers come from the results JSON, and the build raises no warning about them;
* every image a page shows, and every image or figure the sources reference,
  exists.

The helpers of the ``results-include`` directive and the plot script
(``docs/scripts``) are tested on their own as well.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RESULTS = ROOT / "benchmarks" / "results"
RESULT_PAGES = ("guides/benchmarks", "guides/patch_matching", "guides/reproducing")

sys.path.insert(0, str(DOCS / "scripts"))
from results_include import (  # noqa: E402
    fill_fields,
    is_table,
    lookup,
    markdown_blocks,
    select_markdown,
)

# A markdown pipe-table row ("| a | b |") or delimiter row ("|---|:--:|"), or an
# rst grid-table border ("+----+----+") or simple-table rule ("==== ====").
_TABLE_LINE = re.compile(r"^\s*(\|.*\|\s*$|\+[-=+]{3,}\+\s*$|={3,}(\s+={3,})+\s*$)")


class _Page(HTMLParser):
    """The ``<pre>`` texts, ``<img>`` sources and ``<table>`` count of one HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.pre: list[str] = []
        self.images: list[str] = []
        self.tables = 0
        self._pre_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "pre":
            self._pre_depth += 1
            if self._pre_depth == 1:
                self.pre.append("")
        elif tag == "img":
            self.images.append(dict(attrs).get("src") or "")
        elif tag == "table":
            self.tables += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "pre":
            self._pre_depth -= 1

    def handle_data(self, data: str) -> None:
        if self._pre_depth:
            self.pre[-1] += data


def read_page(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    return page


def preformatted_tables(html: str) -> list[str]:
    """The ``<pre>`` blocks of a page that hold a table: two or more table-like lines."""
    return [text for text in read_page(html).pre
            if sum(bool(_TABLE_LINE.match(line)) for line in text.splitlines()) >= 2]


def expected_tables(rst: Path) -> int:
    """How many tables the ``results-include`` directives of an rst source bring in."""
    text = rst.read_text(encoding="utf-8")
    count = 0
    for match in re.finditer(r"^\.\. results-include:: (\S+)\n((?:   :\S+:.*\n)*)", text, re.M):
        if ":table:" in match.group(2):
            count += 1
        else:
            markdown = (rst.parent / match.group(1)).read_text(encoding="utf-8")
            count += sum(is_table(block) for block in markdown_blocks(markdown))
    return count


@pytest.fixture(scope="session")
def built_docs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The HTML folder of a fresh docs build, and the build's warnings."""
    out = tmp_path_factory.mktemp("docs_html")
    build = subprocess.run(
        [sys.executable, "-m", "sphinx", "-E", "-q", "-b", "html", "-d", str(out / ".doctrees"),
         "-D", "exclude_patterns=_build,scripts,api", str(DOCS), str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    return out, build.stderr


# ----------------------------------------------------------------- the checks themselves


def test_detector_finds_tables_in_pre_and_ignores_code() -> None:
    markdown = "<pre>| method | ms |\n|---|---:|\n| a | 1.0 |\n</pre>"
    grid = "<pre><span>+-----+-----+</span>\n| a   | b   |\n+=====+=====+\n</pre>"
    code = "<pre>python benchmarks/bench_matching.py\nx = a | b\n</pre>"
    table = "<table><tr><td>| a |</td></tr></table><pre>one | line |\n</pre>"
    assert len(preformatted_tables(markdown)) == 1
    assert len(preformatted_tables(grid)) == 1
    assert preformatted_tables(code) == []
    assert preformatted_tables(table) == []


def test_expected_tables_counts_included_markdown(tmp_path: Path) -> None:
    (tmp_path / "r.md").write_text("# T\n\ntext\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
                                   "| c |\n|---|\n| 3 |\n")
    (tmp_path / "page.rst").write_text(".. results-include:: r.md\n\nprose\n\n"
                                       ".. results-include:: r.md\n   :table: 2\n")
    assert expected_tables(tmp_path / "page.rst") == 3


# ----------------------------------------------------------------- the built docs


def test_no_page_shows_a_table_as_preformatted_text(built_docs: tuple[Path, str]) -> None:
    out, _ = built_docs
    offenders = {}
    for page in out.rglob("*.html"):
        if "_modules" in page.parts:  # highlighted source code, not docs
            continue
        found = preformatted_tables(page.read_text(encoding="utf-8"))
        if found:
            offenders[str(page.relative_to(out))] = found[0][:200]
    assert not offenders, f"tables shown as preformatted text: {offenders}"


@pytest.mark.parametrize("name", RESULT_PAGES)
def test_results_pages_render_their_tables(built_docs: tuple[Path, str], name: str) -> None:
    out, _ = built_docs
    page = read_page((out / f"{name}.html").read_text(encoding="utf-8"))
    expected = expected_tables(DOCS / f"{name}.rst")
    assert page.tables >= max(expected, 1), (name, page.tables, expected)


@pytest.mark.parametrize("name", RESULT_PAGES)
def test_results_pages_open_with_verdicts(built_docs: tuple[Path, str], name: str) -> None:
    out, warnings = built_docs
    html = (out / f"{name}.html").read_text(encoding="utf-8")
    assert 'class="verdict' in html
    assert not re.search(r"\{[\w.-]+\.json:", html), "a verdict field was not filled"
    page_warnings = [line for line in warnings.splitlines() if f"{name}.rst" in line]
    assert not page_warnings, page_warnings


def test_every_image_shown_exists(built_docs: tuple[Path, str]) -> None:
    out, warnings = built_docs
    missing = []
    for page in out.rglob("*.html"):
        for src in read_page(page.read_text(encoding="utf-8")).images:
            if src.startswith(("http:", "https:", "data:")):
                continue
            if not (page.parent / src.split("#")[0]).is_file():
                missing.append(f"{page.relative_to(out)}: {src}")
    assert not missing, missing
    assert "image file not readable" not in warnings, warnings


def test_every_referenced_image_exists() -> None:
    directive = re.compile(r"^\s*\.\. (?:image|figure):: (\S+)", re.M)
    sources = [*DOCS.rglob("*.rst"), ROOT / "README.md"]
    referenced = [(rst, path) for rst in sources if "_build" not in rst.parts
                  for path in directive.findall(rst.read_text(encoding="utf-8"))]
    assert any(path.endswith("reproduction_arms.png") for _, path in referenced)
    missing = [f"{rst.relative_to(ROOT)}: {path}" for rst, path in referenced
               if not (rst.parent / path).is_file()]
    assert not missing, missing


# ----------------------------------------------------------------- results-include helpers


def test_select_markdown_drops_the_title_and_keeps_no_section() -> None:
    text = "# Title\nintro\n\n## Part\n\n| a | b |\n|---|--:|\n| 1 | 2 |\nafter\n"
    kept = select_markdown(text)
    assert "# Title" not in kept and "Title" not in kept
    assert "intro" in kept and "**Part**" in kept and "after" in kept
    assert not re.search(r"^#", kept, re.M)
    assert "| 1 | 2 |" in kept


def test_select_markdown_picks_one_table_and_rejects_a_missing_one() -> None:
    text = "| a |\n|---|\n| 1 |\n\nprose\n\n| b | c |\n|:--|--:|\n| 2 | 3 |\n"
    assert select_markdown(text, table=2) == "| b | c |\n|:--|--:|\n| 2 | 3 |\n"
    with pytest.raises(ValueError, match="table must be in 1..2"):
        select_markdown(text, table=3)


def test_markdown_blocks_split_a_table_from_adjacent_prose() -> None:
    blocks = markdown_blocks("Caption:\n| a |\n|---|\n| 1 |\nNote.\n")
    assert [is_table(b) for b in blocks] == [False, True, False]


def test_verdict_fields_read_paths_selectors_ratios_and_formats() -> None:
    data = {"a.json": {"speedup": {"m[half]": 187.24}, "s": {"x": 0.000832, "y": 0.1557},
                       "rows": [{"config": "dino", "out_dim": 1000, "v": 2.0},
                                {"config": "pw", "out_dim": 1000, "v": 5.0}],
                       "pair": [3.77, 1.12]}}
    fields = ("{a.json:speedup/m[half]:.0f}x, {a.json:s/x:ms.2f} ms, "
              "{a.json:rows/config=pw,out_dim=1000/v|rows/config=dino,out_dim=1000/v:.1f}x, "
              "{a.json:pair/0:+.1f} ± {a.json:pair/1:.1f}")
    assert fill_fields(fields, data.__getitem__) == "187x, 0.83 ms, 2.5x, +3.8 ± 1.1"
    assert lookup(data["a.json"], "pair/-1") == 1.12


def test_verdict_fields_name_what_is_missing() -> None:
    data = {"a.json": {"rows": [{"config": "dino"}, {"config": "dino"}], "k": 1}}
    with pytest.raises(KeyError, match="a.json:k/nope: no 'nope'"):
        fill_fields("{a.json:k/nope}", data.__getitem__)
    with pytest.raises(KeyError, match="picks 2 items, not one"):
        fill_fields("{a.json:rows/config=dino}", data.__getitem__)
    with pytest.raises(KeyError, match="no 'other'"):
        fill_fields("{a.json:other}", data.__getitem__)


# ----------------------------------------------------------------- plots from the committed JSON


def test_plots_draw_from_the_committed_results(tmp_path: Path) -> None:
    from make_results_plots import PLOTS

    for name in RESULTS.glob("*.json"):
        shutil.copy(name, tmp_path / name.name)
    for plot in PLOTS.values():
        out = plot(tmp_path)
        assert out is not None and out.stat().st_size > 10_000, plot.__name__
        assert (RESULTS / out.name).is_file(), f"{out.name} is not committed"


def test_reproduction_plot_takes_new_arms_and_unseeded_baselines(tmp_path: Path) -> None:
    from make_results_plots import plot_reproduction_arms

    runs = [{"arm": arm, "seed": seed, "knn20": 50.0 + bump + seed, "linear": 60.0 - bump}
            for arm, bump in (("dino", 0.0), ("new-arm", -9.0)) for seed in (0, 1)]
    runs.append({"arm": "raw pixels", "knn20": 78.7, "linear": 78.4})  # no seed
    runs.append({"arm": "knn only", "seed": 0, "knn20": 40.0})  # no linear probe
    (tmp_path / "reproduction.json").write_text(json.dumps({"runs": runs}))
    assert plot_reproduction_arms(tmp_path).is_file()
