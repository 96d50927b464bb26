"""Every "docs/design.md section N" cited in code, configs, notebooks and README exists there."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITE = re.compile(r"design\.md,? sections? (\d+(?:\s*(?:-|,|and)\s*\d+)*)")


def cited_files():
    for folder in ("flowmap_lit", "configs", "notebooks", "benchmarks", "tests", "docs"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in {".py", ".yaml", ".md", ".ipynb"} and "__pycache__" not in path.parts:
                yield path
    yield ROOT / "README.md"


def sections_of(text: str) -> set[int]:
    out = set()
    for group in CITE.findall(text):
        for lo, hi, single in re.findall(r"(\d+)\s*-\s*(\d+)|(\d+)", group):
            out.update(range(int(lo), int(hi) + 1) if lo else {int(single)})
    return out


def test_every_cited_design_section_exists():
    headings = {int(m) for m in re.findall(r"^## (\d+)\. ", (ROOT / "docs/design.md").read_text(), re.M)}
    cited = {}
    for path in cited_files():
        text = path.read_text(errors="replace")
        assert "DESIGN.md" not in text or path.name == "test_docs.py", f"{path}: cite docs/design.md, not DESIGN.md"
        for n in sections_of(text):
            cited.setdefault(n, []).append(str(path.relative_to(ROOT)))
    missing = {n: files[:3] for n, files in cited.items() if n not in headings}
    assert not missing, f"cited sections missing from docs/design.md: {missing}"
    assert len(cited) >= 9  # the parser found the citations


def test_citation_parser():
    assert sections_of("docs/design.md sections 1-3 and docs/design.md section 9") == {1, 2, 3, 9}
    assert sections_of("(docs/design.md sections 3, 4 and 6)") == {3, 4, 6}
