"""GROOD on a timm ViT (made from its constructor, no download): the class token read as the
head's input (``head:input``) through fit_model, score_model and attach(), against timm's own
``forward_head(..., pre_logits=True)``. Skipped where timm does not import; CI runs it in the
integration venv (.ci/run)."""

from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

from grood import GROOD  # noqa: E402

from ._end_to_end import check_attach, check_fit_model_equals_fit  # noqa: E402


@pytest.mark.filterwarnings("ignore:the logits classify")  # an untrained model
def test_a_timm_vit_scores_on_what_its_head_receives():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3,
                              img_size=32, patch_size=8).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(30, 3, 32, 32, generator=gen)
    y = torch.arange(30) % 3
    det = GROOD().fit_model(model, [(x[:15], y[:15]), (x[15:], y[15:])], features="head:input")
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        logits = model(x)
    scores, preds = check_fit_model_equals_fit(det, model, [x], feats, y, logits)
    check_attach(det, model, "head:input", x, logits, scores, preds)
