"""The public API's types, as a type checker sees them and as they come back at run time: a
tensor in gives tensors out, a numpy array in gives numpy arrays out. mypy checks this file
(``pyproject.toml``'s ``[tool.mypy]``; CI runs it), pytest runs it."""

import numpy as np
import torch
from torch import Tensor
from typing_extensions import assert_type

from grood import GROOD, KNN, MSP, Energy, Mahalanobis


class MyDetector(GROOD):
    """A subclass: its fit and calibrate return it, typed as itself."""


def _data() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    centres = 4.0 * torch.eye(3, 5)
    y = torch.arange(60) % 3
    return centres[y] + torch.randn(60, 5, generator=gen), y


def test_a_tensor_in_gives_tensors_out_and_numpy_gives_numpy() -> None:
    x, y = _data()
    det = assert_type(GROOD().fit(x, y), GROOD)  # fit, calibrate and load return the detector
    assert assert_type(det.calibrate(x[:30] + 0.1, tpr=0.9), GROOD) is det
    scores, preds = det.score_and_predict(x)
    assert_type(scores, Tensor)
    assert_type(det.score_samples(x), Tensor)
    assert_type(det.predict(x), Tensor)
    assert_type(det.is_ood(x), Tensor)
    dists, rows = det.kneighbors(x, 2)
    assert_type(dists, Tensor)
    assert all(isinstance(t, Tensor) for t in (scores, preds, det.is_ood(x), dists, rows))
    xn = x.numpy()
    scores_np, preds_np = det.score_and_predict(xn)
    assert_type(scores_np, np.ndarray)
    assert_type(det.score_samples(xn), np.ndarray)
    assert_type(det.predict(xn), np.ndarray)
    assert_type(det.is_ood(xn), np.ndarray)
    dists_np, rows_np = det.kneighbors(xn, 2)
    assert_type(rows_np, np.ndarray)
    assert all(isinstance(a, np.ndarray)
               for a in (scores_np, preds_np, det.is_ood(xn), dists_np, rows_np))


def test_the_baselines_keep_the_input_type_too() -> None:
    x, y = _data()
    logits = -torch.cdist(x, 4.0 * torch.eye(3, 5))
    for feature_baseline in (KNN(k=2).fit(x), Mahalanobis().fit(x, y)):
        assert isinstance(assert_type(feature_baseline.score_samples(x), Tensor), Tensor)
        assert isinstance(assert_type(feature_baseline.score_samples(x.numpy()), np.ndarray),
                          np.ndarray)
    for logit_baseline in (MSP().fit(logits), Energy().fit(logits)):
        assert isinstance(assert_type(logit_baseline.score_samples(logits), Tensor), Tensor)
    # fit returns the baseline's own class
    assert type(assert_type(KNN(k=2).fit(x), KNN)) is KNN
    assert type(assert_type(Mahalanobis().fit(x, y), Mahalanobis)) is Mahalanobis
    assert type(assert_type(MSP().fit(logits), MSP)) is MSP
    assert type(assert_type(Energy().fit(logits), Energy)) is Energy


def test_a_subclass_keeps_its_type_through_fit_and_calibrate(tmp_path) -> None:
    x, y = _data()
    det = assert_type(MyDetector().fit(x, y).calibrate(x[:30] + 0.1), MyDetector)
    assert isinstance(det, MyDetector)
    det.save(tmp_path / "d.safetensors")
    again = assert_type(MyDetector.load(tmp_path / "d.safetensors"), MyDetector)
    assert isinstance(again, MyDetector)
