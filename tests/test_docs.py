"""The documentation's references resolve.

- every "docs/design.md section N" cited in code, configs, benchmarks, tests, notebooks and the
  documentation exists there, and sections 1-12 keep their numbers and titles;
- every relative markdown link ``[text](path)`` (and ``path#anchor``) in README.md, docs/*.md and
  data/README.md points to an existing file (and heading);
- every repository path those pages, the notebooks and the package's docstrings and comments cite
  (``configs/quickstart.yaml``, ``benchmarks/results/x.json``, ``flowmap_lit/....py``) exists, and
  every README section that code or configs cite by name is a heading of README.md;
- nothing cites notes that are not in the repository (``DESIGN.md``, ``PITFALLS.md``);
- README.md stays short (at most 300 lines; the rest lives in docs/).

Each checker returns its problems, so the self-checks below can feed it fabricated bad text.
"""

import glob
import itertools
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITE = re.compile(r"design\.md,? sections? (\d+(?:\s*(?:-|,|and)\s*\d+)*)")
PAGES = [ROOT / "README.md", ROOT / "data/README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 300
DESIGN_SECTIONS = {
    1: "Time, interpolant and teacher",
    2: "The flow map and its parameterization",
    3: "Objectives",
    4: "JVP backends",
    5: "Sampling",
    6: "Exact references",
    7: "Architecture and one training step",
    8: "The digits reference point",
    9: "Diagnostics: where a flow map is wrong",
    10: "What matters for quality at a fixed budget",
    11: "Tuned grids and the exported flow map",
    12: "Evaluation across processes",
}
#: notes the project once cited; docs/design.md and docs/pitfalls.md replace them
NOT_IN_REPO = ("DESIGN.md", "PITFALLS")


# --- reading ---------------------------------------------------------------------------------------
def cited_files():
    """Every text file that may cite the design notes, a README section or a repository path."""
    for folder in ("flowmap_lit", "configs", "notebooks", "benchmarks", "tests", "docs", "data"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in {".py", ".yaml", ".md", ".ipynb"} and "__pycache__" not in path.parts:
                yield path
    yield ROOT / "README.md"


def text_of(path: Path) -> str:
    """A file's text; a notebook's cell sources (not its outputs)."""
    if path.suffix == ".ipynb":
        return "\n".join("".join(cell["source"]) for cell in json.loads(path.read_text())["cells"])
    return path.read_text(errors="replace")


def without_code(markdown: str) -> str:
    """Markdown without fenced code blocks and inline code (neither holds links or headings)."""
    markdown = re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", markdown)


# --- design sections -------------------------------------------------------------------------------
def sections_of(text: str) -> set[int]:
    out = set()
    for group in CITE.findall(text):
        for lo, hi, single in re.findall(r"(\d+)\s*-\s*(\d+)|(\d+)", group):
            out.update(range(int(lo), int(hi) + 1) if lo else {int(single)})
    return out


def design_headings() -> dict[int, str]:
    text = without_code((ROOT / "docs/design.md").read_text())
    return {int(n): title.strip() for n, title in re.findall(r"^## (\d+)\. (.+)$", text, re.M)}


# --- links and anchors -----------------------------------------------------------------------------
def slug(heading: str) -> str:
    """The anchor a code host (GitHub) gives a markdown heading."""
    heading = re.sub(r"`([^`]*)`", r"\1", heading).strip().lower()
    heading = re.sub(r"[^\w\- ]", "", heading)
    return heading.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S), re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def link_problems(markdown: str, page: Path) -> list[str]:
    """Relative links of ``page`` whose file, or whose heading, does not exist."""
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", without_code(markdown)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        if not path_part:  # a heading of this page
            if anchor not in anchors(markdown):
                problems.append(f"{page.relative_to(ROOT)}: link to a missing heading: {target}")
            continue
        file = (page.parent / path_part).resolve()
        if not file.is_relative_to(ROOT) or not file.exists():
            problems.append(f"{page.relative_to(ROOT)}: link to a missing file: {target}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
            problems.append(f"{page.relative_to(ROOT)}: link to a missing heading: {target}")
    return problems


# --- cited repository paths ------------------------------------------------------------------------
PATH = re.compile(r"(?<![\w./{-])((?:docs|configs|benchmarks|flowmap_lit|tests|notebooks|data)/[\w.*/{},-]*[\w*}])")


def expand_braces(path: str) -> list[str]:
    """``a.{json,png}`` -> ``[a.json, a.png]``."""
    parts = re.split(r"\{([^{}]*,[^{}]*)\}", path)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def path_problems(text: str, where: str) -> list[str]:
    """Repository paths cited in ``text`` that do not exist. Paths under ``data/`` other than
    data/README.md are made on each machine; placeholders (``configs/X.yaml``) and templates
    (``{name}``) are not paths."""
    problems = []
    for cited in set(PATH.findall(text)):
        if cited.startswith("data/") and cited != "data/README.md":
            continue
        template = re.search(r"\{[^,}]*\}", cited)
        placeholder = any(re.fullmatch(r"[A-Z][A-Z0-9_]*", Path(p).stem) for p in cited.split("/"))
        if template or placeholder:
            continue
        for path in expand_braces(cited):
            if not (glob.glob(str(ROOT / path)) if "*" in path else (ROOT / path).exists()):
                problems.append(f"{where}: cites a missing path: {path}")
    return problems


def readme_section_problems(text: str, where: str, readme: str) -> list[str]:
    """README sections cited by name (``README "What matters for quality"``) that README.md lacks."""
    headings = {re.sub(r"`", "", h).strip() for h in re.findall(r"^#{1,6} +(.+?) *$", without_code(readme), re.M)}
    return [f"{where}: cites README section {name!r}, which README.md does not have"
            for name in re.findall(r"README,? \"([^\"]+)\"", text) if name not in headings]


# --- tests -----------------------------------------------------------------------------------------
def test_every_cited_design_section_exists():
    headings = design_headings()
    cited = {}
    for path in cited_files():
        for n in sections_of(text_of(path)):
            cited.setdefault(n, []).append(str(path.relative_to(ROOT)))
    missing = {n: files[:3] for n, files in cited.items() if n not in headings}
    assert not missing, f"cited sections missing from docs/design.md: {missing}"
    assert len(cited) >= 9  # the parser found the citations


def test_design_sections_keep_their_numbers_and_titles():
    headings = design_headings()
    assert {n: headings.get(n) for n in DESIGN_SECTIONS} == DESIGN_SECTIONS


def test_citation_parser():
    assert sections_of("docs/design.md sections 1-3 and docs/design.md section 9") == {1, 2, 3, 9}
    assert sections_of("(docs/design.md sections 3, 4 and 6)") == {3, 4, 6}


def test_markdown_links_resolve():
    problems = [p for page in PAGES for p in link_problems(page.read_text(), page)]
    assert not problems, "\n".join(problems)
    assert sum(len(re.findall(r"\]\(", without_code(p.read_text()))) for p in PAGES) > 50  # links were found


def test_cited_repository_paths_exist():
    problems, found = [], 0
    for path in [*PAGES, *sorted((ROOT / "notebooks").glob("*.ipynb")), *sorted((ROOT / "flowmap_lit").rglob("*.py")),
                 *sorted((ROOT / "configs").rglob("*.yaml")), *sorted((ROOT / "benchmarks").glob("*.py"))]:
        text = text_of(path)
        found += len(PATH.findall(text))
        problems += path_problems(text, str(path.relative_to(ROOT)))
    assert not problems, "\n".join(problems)
    assert found > 100  # the pattern found the citations


def test_cited_readme_sections_exist():
    readme = (ROOT / "README.md").read_text()
    problems = []
    for path in cited_files():
        if path.name != "test_docs.py":
            problems += readme_section_problems(text_of(path), str(path.relative_to(ROOT)), readme)
    assert not problems, "\n".join(problems)


def test_no_citation_of_notes_outside_the_repository():
    problems = []
    for path in cited_files():
        if path.name == "test_docs.py":
            continue
        for number, line in enumerate(text_of(path).splitlines(), 1):
            problems += [f"{path.relative_to(ROOT)}:{number}: cites {name} (docs/design.md or docs/pitfalls.md instead)"
                         for name in NOT_IN_REPO if name in line]
    assert not problems, "\n".join(problems)


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/"


def test_checks_catch_fabricated_problems():
    """The checkers can fail: a fabricated page with a bad link, a bad anchor, a missing file and a
    missing README section, next to good ones that must pass."""
    page = ROOT / "docs" / "fabricated.md"  # never written: link_problems reads only the targets
    text = ("# Title\n\n## A section: with `code`\n\n"
            "[good](design.md) [good anchor](design.md#4-jvp-backends) [own](#a-section-with-code) "
            "[web](https://example.org/x.md)\n"
            "[bad](no_such_page.md) [bad anchor](design.md#99-no-such-section) [bad own](#nowhere)\n"
            "```\n[inside code](not_checked.md)\n```\n")
    problems = link_problems(text, page)
    assert len(problems) == 3, problems
    assert any("no_such_page.md" in p for p in problems) and any("#99-no-such-section" in p for p in problems)
    assert not any("not_checked" in p for p in problems)

    cited = ("configs/quickstart.yaml benchmarks/results/quality_small.{json,png} configs/digits/distill_*.yaml "
             "data/digits/classifier.pt configs/X.yaml benchmarks/results/{name}.json "
             "configs/no_such.yaml benchmarks/results/quality_small.{json,gif} flowmap_lit/no_such_*.py")
    problems = path_problems(cited, "fabricated")
    assert sorted(p.split(": ")[-1] for p in problems) == [
        "benchmarks/results/quality_small.gif", "configs/no_such.yaml", "flowmap_lit/no_such_*.py"], problems

    readme = "# Project\n\n## What matters for quality\n"
    assert not readme_section_problems('see README "What matters for quality"', "x", readme)
    assert readme_section_problems('see README, "Results"', "x", readme)

    assert slug("9. Diagnostics: where a flow map is wrong") == "9-diagnostics-where-a-flow-map-is-wrong"
    assert slug("Where the quickstart's time goes") == "where-the-quickstarts-time-goes"
    assert anchors("## A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"# 2\. Set up and run the tests[^\n]*\n(.+)\n", readme).group(1).strip()
    assert "ruff check ." in command and command.endswith("python -m pytest")
    assert (ROOT / ".ci/run").read_text().strip().splitlines()[-1] == command
