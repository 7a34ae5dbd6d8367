"""GROOD on a Hugging Face transformers model (a small ViT made from its config, no download):
batches of ``pixel_values`` / ``labels``, logits in a ``ModelOutput``, and the class token read
as the classifier's input, through fit_model, score_model and attach(). Skipped where
transformers does not import; CI runs it in the integration venv (.ci/run)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from grood import GROOD  # noqa: E402

from ._end_to_end import check_attach, check_fit_model_equals_fit  # noqa: E402


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=32,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64, num_labels=3)
    model = transformers.ViTForImageClassification(config).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(60, 1, 16, 16, generator=gen)
    y = torch.arange(60) % 3
    for c in range(3):  # a bright bar per class
        x[y == c, 0, 4 * c, :] += 2.0
    return model, x, y


def test_a_vit_from_transformers_fits_and_scores_on_its_class_token(vit):
    model, x, y = vit
    loader = [{"pixel_values": x[i:i + 20], "labels": y[i:i + 20]} for i in range(0, 60, 20)]
    det = GROOD().fit_model(model, loader, features="classifier:input")
    with torch.no_grad():
        out = model(pixel_values=x, output_hidden_states=True)
        cls = model.vit.layernorm(out.hidden_states[-1])[:, 0]  # what the classifier receives
    # Indexed: the rows the model's logits (inside its ModelOutput) get right.
    scores, preds = check_fit_model_equals_fit(det, model, [{"pixel_values": x}], cls, y,
                                               out.logits)
    # attach(): the model's logits and the detector's scores in one pass (torch.fx cannot
    # trace this model; attach does not need it), and as one graph for compile and export.
    check_attach(det, model, "classifier:input", x, out.logits, scores, preds)
    attached = det.attach(model, features="classifier:input")
    assert torch._dynamo.explain(attached)(x).graph_break_count == 0
    exported = torch.export.export(attached, (x,)).module()(x)
    torch.testing.assert_close(exported[1], scores)
    assert torch.equal(exported[2], preds)
