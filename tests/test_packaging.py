"""The package installs like one: presets and split tables travel as package data.

A non-editable install of this checkout goes into a temporary directory (no network, no build
isolation: setuptools comes from the test environment); a fresh interpreter started in another
working directory, with only that directory on its path, must load a preset config and the
VGGSound / AudioSet split tables from the installed copy, not from this checkout.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_PROBE = r"""
import json, sys
import stella_avalanche
from stella_avalanche.config import load_config
from stella_avalanche.benchmarks.splits import load_audioset_tasks, load_vggsound_categories, VGGSOUND_TASKS
from stella_avalanche.resources import config_presets
cfg = load_config("vggsound_paper", overrides=["train.epochs=2"])
syn = load_config(benchmark="synthetic")
cats = load_vggsound_categories()
print(json.dumps({"file": stella_avalanche.__file__, "presets": sorted(config_presets()),
                  "vgg_benchmark": cfg["benchmark"]["name"], "epochs": cfg["train"]["epochs"],
                  "syn_model": syn["model"]["preset"], "n_categories": len(cats),
                  "tasks": sorted(set(cats.values())), "paper_tasks": sorted(VGGSOUND_TASKS),
                  "n_audioset": len(load_audioset_tasks())}))
"""


def _can_build_wheels() -> bool:
    """pip needs ``bdist_wheel``: from the ``wheel`` package or setuptools >= 70.1."""
    import importlib.util

    import setuptools

    major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
    return importlib.util.find_spec("wheel") is not None or (major, minor) >= (70, 1)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A non-editable install of this checkout in a temporary directory (offline, no isolation).

    The source is copied first, so the build writes its metadata into the copy and not into the
    checkout. With ``pip install --target`` when this environment can build wheels; otherwise (the
    venv's bundled setuptools has no ``bdist_wheel`` and nothing may be downloaded) the same
    setuptools ``install`` command pip used to run for such projects, into the same kind of target.
    """
    src = tmp_path_factory.mktemp("src")
    for name in ("setup.cfg", "pyproject.toml", "MANIFEST.in", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "stella_avalanche", src / "stella_avalanche",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    target = tmp_path_factory.mktemp("site")
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INDEX": "1"}
    if _can_build_wheels():
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
               "--target", str(target), "--no-compile", "--quiet", str(src)]
    else:
        cmd = [sys.executable, "-c", "from setuptools import setup; setup()", "-q", "install",
               "--single-version-externally-managed", "--root", "/", "--install-lib", str(target),
               "--install-scripts", str(target / "bin"), "--install-data", str(target / "data")]
    proc = subprocess.run(cmd, cwd=src, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"install failed: {cmd}\n{proc.stdout}\n{proc.stderr}"
    return target


def test_installed_package_reads_its_data_from_another_directory(installed, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # only the install target (and the environment's own site-packages for torch, pandas, ...):
    # no checkout on the path, and the editable install's finder is bypassed by putting the
    # target first
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(installed)
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=elsewhere, capture_output=True, text=True,
                          env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(out["file"]).resolve().is_relative_to(installed.resolve()), out["file"]
    assert {"synthetic_tiny", "vggsound_paper", "audioset_paper"} <= set(out["presets"])
    assert out["vgg_benchmark"] == "vggsound" and out["epochs"] == 2
    assert out["syn_model"] == "tiny"
    # the table maps every VGGSound class used by the paper's split to one of its 8 tasks
    assert out["n_categories"] == 309 and out["tasks"] == out["paper_tasks"]
    assert out["n_audioset"] == 171
    installed_files = {p.relative_to(installed).as_posix() for p in installed.rglob("*") if p.is_file()}
    assert "stella_avalanche/configs/synthetic_tiny.yaml" in installed_files
    assert "stella_avalanche/benchmarks/split_tables/vggsound_categories.csv" in installed_files


def test_config_path_and_unknown_preset(tmp_path):
    from stella_avalanche.config import load_config

    own = tmp_path / "mine.yaml"
    own.write_text("benchmark: {name: synthetic}\ntrain: {epochs: 3}\n")
    assert load_config(own, overrides=["train.epochs=5"])["train"]["epochs"] == 5
    with pytest.raises(FileNotFoundError, match="synthetic_tiny"):
        load_config(tmp_path / "missing.yaml")


CLI_MODULES = ("run", "prepare", "pretrain", "diagnose", "downstream")
SCRIPTS = {"stella-run": "stella_avalanche.cli.run:main", "stella-prepare": "stella_avalanche.cli.prepare:main",
           "stella-pretrain": "stella_avalanche.cli.pretrain:main",
           "stella-diagnose": "stella_avalanche.cli.diagnose:main",
           "stella-downstream": "stella_avalanche.cli.downstream:main",
           "stella-compare": "stella_avalanche.cli.compare:main"}


def test_installed_console_scripts_are_declared(installed):
    """The install's metadata declares every command (console scripts point at ``cli.<name>:main``)."""
    entry_points = next(installed.glob("stella_avalanche*-info/entry_points.txt"), None)
    if entry_points is None:  # the legacy ``setup.py install`` fallback writes an egg-info directory
        entry_points = next(installed.rglob("entry_points.txt"))
    text = entry_points.read_text()
    assert "[console_scripts]" in text
    for script, target in SCRIPTS.items():
        assert f"{script} = {target}" in text, (script, text)


@pytest.mark.parametrize("name", CLI_MODULES)
def test_installed_cli_modules_run_from_another_directory(installed, tmp_path, name):
    """``python -m stella_avalanche.cli.<name> --help`` works from the installed copy alone."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(installed)
    proc = subprocess.run([sys.executable, "-m", f"stella_avalanche.cli.{name}", "--help"], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout


def test_installed_run_finds_its_preset_from_another_directory(installed, tmp_path):
    """``stella-run``'s config lookup (a packaged preset by name) works outside the checkout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(installed)
    probe = ("import json, stella_avalanche.cli.run as r, stella_avalanche.experiment as e;"
             "a = r.parse_args(['--strategy', 'derpp', 'train.epochs=1']);"
             "c = e.load_config(a.config, benchmark=a.benchmark, overrides=a.overrides);"
             "print(json.dumps([r.__file__, c['model']['preset'], c['train']['epochs']]))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr
    path, preset, epochs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(path).resolve().is_relative_to(installed.resolve()) and preset == "tiny" and epochs == 1
