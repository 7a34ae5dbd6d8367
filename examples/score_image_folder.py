"""Score a folder of images for out-of-distribution samples with your own model.

You bring a model definition (a Python file and a class name), its checkpoint (a state dict)
and a GROOD detector fitted on the model's training set (``GROOD.fit_model(...).save(...)``).
Images are decoded with Pillow, resized, scaled to [0, 1] (and normalised if you say how),
and scored in batches. The CSV lists every image with its score (higher = in-distribution),
the nearest-prototype class, and the images in order from most to least OOD-like. An image
Pillow cannot read stops the run, naming it; with ``--skip-unreadable`` it is left out of the
batch (a batch may end up empty) and listed in the CSV without a score.

Run it on generated images and a small digits model first:

    python examples/score_image_folder.py --make-demo demo-assets
    python examples/score_image_folder.py demo-assets/images \\
        --model-def examples/digits_model.py:TinyDigitsNet --checkpoint demo-assets/model.pt \\
        --detector demo-assets/detector.safetensors --features relu3 --size 8 --grayscale \\
        --out demo-assets/scores.csv
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from grood import GROOD
from grood.errors import require

Image = require("PIL.Image", extra="images", purpose="reading image files")

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class ImageFolder(Dataset):
    """Images of one folder (sorted by name), as float tensors [C, size, size] in [0, 1]."""

    def __init__(self, folder: Path, size: int, grayscale: bool,
                 mean: list[float] | None = None, std: list[float] | None = None,
                 skip_unreadable: bool = False) -> None:
        self.paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES)
        if not self.paths:
            raise SystemExit(f"no images ({', '.join(sorted(SUFFIXES))}) in {folder}")
        self.size, self.grayscale = size, grayscale
        self.skip_unreadable = skip_unreadable
        self.unreadable: list[int] = []  # positions of the images left out (skip_unreadable)
        self.mean = None if mean is None else torch.tensor(mean)[:, None, None]
        self.std = None if std is None else torch.tensor(std)[:, None, None]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor | None:
        """Image ``i``; None for one Pillow cannot read, with ``skip_unreadable``."""
        try:
            with Image.open(self.paths[i]) as img:
                img = img.convert("L" if self.grayscale else "RGB")
                img = img.resize((self.size, self.size), Image.Resampling.BILINEAR)
                x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
        except OSError as exc:  # a truncated file's error ("Truncated File Read") names none
            if self.skip_unreadable:
                self.unreadable.append(i)
                return None
            raise OSError(f"{self.paths[i]}: cannot read this image ({exc}); remove or "
                          "replace it, or pass --skip-unreadable") from exc
        x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x

    def collate(self, images: list[torch.Tensor | None]) -> torch.Tensor:
        """The batch of the images read (0 of them: an empty batch, which grood skips)."""
        kept = [x for x in images if x is not None]
        if not kept:
            return torch.empty((0, 1 if self.grayscale else 3, self.size, self.size))
        return torch.stack(kept)


def load_model(spec: str, checkpoint: Path) -> torch.nn.Module:
    """``path/to/file.py:ClassName`` instantiated and loaded from a state-dict checkpoint."""
    path, _, name = spec.partition(":")
    if not name:
        raise SystemExit("--model-def must look like path/to/file.py:ClassName")
    module_spec = importlib.util.spec_from_file_location("user_model", path)
    if module_spec is None or module_spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    model = getattr(module, name)()
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def make_demo(folder: Path) -> None:
    """Train the small digits model briefly, fit and save a detector, write test images."""
    from grood.demo import DemoConfig, load_digit_sets, train_classifier

    sys.path.insert(0, str(Path(__file__).parent))
    from digits_model import TinyDigitsNet

    folder.mkdir(parents=True, exist_ok=True)
    print(f"training a small digits model and fitting a detector into {folder} "
          "(about 10-30 s on a laptop CPU) ...", file=sys.stderr, flush=True)
    cfg = DemoConfig(epochs=20, progress=None)
    sets = load_digit_sets(cfg)
    x, y = sets["train"]
    net = train_classifier(x, y, cfg)
    model = TinyDigitsNet()
    model.load_state_dict(net.state_dict())
    torch.save(model.state_dict(), folder / "model.pt")
    GROOD(progress=False).fit_model(model, DataLoader(list(zip(x, y, strict=True)),
                                                      batch_size=64),
                                    features="relu3").save(folder / "detector.safetensors")
    images = folder / "images"
    images.mkdir(exist_ok=True)
    # One test image of each known digit 0-5 (named by its digit), six unseen digits 6-9 and
    # six noise images.
    id_x, id_y = sets["digits 0-5 (ID test)"]
    named = {f"digit-{c}": id_x[int((id_y == c).nonzero()[0])] for c in range(6)}
    named.update({f"unseen-digit-{i}": img
                  for i, img in enumerate(sets["digits 6-9 (near-OOD)"][0][:6])})
    named.update({f"noise-{i}": img for i, img in enumerate(sets["noise (far-OOD)"][0][:6])})
    for name, img in named.items():
        pixels = (img[0].clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels, mode="L").resize((32, 32), Image.Resampling.NEAREST).save(
            images / f"{name}.png")
    print(f"wrote {folder / 'model.pt'}, {folder / 'detector.safetensors'} and "
          f"{len(named)} images in {images}\nnext, score them:\n"
          f"  python {Path(__file__).as_posix()} {images} "
          f"--model-def {(Path(__file__).parent / 'digits_model.py').as_posix()}:TinyDigitsNet "
          f"--checkpoint {folder / 'model.pt'} --detector {folder / 'detector.safetensors'} "
          f"--features relu3 --size 8 --grayscale --out {folder / 'scores.csv'}")


def check_normalisation(parser: argparse.ArgumentParser, mean: list[float] | None,
                        std: list[float] | None, channels: int) -> None:
    """--mean and --std together, one value or one per input channel each, std > 0 (a mean of
    two values on a grayscale image made two channels of it)."""
    if (mean is None) != (std is None):
        parser.error("--mean and --std go together (the image is normalised by both)")
    for name, values in (("--mean", mean), ("--std", std)):
        if values is not None and len(values) not in (1, channels):
            takes = ("one value (one input channel with --grayscale)" if channels == 1 else
                     f"one value or {channels} (one per input channel)")
            parser.error(f"{name} takes {takes}, got {len(values)}")
    if std is not None and not all(v > 0 for v in std):
        parser.error(f"--std values must be > 0, got {std}")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (a batch of 0 images, or a 0-pixel input, is no run)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="?", type=Path, help="folder of images to score")
    parser.add_argument("--model-def", help="path/to/model.py:ClassName")
    parser.add_argument("--checkpoint", type=Path, help="the model's state dict (torch.save)")
    parser.add_argument("--detector", type=Path, help="GROOD detector (.safetensors)")
    parser.add_argument("--features", help="name of the penultimate module (default: the "
                        "model's return_feature_list output)")
    parser.add_argument("--size", type=positive_int, default=224, help="input size (square)")
    parser.add_argument("--grayscale", action="store_true", help="one input channel")
    parser.add_argument("--mean", type=float, nargs="+", help="per-channel normalisation mean")
    parser.add_argument("--std", type=float, nargs="+", help="per-channel normalisation std")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--out", type=Path, default=Path("scores.csv"))
    parser.add_argument("--skip-unreadable", action="store_true",
                        help="leave out images Pillow cannot read (listed in the CSV without "
                        "a score) instead of stopping")
    parser.add_argument("--make-demo", type=Path, metavar="DIR",
                        help="write a small model, detector and images to DIR, then stop")
    args = parser.parse_args(argv)
    if args.make_demo:
        make_demo(args.make_demo)
        return 0
    if not (args.images and args.model_def and args.checkpoint and args.detector):
        parser.error("images, --model-def, --checkpoint and --detector are required")
    check_normalisation(parser, args.mean, args.std, 1 if args.grayscale else 3)
    model = load_model(args.model_def, args.checkpoint)
    detector = GROOD.load(args.detector)
    data = ImageFolder(args.images, args.size, args.grayscale, args.mean, args.std,
                       skip_unreadable=args.skip_unreadable)
    # (one process reads the images: the list of those left out is the dataset's own)
    loader = DataLoader(data, batch_size=args.batch_size, collate_fn=data.collate)
    scores, preds = detector.score_model(model, loader, features=args.features)
    skipped = set(data.unreadable)
    read = [i for i in range(len(data)) if i not in skipped]
    if not read:
        raise SystemExit(f"none of the {len(data)} images could be read")
    order = torch.argsort(scores)  # most OOD-like first
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    row = {i: (f"{s:.6g}", p, r) for i, s, p, r in zip(read, scores.tolist(), preds.tolist(),
                                                       rank.tolist(), strict=True)}
    with open(args.out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "score", "pred", "ood_rank"])
        for i, path in enumerate(data.paths):
            writer.writerow([path.name, *row.get(i, ("", "", ""))])
    left_out = (f" ({len(skipped)} unreadable, left out: "
                + ", ".join(data.paths[i].name for i in sorted(skipped)) + ")" if skipped else "")
    print(f"scored {len(read)} images{left_out}; most OOD-like: "
          + ", ".join(data.paths[read[i]].name for i in order[:5].tolist())
          + f"; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
