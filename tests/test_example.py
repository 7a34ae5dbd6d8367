"""The image-folder example runs end to end on generated images and a small model."""

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "score_image_folder.py"


def test_score_image_folder_example(tmp_path):
    run = [sys.executable, str(SCRIPT)]
    made = subprocess.run([*run, "--make-demo", str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert made.returncode == 0, made.stderr
    out = tmp_path / "scores.csv"
    scored = subprocess.run(
        [*run, str(tmp_path / "images"), "--model-def",
         f"{ROOT / 'examples' / 'digits_model.py'}:TinyDigitsNet", "--checkpoint",
         str(tmp_path / "model.pt"), "--detector", str(tmp_path / "detector.safetensors"),
         "--features", "relu3", "--size", "8", "--grayscale", "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert scored.returncode == 0, scored.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 18
    score = {r["file"]: float(r["score"]) for r in rows}
    digits = [v for k, v in score.items() if k.startswith("digit-")]
    noise = [v for k, v in score.items() if k.startswith("noise-")]
    assert min(digits) > max(noise)  # every noise image is more OOD-like than every digit
    assert sorted(int(r["ood_rank"]) for r in rows) == list(range(18))
