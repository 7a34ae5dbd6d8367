"""GROOD on torchvision's own models (made from their constructors, no download): a
VisionTransformer, whose penultimate feature is the class token it selects by slicing (read as
``heads.head:input``), and a ResNet (``avgpool``), through fit_model, score_model and
attach(), and RankFeat at a ResNet's last two blocks. Skipped where torchvision does not
import (beside the CPU build of torch); CI runs it in the integration venv (.ci/run)."""

from __future__ import annotations

import pytest
import torch

models = pytest.importorskip("torchvision.models")

from grood import GROOD  # noqa: E402

from ._end_to_end import check_attach, check_fit_model_equals_fit  # noqa: E402


def _images(n=48, size=16):
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, size, size, generator=gen)
    y = torch.arange(n) % 3
    for c in range(3):  # a bright bar per class
        x[y == c, :, 4 * c, :] += 2.0
    return x, y


def _vit():
    torch.manual_seed(0)
    return models.VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2,
                                    hidden_dim=16, mlp_dim=32, num_classes=3).eval()


def _class_token(vit, x):
    """What the ViT's head receives, recomputed from its parts (torchvision's forward)."""
    tokens = vit._process_input(x)
    cls = vit.class_token.expand(x.shape[0], -1, -1)
    return vit.encoder(torch.cat([cls, tokens], dim=1))[:, 0]


@pytest.mark.filterwarnings("ignore:the logits classify")  # an untrained model
@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_torchvision_models_fit_score_and_attach(kind):
    x, y = _images()
    if kind == "vit":
        model, features = _vit(), "heads.head:input"
        with torch.no_grad():
            feats = _class_token(model, x)
    else:
        torch.manual_seed(0)
        model, features = models.resnet18(num_classes=3).eval(), "avgpool"
        with torch.no_grad():
            feats = torch.flatten(model.avgpool(model.layer4(model.layer3(model.layer2(
                model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x))))))))), 1)
    loader = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 48, 16)]
    det = GROOD().fit_model(model, loader, features=features)
    with torch.no_grad():
        logits = model(x)
    scores, preds = check_fit_model_equals_fit(det, model, [x], feats, y, logits)
    check_attach(det, model, features, x, logits, scores, preds)


def test_rankfeat_at_a_resnets_last_two_blocks_is_openoods_fusion():
    """grood.RankFeat() splits torchvision's resnet18 at layer3 and layer4 by its children and
    gives the energy and class of the mean logits OpenOOD's RankFeat computes from the
    model's parts."""
    from grood import RankFeat

    torch.manual_seed(0)
    net = models.resnet18(num_classes=10).eval()
    x, _ = _images(n=6, size=64)

    def without_rank1(f):
        b, c, h, w = f.shape
        u, s, v = torch.linalg.svd(f.view(b, c, h * w), full_matrices=False)
        return (f.view(b, c, h * w) - s[:, :1, None] * u[:, :, :1] @ v[:, :1, :]).view(f.shape)

    def head(f):
        return net.fc(torch.flatten(net.avgpool(f), 1))

    with torch.no_grad():
        f3 = net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x)))))))
        fused = (head(without_rank1(net.layer4(f3))) + head(net.layer4(without_rank1(f3)))) / 2
    scores, preds = RankFeat().score_inputs(net, x)
    torch.testing.assert_close(scores, torch.logsumexp(fused, 1), rtol=1e-5, atol=1e-5)
    assert torch.equal(preds, fused.argmax(1))
