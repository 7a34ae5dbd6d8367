"""The README's Python examples run as written, on small data and a small ResNet-shaped model.

Each ```python block that needs only data and a model (not pytorch-ood, OpenOOD or a GPU) is
executed with the names it leaves to the reader (``train_features``, ``model``, ...) bound to
real objects, so an example that drifts from the API fails here.
"""

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import clustered_features
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
# What a block needs that the test environment does not give it.
NEEDS = {"pytorch_ood": "pytorch-ood (tests/integration runs it)",
         "capture_cuda_graph": "a CUDA device"}


class SmallResNet(nn.Module):
    """The module names the examples use: layer3, avgpool, fc."""

    def __init__(self, n_classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.layer3 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, n_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.layer3(self.stem(x))), 1))


def _namespace():
    x, y = clustered_features(120, 3, 16, seed=0, dtype=torch.float32)
    test, test_y = clustered_features(40, 3, 16, seed=1, spread=0.5, dtype=torch.float32)
    val, _ = clustered_features(30, 3, 16, seed=2, spread=0.5, dtype=torch.float32)
    logits = torch.nn.functional.one_hot(y, 3).float() * 3
    gen = torch.Generator().manual_seed(3)
    model = SmallResNet().eval()
    images = torch.rand(48, 1, 8, 8, generator=gen)
    labels = torch.randint(0, 3, (48,), generator=gen)
    loader = DataLoader(TensorDataset(images, labels), batch_size=16)
    return {
        "train_features": x.numpy(), "train_labels": y.numpy(), "train_logits": logits.numpy(),
        "test_features": test.numpy(), "val_features": val.numpy(),
        "test_labels": test_y.numpy(),
        "c100_features": (val + 1.5 * torch.randn(30, 16, generator=gen)).numpy(),
        "svhn_features": (4 * torch.rand(30, 16, generator=gen)).numpy(),
        "scores_id": np.linspace(0.0, 1.0, 30),
        "scores_ood": np.linspace(-1.0, 0.5, 20), "model": model, "resnet": model,
        "train_loader": loader, "test_loader": loader, "images": images[:4],
        "c100_loader": DataLoader(TensorDataset(torch.rand(32, 1, 8, 8, generator=gen) * 2,
                                                labels[:32]), batch_size=16),
        "torch": torch,
    }


def _openood_namespace():
    """An OpenOOD-style net (``forward(x, return_feature_list=True)``), its config and the
    loader dicts, as OpenOOD's evaluator passes them."""
    import types

    from conftest import DictDataset
    from test_integrations import _images, _trained_net

    def loader(n, seed, ood=False):
        return DataLoader(DictDataset(*_images(n, seed, ood)), batch_size=16)

    args = types.SimpleNamespace(postprocessor_args={})
    return {"config": types.SimpleNamespace(postprocessor=args), "net": _trained_net(),
            "id_loader_dict": {"train": loader(120, 0), "test": loader(40, 2)},
            "ood_loader_dict": {"val": loader(30, 3, True),
                                "near": {"ssb_hard": loader(40, 4, True)}}}


def _runnable():
    out = []
    for i, block in enumerate(BLOCKS):
        missing = [why for name, why in NEEDS.items() if name in block]
        out.append(pytest.param(i, block, id=f"block{i + 1}", marks=pytest.mark.skip(
            reason=f"needs {missing[0]}")) if missing else pytest.param(i, block,
                                                                        id=f"block{i + 1}"))
    return out


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize(("index", "block"), _runnable())
def test_readme_example_runs(index, block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that save write here
    ns = _namespace()
    if "openood" in block:
        pytest.importorskip("faiss")  # the reference mode's IVF index
        ns.update(_openood_namespace())
    if ".plot(" in block:  # grood[plots]
        pytest.importorskip("matplotlib")
    if "export_onnx" in block:  # grood[onnx]: the exporter and the file's check
        pytest.importorskip("onnxscript")
        pytest.importorskip("onnxruntime")
    if "det = " not in block and "det." in block:  # continues the first example's detector
        from grood import GROOD

        model = ns["model"]
        with torch.no_grad():  # the attached model's penultimate features (avgpool, 8 wide)
            feats = model.avgpool(model.layer3(model.stem(
                torch.rand(120, 1, 8, 8, generator=torch.Generator().manual_seed(4))))).flatten(1)
        ns["features"], ns["val_features"] = feats[:8], feats[90:]
        with warnings.catch_warnings():  # an untrained model's features: labels they miss
            warnings.filterwarnings("ignore", "the nearest class prototype classifies")
            ns["det"] = GROOD().fit(feats[:90], torch.arange(90) % 3)
    exec(compile(block, f"README.md block {index + 1}", "exec"), ns)


def test_contents_lists_every_section_with_its_anchor():
    """The Contents line links each ``##`` section by GitHub's anchor for its title."""
    text = (ROOT / "README.md").read_text()
    heads = re.findall(r"^## (.+)$", text, flags=re.M)
    start = text.index("Contents: ")
    contents = text[start:text.index("\n\n", start)]
    links = re.findall(r"\[([^\]]+)\]\(#([^)]+)\)", contents)
    anchors = [re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads]
    assert links == list(zip(heads, anchors, strict=True))


def test_results_contents_lists_every_section_with_its_anchor():
    """bench/RESULTS.md opens with a list linking each of its ``##`` sections, in order, by
    GitHub's anchor for its title."""
    text = (ROOT / "bench" / "RESULTS.md").read_text()
    heads = re.findall(r"^## (.+)$", text, flags=re.M)
    start = text.index("Contents, ")
    contents = text[start:text.index("\n## ", start)]
    links = re.findall(r"^- \[(.+)\]\(#([^)]+)\)$", contents, flags=re.M)
    anchors = [re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads]
    assert links == list(zip(heads, anchors, strict=True))
