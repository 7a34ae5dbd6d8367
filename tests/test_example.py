"""The image-folder example runs end to end on generated images and a small model."""

import csv
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "score_image_folder.py"


@pytest.mark.slow
def test_score_image_folder_example(tmp_path):
    run = [sys.executable, str(SCRIPT)]
    made = subprocess.run([*run, "--make-demo", str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert made.returncode == 0, made.stderr
    out = tmp_path / "scores.csv"
    # The command --make-demo prints as the next step is the one that scores the images.
    next_cmd = shlex.split(made.stdout.split("next, score them:")[1].strip())
    assert next_cmd[0] == "python" and next_cmd[-1] == str(out)
    scored = subprocess.run([sys.executable, *next_cmd[1:]], capture_output=True, text=True,
                            timeout=300)
    assert scored.returncode == 0, scored.stderr
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert len(rows) == 18
    score = {r["file"]: float(r["score"]) for r in rows}
    digits = [v for k, v in score.items() if k.startswith("digit-")]
    noise = [v for k, v in score.items() if k.startswith("noise-")]
    assert min(digits) > max(noise)  # every noise image is more OOD-like than every digit
    # digit-c.png shows the digit c: the detector's nearest prototype says so.
    assert {r["file"]: int(r["pred"]) for r in rows if r["file"].startswith("digit-")} == {
        f"digit-{c}.png": c for c in range(6)}
    assert sorted(int(r["ood_rank"]) for r in rows) == list(range(18))
    # Unreadable files stop the run, naming one; --skip-unreadable lists them without a score.
    # Sorted first and two to a batch, they make the first batch empty.
    images = Path(next_cmd[2])
    (images / "aa-broken.png").write_bytes(b"not an image")
    (images / "ab-broken.jpg").write_bytes((images / "digit-0.png").read_bytes()[:40])
    small = [*next_cmd[1:], "--batch-size", "2"]
    stopped = subprocess.run([sys.executable, *small], capture_output=True, text=True,
                             timeout=300)
    assert stopped.returncode != 0 and "aa-broken.png: cannot read this image" in stopped.stderr
    skipped = subprocess.run([sys.executable, *small, "--skip-unreadable"], capture_output=True,
                             text=True, timeout=300)
    assert skipped.returncode == 0, skipped.stderr
    assert "scored 18 images (2 unreadable, left out: aa-broken.png, ab-broken.jpg)" in \
        skipped.stdout
    again = list(csv.DictReader(out.read_text().splitlines()))
    assert [r["file"] for r in again[:2]] == ["aa-broken.png", "ab-broken.jpg"]
    assert all(r["score"] == r["pred"] == r["ood_rank"] == "" for r in again[:2])
    assert {r["file"]: float(r["score"]) for r in again[2:]} == pytest.approx(score, rel=1e-5)
    assert sorted(int(r["ood_rank"]) for r in again[2:]) == list(range(18))


@pytest.mark.parametrize("flags, message", [
    (["--grayscale", "--mean", "0.5", "0.5", "--std", "0.2", "0.2"],
     "--mean takes one value (one input channel with --grayscale), got 2"),
    (["--mean", "0.5", "0.4", "0.3", "--std", "0.2", "0.2"],
     "--std takes one value or 3 (one per input channel), got 2"),
    (["--mean", "0.5"], "--mean and --std go together"),
    (["--std", "0.5"], "--mean and --std go together"),  # it was ignored
    (["--mean", "0.5", "--std", "0"], "--std values must be > 0"),
    (["--batch-size", "0"], "--batch-size: expected an integer >= 1, got 0"),
    (["--size", "-3"], "--size: expected an integer >= 1, got -3"),
])
def test_score_image_folder_checks_its_flags(tmp_path, flags, message, capsys):
    """A two-value mean on a grayscale image made two channels of it; --std alone was ignored
    and --mean alone failed dividing by None; --batch-size 0 failed inside torch's DataLoader.
    Refused before anything is read (in this process: the script's own run is above)."""
    pytest.importorskip("PIL")  # the example reads images with Pillow (grood[images])
    with pytest.raises(SystemExit) as exc:
        _example().main([str(tmp_path), "--model-def", "m.py:M", "--checkpoint", "m.pt",
                         "--detector", "d.safetensors", *flags])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err, err


def _example():
    """The example script as a module (it runs nothing on import)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("score_image_folder", SCRIPT)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def test_an_unreadable_image_is_named(tmp_path):
    """A truncated JPEG failed with Pillow's "Truncated File Read", naming no file."""
    import numpy as np

    Image = pytest.importorskip("PIL.Image")
    example = _example()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8) + 90).save(tmp_path / "a.jpg")
    whole = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "b.jpg").write_bytes(whole[:len(whole) // 2])
    (tmp_path / "c.png").write_bytes(b"not an image")
    data = example.ImageFolder(tmp_path, 8, grayscale=False)
    assert tuple(data[0].shape) == (3, 8, 8)
    for i, name in ((1, "b.jpg"), (2, "c.png")):
        with pytest.raises(OSError, match=f"{name}: cannot read this image"):
            data[i]
