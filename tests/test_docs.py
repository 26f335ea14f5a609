"""The repository's documents: code, scripts and markdown point only to documents that ship with the
repository (docs/*.md), and every such pointer names an existing file and an existing section.

A pointer is written ``docs/<name>.md, '<Section title>'`` on one line (or ``docs/<name>.md`` alone for
the whole file); the section title must be a markdown heading (any level) of that file.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUFFIXES = (".py", ".sh", ".md")
SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "__pycache__", ".pytest_cache", ".ruff_cache"}
# names of documents that live outside the repository (a user of the package does not have them)
FORBIDDEN = ("anofpdm_spec", "hae_architecture.md", "../shared")
DOC_REF = re.compile(r"docs/([A-Za-z0-9_.-]+\.md)(?:`)?(?:,[ \t]*'([^'\n]+)')?")
WRAPPED_REF = re.compile(r"docs/[A-Za-z0-9_.-]+\.md,[ \t]*(?:'[^'\n]*)?$", re.MULTILINE)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def repo_files() -> list[Path]:
    """Every .py / .sh / .md file of the repository outside SKIP_DIRS, sorted."""
    out = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if any(part in SKIP_DIRS for part in rel.parts) or path.suffix not in SUFFIXES:
            continue
        if path.is_file():
            out.append(path)
    return sorted(out)


def doc_references(text: str) -> list[tuple[str, str | None]]:
    """(doc name, section title or None) for every docs/*.md pointer in ``text``."""
    return [(m.group(1), m.group(2)) for m in DOC_REF.finditer(text)]


def headings(path: Path) -> set[str]:
    """Titles of the markdown headings of ``path`` outside fenced code blocks."""
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)
    return {m.group(1) for m in HEADING.finditer(text)}


def test_the_scanner_sees_the_code_and_the_docs():
    names = {p.relative_to(ROOT).as_posix() for p in repo_files()}
    assert {"guided_diffusion/anofpdm/forward.py", "docs/method.md", "docs/hae.md", "README.md"} <= names
    assert not any(n.startswith(".git/") for n in names)


def test_reference_parser():
    text = ("see docs/method.md, 'Calibration' and docs/hae.md alone; `docs/hae.md`, 'Parameter counts'\n"
            "(docs/speed.md). docs/method.md,\n")
    assert doc_references(text) == [("method.md", "Calibration"), ("hae.md", None),
                                    ("hae.md", "Parameter counts"), ("speed.md", None), ("method.md", None)]
    assert WRAPPED_REF.findall(text) == ["docs/method.md,"]


@pytest.mark.parametrize("name", FORBIDDEN)
def test_no_pointer_to_documents_outside_the_repository(name):
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in repo_files()
            for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
            if name in line and p.resolve() != Path(__file__).resolve()]
    assert not hits, f"{name!r} is not part of the repository; point to docs/*.md instead: {hits}"


def test_every_docs_reference_names_an_existing_file_and_section():
    problems = []
    for path in repo_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        rel = path.relative_to(ROOT)
        if path.resolve() == Path(__file__).resolve():
            continue
        for m in WRAPPED_REF.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            problems.append(f"{rel}:{line}: keep a docs pointer and its section title on one line")
        for name, section in doc_references(text):
            doc = ROOT / "docs" / name
            if not doc.is_file():
                problems.append(f"{rel}: docs/{name} does not exist")
            elif section is not None and section not in headings(doc):
                problems.append(f"{rel}: docs/{name} has no section {section!r}")
    assert not problems, "\n".join(problems)


def test_the_method_and_hae_documents_exist_with_their_key_sections():
    method = headings(ROOT / "docs" / "method.md")
    assert {"Forward process", "Calibration", "Choosing the guidance strength", "Segmentation",
            "Image-level classification", "Gradient-SAM ablation", "Upstream deviations"} <= method
    hae = headings(ROOT / "docs" / "hae.md")
    assert {"Hybrid decoder block", "Multi-scale sparse attention", "Bottleneck MLP of HAE V2",
            "Parameter counts"} <= hae


def test_every_flag_named_in_the_deviations_exists():
    """The flags docs/method.md names in 'Upstream deviations' (those that restore upstream behaviour among
    them) are real flags of the evaluation, or of scripts/preprocess.py for --mask_resize."""
    from guided_diffusion.anofpdm.translation_flags import create_argparser
    from guided_diffusion.data.preprocess import MASK_RESIZE_CHOICES

    section = (ROOT / "docs" / "method.md").read_text(encoding="utf-8").split("## Upstream deviations", 1)[1]
    table = section.split("###", 1)[0]
    restoring = set(re.findall(r"`(?:scripts/preprocess.py )?(--[a-z_]+)", table))
    assert {"--ugp", "--legacy_indexing", "--legacy_segmentation", "--legacy_metrics", "--min_cc_size",
            "--mask_resize"} <= restoring
    named = set(re.findall(r"(--[a-z][a-z_]+)", section))
    known = {opt for action in create_argparser()._actions for opt in action.option_strings}
    preprocess_src = (ROOT / "scripts" / "preprocess.py").read_text(encoding="utf-8")
    if '"--mask_resize"' in preprocess_src and "bilinear" in MASK_RESIZE_CHOICES:
        known.add("--mask_resize")
    assert named <= known, f"flags named in the deviations that do not exist: {sorted(named - known)}"
