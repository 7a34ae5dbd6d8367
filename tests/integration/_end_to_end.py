"""The end-to-end check the model integrations share: a detector from ``fit_model`` equals one
fitted on the features recomputed from the model's parts."""

from __future__ import annotations

import copy

import torch

from grood import GROOD


def check_fit_model_equals_fit(det, model, batches, feats, y, logits):
    """``det`` (from ``fit_model(model, ..., features=...)``) against ``GROOD().fit(feats, y,
    logits=logits)``: prototypes, the index (the rows the model's logits get right), and the
    scores and predictions of ``score_model(model, batches)``. Returns those scores and
    predictions."""
    ref = GROOD().fit(feats, y, logits=logits)
    torch.testing.assert_close(det.class_prototypes_, ref.class_prototypes_)
    assert det.index_.ntotal == ref.index_.ntotal == int((logits.argmax(1) == y).sum())
    scores, preds = det.score_model(model, batches)
    torch.testing.assert_close(scores, ref.score_samples(feats))
    assert torch.equal(preds, ref.predict(feats))
    return scores, preds


def check_attach(det, model, features, x, logits, scores, preds):
    """``det.attach(model, features)`` gives the model's logits and the detector's scores and
    predictions in one pass; calibrated (on the images mirrored: not the training rows),
    ``flags=True`` adds the detector's ``is_ood``."""
    att_logits, att_scores, att_preds = det.attach(model, features=features)(x)
    torch.testing.assert_close(att_logits, logits)
    torch.testing.assert_close(att_scores, scores)
    assert torch.equal(att_preds, preds)
    det = copy.deepcopy(det).calibrate_model(model, [x.flip(-1)], tpr=0.9)
    *_, att_flags = det.attach(model, features=features, flags=True)(x)
    assert torch.equal(att_flags, det.score_model(model, [x])[0] < det.threshold_)
