"""Published outputs carry no machine paths.

Every committed file under ``docs/`` and the README is scanned for absolute paths that exist only
on the machine that wrote them (home, temp, checkout or mount trees, Windows drives); and the
function that names files in results.json (``stella_avalanche.paths.portable_path``) must turn the
cache, the checkout and installed packages into machine-independent names.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from stella_avalanche.paths import CACHE_PREFIX, cache_file, find_machine_paths, portable_path

ROOT = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".json", ".jsonl", ".md", ".py", ".csv", ".tsv", ".txt", ".yaml", ".yml", ".log", ""}


def _published_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "docs", "README.md"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\n")
    return [ROOT / f for f in out if f and (ROOT / f).is_file() and (ROOT / f).suffix in TEXT_SUFFIXES]


def test_docs_and_readme_hold_no_machine_paths():
    files = _published_files()
    assert len(files) > 50, "the scan found too few files: docs/ moved?"
    found = {}
    for f in files:
        hits = find_machine_paths(f.read_text(encoding="utf-8", errors="replace"))
        if hits:
            found[f.relative_to(ROOT).as_posix()] = hits[:2]
    assert not found, f"{len(found)} published files hold machine paths, e.g. " + \
        "; ".join(f"{k}: {v}" for k, v in list(found.items())[:5])


@pytest.mark.parametrize("text", ['"backbone": "/root/.cache/stella_avalanche/init/x/backbone.pt"',
                                  '"/home/ann/stella/cav.py:12"', "--out /tmp/run", "C:\\Users\\ann\\run",
                                  '"out_dir": "/work/exp13/s1"', '"C:\\\\Users\\\\ann"', "/Users/bob/x"])
def test_the_scan_finds_machine_paths(text):
    assert find_machine_paths(text)


@pytest.mark.parametrize("text", ["--data-root /data --out runs/x", "$STELLA_CACHE/init/k/backbone.pt",
                                  "stella_avalanche/models/cav.py:12", "A→V / V→A", "https://x.org/home/a",
                                  "~/.cache/stella_avalanche", "e.g. 0.5/1.0 at work/tmp"])
def test_the_scan_leaves_portable_text_alone(text):
    assert not find_machine_paths(text)


def test_portable_path_names(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("STELLA_CACHE", str(cache))
    ckpt = cache / "init" / "synthetic-default-0123456789abcdef" / "backbone.pt"
    assert portable_path(ckpt) == f"{CACHE_PREFIX}/init/synthetic-default-0123456789abcdef/backbone.pt"
    assert portable_path(ROOT / "stella_avalanche" / "models" / "cav.py") == "stella_avalanche/models/cav.py"
    site = tmp_path / "venv" / "lib" / "python3.11" / "site-packages" / "torch" / "cuda" / "streams.py"
    assert portable_path(site) == "torch/cuda/streams.py"
    monkeypatch.chdir(tmp_path)
    assert portable_path(tmp_path / "runs" / "a" / "stage1.pt") == "runs/a/stage1.pt"
    assert portable_path("/elsewhere/weights/stage1.pt") == "stage1.pt"
    assert portable_path("stage1.pt") == "stage1.pt" and portable_path(None) is None
    # cache_file undoes portable_path for cached files, and names nothing else
    assert cache_file(portable_path(ckpt)) == ckpt
    assert cache_file("runs/a/stage1.pt") is None and cache_file(None) is None
