"""The scripts in examples/ run as a user runs them, on the ``tiny`` synthetic preset.

Each runs in its own process with the arguments that make it fast (two tasks, one epoch, batch 4),
with a private cache shared by the examples of this module (the tiny data set is generated once).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--preset", "tiny", "--tasks", "2", "--epochs", "1", "--batch-size", "4", "--mem-size", "8"]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    cache = tmp_path_factory.mktemp("cache")
    e = {**os.environ, "STELLA_CACHE": str(cache), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
         "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return e


def _run(script: str, args: list[str], env: dict, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_stella_in_your_own_strategy(env, tmp_path):
    out = _run("stella_in_your_strategy.py", [*FAST, "--out", str(tmp_path / "logs")], env, tmp_path)
    # the user's strategy trained with STELLA and the LR scheduler; its own loss term and STELLA's are logged
    for name in ("loss_epoch/extra_nce", "loss_epoch/stella_matching", "loss_epoch/nce", "Loss_Epoch/train_phase"):
        assert name in out, name
    assert "V2A_R@1_Pooled/eval_phase/retrieval_stream" in out  # InteractiveLogger got the retrieval metrics
    matrix = out[out.index("recall matrix"):].splitlines()[1:3]
    assert len(matrix) == 2 and all(len(row.split()) == 2 for row in matrix)
    assert re.search(r"average accuracy: \d+\.\d\d", out)
    csv = (tmp_path / "logs" / "csv" / "training_results.csv").read_text().splitlines()
    assert len(csv) == 3 and float(csv[-1].split(",")[4]) > 0  # CSVLogger: the training loss per experience
    assert any((tmp_path / "logs" / "tb").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("strategy", ["derpp", "stella"])
def test_your_own_backbone(env, tmp_path, strategy):
    out = _run("your_own_backbone.py", ["--strategy", strategy, *FAST], env, tmp_path)
    assert re.search(r"task 2/2 \(task1\): A→V R@1/5/10 [\d.]+/[\d.]+/[\d.]+", out), out
    assert re.search(rf"{strategy} v2a R@1 average accuracy: \d+\.\d\d", out)


# ------------------------------------------------------------------ your own data: the README's commands
def _write_clip(root: Path, key: str, seed: int) -> None:
    """A 10 s VGGSound clip as the loaders read it: 80 frames (8 fps) and a 16 kHz wav."""
    import wave

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    frames = root / "vggsound" / "data" / "frames" / key
    frames.mkdir(parents=True, exist_ok=True)
    base = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    for i in range(80):
        Image.fromarray(base).save(frames / f"frame_{i}.jpg")
    (root / "vggsound" / "data" / "audio").mkdir(parents=True, exist_ok=True)
    with wave.open(str(root / "vggsound" / "data" / "audio" / f"{key}.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((rng.standard_normal(160000) * 3000).astype(np.int16).tobytes())


def _vggsound_files(where: Path) -> Path:
    """The files a VGGSound user has: CAV-MAE json lists, the label table and the media under DATA.
    Two classes per task of the paper's split (the second one stays outside the stream: stages 1-2)."""
    import csv
    import json

    from stella_avalanche.benchmarks.splits import vggsound_clip_key
    from stella_avalanche.resources import split_table

    by_task: dict[str, list[str]] = {}
    with split_table("vggsound_categories.csv").open(encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            by_task.setdefault(row["category"], []).append(row["display_name"])
    data = where / "DATA"
    lists: dict[str, list[dict]] = {"train": [], "test": [], "retr": []}
    labels = ["index,mid,display_name"]
    n = 0
    for t, names in enumerate(sorted(by_task.values())):
        for c, name in enumerate(names[:2]):
            mid = f"/m/c{t}_{c}"
            labels.append(f"{len(labels) - 1},{mid},{name.replace(',', '_')}")  # CAV-MAE's table writes commas as underscores
            for split, count in (("train", 2), ("test", 1 - c), ("retr", 1 - c)):
                for _ in range(count):
                    n += 1
                    ytid = f"y{split}{n}"
                    lists[split].append({"video_id": f"{ytid}_{n}", "wav": "x", "video_path": "x", "labels": mid})
                    _write_clip(data, vggsound_clip_key(ytid, n), n)
    for split, name in (("train", "vgg_train_cleaned.json"), ("test", "vgg_test_cleaned.json"),
                        ("retr", "vgg_test_5_per_class_for_retrieval_cleaned.json")):
        (where / name).write_text(json.dumps({"data": lists[split]}))
    (where / "class_labels_indices_vgg.csv").write_text("\n".join(labels) + "\n")
    return data


#: what makes the README's commands fast here (later options win over the README's)
FAST_REAL = {"prepare": ["--classes-per-task", "1", "--quiet"],
             "pretrain": ["--model", "tiny", "--steps", "2", "--batch-size", "2", "--workers", "0", "--device", "cpu"],
             "run": ["--model", "tiny", "--epochs", "1", "--batch-size", "2", "--device", "cpu", "train.eval_batch_size=8",
                     "train.num_workers=0", "checkpoint.every_n_iterations=0", "strategy.params.mem_size=4"]}


def _readme_section_commands(title: str) -> list[list[str]]:
    import shlex

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index(title):]
    block = section[section.index("```bash\n") + 8:]
    block = block[:block.index("```")]
    cmds = []
    for line in block.replace("\\\n", " ").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            cmds.append(shlex.split(line))
    return cmds


def test_your_own_vggsound_data(env, tmp_path):
    """The README's four commands for your own VGGSound, as written, on a few generated clips."""
    data = _vggsound_files(tmp_path)
    cmds = _readme_section_commands("## Run it on your own VGGSound or AudioSet")
    assert [c[0] for c in cmds] == ["stella-prepare", "stella-pretrain", "stella-pretrain", "stella-run"]
    outputs = []
    for argv in cmds:
        name = argv[0].removeprefix("stella-")
        args = [a.replace("DATA", str(data)) for a in argv[1:]] + FAST_REAL[name]
        # bytes: text mode would turn the bars' carriage returns into line breaks
        proc = subprocess.run([sys.executable, "-m", f"stella_avalanche.cli.{name}", *args], cwd=tmp_path, env=env,
                              capture_output=True, timeout=600)
        out, err = proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")
        assert proc.returncode == 0, (argv, out[-3000:], err[-3000:])
        outputs.append(out)
    assert (data / "vgg_unused_cleaned_shrink8.csv").is_file()
    assert (tmp_path / "stage1.pt").is_file() and (tmp_path / "avm.pt").is_file()
    run = outputs[-1]
    assert len(re.findall(r"task \d/8 \(\w+\): A→V R@1/5/10", run)) == 8, run
    # quiet by default: the output folder, one line per task, the table and where the results are
    assert run.startswith("output folder: runs/vggsound-stella-seed0") and "results: runs/vggsound-stella-seed0" in run
    assert run.count("\n") <= 40, run  # lines as `wc -l` counts them; the bars redraw with "\r"
    out_dir = tmp_path / "runs" / "vggsound-stella-seed0"
    import json

    res = json.loads((out_dir / "results.json").read_text())
    assert res["complete"] and res["init"] == {"backbone": "stage1.pt", "avm": "avm.pt"}  # no machine paths
    assert (out_dir / "loss_curve.png").is_file()
