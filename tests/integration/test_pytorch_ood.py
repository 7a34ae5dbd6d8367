"""GROODDetector against the real pytorch-ood (0.4.0): its base classes, exceptions, metrics,
Benchmark and GridSearch. Skipped where pytorch-ood does not import (the main test venv: it
needs torchvision); CI runs it in a second venv (.ci/run)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytorch_ood = pytest.importorskip("pytorch_ood")
sklearn_datasets = pytest.importorskip("sklearn.datasets")

from pytorch_ood.api import (  # noqa: E402
    Detector,
    FeaturesDetector,
    ModelNotSetException,
    RequiresFittingException,
)
from pytorch_ood.detector import Mahalanobis, MaxSoftmax  # noqa: E402
from pytorch_ood.metrics import OODMetrics  # noqa: E402
from pytorch_ood.utils import GridSearch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from grood.integrations.pytorch_ood import GROODDetector  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from pytorch_ood_digits import DigitsBenchmark, digits  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    return digits()


def _loader(x, y, batch_size=64):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def test_is_a_pytorch_ood_features_detector_with_its_exceptions(setup):
    det = GROODDetector(setup["encoder"], head=setup["head"])
    assert isinstance(det, FeaturesDetector) and isinstance(det, Detector)
    with pytest.raises(RequiresFittingException):
        det.predict(setup["test"][0])
    with pytest.raises(ModelNotSetException):
        GROODDetector().fit(_loader(*setup["train"]))
    assert det.to("cpu") is det and det.device == torch.device("cpu")
    assert det.get_hyperparameters() == {"k": 1, "ood_prototype": "mean", "precision": "ieee"}
    det.set_hyperparameters(precision="tf32x3")
    assert det.precision == "tf32x3"


def test_fit_skips_ood_rows_and_equals_fit_features(setup):
    x, y = setup["train"]
    x_ood, y_ood = setup["ood"]
    mixed = _loader(torch.cat([x, x_ood[:50]]), torch.cat([y, y_ood[:50]]))
    det = GROODDetector(setup["encoder"], head=setup["head"]).fit(mixed)
    with torch.no_grad():
        z = setup["encoder"](x)
    same = GROODDetector(head=setup["head"]).fit_features(
        torch.cat([z, setup["encoder"](x_ood[:50]).detach()]), torch.cat([y, y_ood[:50]]))
    test = setup["test"][0]
    assert torch.equal(det.predict(test), same.predict_features(setup["encoder"](test)))
    assert isinstance(det.predict(test), torch.Tensor)


def test_ood_metrics_rank_ood_above_id(setup):
    det = GROODDetector(setup["encoder"], head=setup["head"]).fit(_loader(*setup["train"]))
    metric = OODMetrics()
    for x, y in (setup["test"], setup["ood"]):
        metric.update(det(x), y)
    result = metric.compute()
    assert result["AUROC"] > 0.85, result


def test_benchmark_evaluates_grood_beside_pytorch_ood_detectors(setup):
    bench = DigitsBenchmark(setup)
    train = DataLoader(bench.train_set(), batch_size=64)
    detectors = [GROODDetector(setup["encoder"], head=setup["head"]).fit(train),
                 MaxSoftmax(setup["model"]), Mahalanobis(setup["encoder"]).fit(train)]
    results = bench.evaluate(detectors, loader_kwargs={"batch_size": 128})
    by_name = {r["Detector"]: r for r in results}
    assert set(by_name) == {"GROODDetector", "MaxSoftmax", "Mahalanobis"}
    assert by_name["GROODDetector"]["AUROC"] > 0.85


def test_grid_search_over_k(setup):
    det = GROODDetector(setup["encoder"], head=setup["head"])
    det.hyperparameter_space = {"k": [1, 5, 20]}
    val = _loader(torch.cat([setup["test"][0], setup["ood"][0]]),
                  torch.cat([setup["test"][1], setup["ood"][1]]))
    search = GridSearch(det, fit_loader=_loader(*setup["train"]), val_loader=val)
    best = search.run()
    assert best["k"] in (1, 5, 20) and det.k == best["k"]
    assert len(search.results_) == 3 and det.grood is not None


def test_the_readme_example_runs_as_written(setup):
    """The README's pytorch-ood example, executed with its model and loaders bound to the
    digits setup (``model.features`` / ``model.fc``; OOD test rows labelled -1)."""
    import re

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S)
                 if "pytorch_ood" in b)
    model = torch.nn.Module()
    model.features, model.fc = setup["encoder"], setup["head"]
    test = (torch.cat([setup["test"][0], setup["ood"][0]]),
            torch.cat([setup["test"][1], setup["ood"][1]]))
    ns = {"model": model, "train_loader": _loader(*setup["train"]), "test_loader": _loader(*test)}
    exec(compile(block, "README.md (pytorch-ood example)", "exec"), ns)
    result = ns["metrics"].compute()
    assert result["AUROC"] > 0.8, result
