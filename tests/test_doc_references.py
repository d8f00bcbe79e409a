"""Every document the code cites is in the repository.

Comments, docstrings and messages of the package, the scripts and the docs may point at files
(``docs/method.md §4``, ``README.md``); each such ``*.md`` citation must name a file of this
repository. Markdown files the code *writes* (``summary.md``, ``comparison.md``, ...: string constants
that are a bare file name) are outputs, not citations. The design notes the project was planned from
live outside the repository, so their names must not appear at all.
"""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("stella_avalanche", "experiments", "benchmarks", "docs", "README.md", "Makefile", "setup.cfg")
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".cfg", ".toml", ".txt", ""}
#: the planning notes (outside the repository): a citation of them can never resolve
OUTSIDE = re.compile(r"stella-method|benchmarks-and-metrics|synthetic-calibration|avalanche-notes|"
                     r"\barchitecture\.md|\benvironment\.md|shared/design|shared/reference")
CITED_MD = re.compile(r"(?<![\w/.-])((?:\.\./)?[\w./-]*[\w-]\.md)\b")


def _repo_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split("\n")
    return [ROOT / f for f in out if f and (ROOT / f).is_file()]


def _scanned(files: list[Path]) -> list[Path]:
    keep = []
    for f in files:
        rel = f.relative_to(ROOT).as_posix()
        if rel.startswith("docs/results/"):
            continue  # published run outputs (configs copied into results.json files)
        if any(rel == s or rel.startswith(s + "/") for s in SCANNED) and f.suffix in SUFFIXES:
            keep.append(f)
    return keep


def _written_md(files: list[Path]) -> set[str]:
    """``*.md`` names the code writes: string constants (not docstrings) that are a bare file name."""
    names: set[str] = set()
    for f in files:
        if f.suffix != ".py":
            continue
        tree = ast.parse(f.read_text(), filename=str(f))
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                names.update(re.findall(r"(?:^|/)([\w-]+\.md)$", node.value.strip()))
    return names


def _resolves(cited: str, where: Path, repo: set[str]) -> bool:
    rel = (where.parent / cited).resolve()
    if rel.is_file() and rel.is_relative_to(ROOT):
        return True
    cited = cited.lstrip("./")
    return cited in repo or any(p.endswith("/" + cited) for p in repo)


def test_cited_documents_exist():
    files = _repo_files()
    repo = {f.relative_to(ROOT).as_posix() for f in files}
    scanned = _scanned(files)
    outputs = _written_md(scanned)
    assert len(scanned) > 50 and "summary.md" in outputs
    broken = []
    for f in scanned:
        for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            for cited in CITED_MD.findall(line):
                if Path(cited).name in outputs or _resolves(cited, f, repo):
                    continue
                broken.append(f"{f.relative_to(ROOT)}:{n}: {cited}")
    assert not broken, "citations of files that are not in the repository:\n" + "\n".join(broken)


def test_no_design_note_outside_the_repository_is_named():
    hits = [f"{f.relative_to(ROOT)}:{n}: {line.strip()[:100]}"
            for f in _scanned(_repo_files())
            for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1) if OUTSIDE.search(line)]
    assert not hits, "references to notes outside the repository:\n" + "\n".join(hits)


def test_method_doc_defines_every_cited_decision():
    """``D<n>`` in code comments refers to docs/method.md §9; each one cited must be defined there."""
    method = (ROOT / "docs" / "method.md").read_text()
    defined = set(re.findall(r"\*\*(D\d+) \(", method))
    cited = set()
    for f in _scanned(_repo_files()):
        if f.suffix == ".py":
            cited.update(re.findall(r"\b(D\d{1,2})\b", f.read_text()))
    assert cited and cited <= defined, sorted(cited - defined)
