"""grood's baselines against pytorch-ood's (0.4.0) implementations of the same methods, on one
classifier's features and logits: ViM, ReAct, GradNorm, ASH, RMD, MaxLogit, Energy, GEN,
KLM, SHE, DICE, fDBD, SCALE, NNGuide and TempScale, and ODIN and RankFeat through a small
image model.
pytorch-ood computes in float32 and scores outliers higher; grood scores in-distribution
samples higher. Skipped where pytorch-ood does not import (the main test venv); CI runs it in
a second venv."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytorch_ood")

from pytorch_ood.detector import (
    ASH,
    DICE,
    ODIN,
    RMD,
    SCALE,
    SHE,
    EnergyBased,
    GradNorm,
    KLMatching,
    MaxLogit,
    NNGuide,
    RankFeat,
    ReAct,
    TemperatureScaling,
    ViM,
    fDBD,
)
from pytorch_ood.detector import GEN as PoodGEN

import grood


@pytest.fixture(scope="module")
def layer():
    """Post-ReLU training and test features of width 48 and a 7-class last layer."""
    gen = torch.Generator().manual_seed(0)
    train = torch.relu(torch.randn(900, 48, generator=gen)) + 0.2 * torch.rand(48, generator=gen)
    test = torch.relu(torch.randn(60, 48, generator=gen)) * torch.linspace(0.5, 2, 60)[:, None]
    fc = torch.nn.Linear(48, 7)
    with torch.no_grad():
        fc.weight.copy_(torch.randn(7, 48, generator=gen) * 0.4)
        fc.bias.copy_(torch.randn(7, generator=gen))
    return train, test, fc


def test_vim_equals_pytorch_oods(layer):
    train, test, fc = layer
    theirs = ViM(None, d=20, w=fc.weight, b=fc.bias)
    theirs.fit_features(train, torch.zeros(len(train), dtype=torch.long))
    for ours in (grood.ViM(dim=20).fit(train, weight=fc.weight, bias=fc.bias),
                 grood.ViM(dim=20).fit(train, logits=fc(train).detach())):
        assert ours.alpha_ == pytest.approx(theirs.alpha, rel=1e-4)
        torch.testing.assert_close(ours.score_samples(test), -theirs.predict_features(test),
                                   rtol=1e-4, atol=1e-4)


def test_react_equals_pytorch_oods(layer):
    train, test, fc = layer
    theirs = ReAct(None, fc, percentile=0.9).fit_feature_maps(
        train, torch.zeros(len(train), dtype=torch.long))
    ours = grood.ReAct(percentile=90).fit(train, weight=fc.weight, bias=fc.bias)
    # np.percentile of every entry, both (in the features' dtype: numpy 1 gives float64)
    assert ours.clip_ == float(torch.tensor(theirs.threshold, dtype=torch.float32))
    torch.testing.assert_close(ours.score_samples(test), -theirs.predict_feature_maps(test),
                               rtol=1e-5, atol=1e-5)


def test_logit_baselines_equal_pytorch_oods(layer):
    _, test, fc = layer
    logits = fc(test).detach()
    torch.testing.assert_close(grood.MaxLogit().fit(logits).score_samples(logits),
                               -MaxLogit.score(logits))
    torch.testing.assert_close(grood.Energy().fit(logits).score_samples(logits),
                               -EnergyBased.score(logits))
    # pytorch-ood's GEN averages the M terms where the paper sums them, and clamps each
    # probability to [1e-7, 1 - 1e-7] (none of these logits' reach the clamp)
    p = logits.softmax(1)
    assert float(p.min()) > 1e-7 and float(p.max()) < 1 - 1e-7
    torch.testing.assert_close(grood.GEN(gamma=0.1, M=5).fit(logits).score_samples(logits),
                               -5 * PoodGEN.score(logits, gamma=0.1, M=5), rtol=1e-5,
                               atol=1e-6)


def test_gradnorm_equals_pytorch_oods_per_sample_gradients(layer):
    """pytorch-ood differentiates per sample (torch.func) a cross-entropy averaged over the
    classes, where GradNorm's code sums it: C times its norm is grood's closed form."""
    train, test, fc = layer
    theirs = GradNorm(fc, param_filter=lambda name: name == "weight")
    for t in (1.0, 2.0):
        theirs.temperature = t
        ours = grood.GradNorm(temperature=t).fit(train, weight=fc.weight, bias=fc.bias)
        torch.testing.assert_close(ours.score_samples(test), -7 * theirs.predict(test),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["s", "b", "p"])
def test_ash_equals_pytorch_oods(layer, variant):
    """On feature maps of 48 x 1 x 1 (pooled features), pruned at the 90th percentile."""
    train, test, fc = layer
    theirs = ASH(None, lambda maps: fc(maps.flatten(1)), variant=f"ash-{variant}",
                 percentile=0.9)
    ours = grood.ASH(percentile=90, variant=variant).fit(train, weight=fc.weight, bias=fc.bias)
    torch.testing.assert_close(ours.score_samples(test),
                               -theirs.predict_feature_maps(test[:, :, None, None]),
                               rtol=1e-5, atol=1e-5)


def test_rmd_equals_pytorch_oods(layer):
    """pytorch-ood's covariances are sums of outer products (not divided by the N rows,
    with a 1e-6 ridge), so its relative distances are grood's over N."""
    train, test, fc = layer
    labels = fc(train).argmax(1)
    assert len(labels.unique()) == 7
    theirs = RMD(None).fit_features(train, labels)
    ours = grood.RMD().fit(train, labels)
    torch.testing.assert_close(ours.score_samples(test),
                               -len(train) * theirs.predict_features(test), rtol=1e-4,
                               atol=1e-3)


def test_klm_equals_pytorch_oods(layer):
    """Both take the nearest of the typical softmaxes (pytorch-ood with log 0 replaced by
    the lowest float; none of these underflows)."""
    train, test, fc = layer
    train_logits, test_logits = fc(train).detach(), fc(test).detach() * 1.5
    theirs = KLMatching(None).fit_logits(train_logits)
    ours = grood.KLM().fit(train_logits)
    assert len(theirs.dists) == len(ours.template_classes_) == 7
    torch.testing.assert_close(ours.score_samples(test_logits),
                               -theirs.predict_logits(test_logits), rtol=1e-4, atol=1e-6)


def test_she_equals_pytorch_oods(layer):
    train, test, fc = layer
    labels = fc(train).argmax(1)
    labels[::9] = (labels[::9] + 1) % 7  # (misclassified rows, which both leave out)
    theirs = SHE(None, fc).fit_features(train, labels)
    for ours in (grood.SHE().fit(train, labels, weight=fc.weight, bias=fc.bias),
                 grood.SHE().fit(train, labels, logits=fc(train).detach())):
        torch.testing.assert_close(ours.score_samples(test), -theirs.predict_features(test),
                                   rtol=1e-5, atol=1e-5)


def test_dice_equals_pytorch_oods(layer):
    """pytorch-ood's p is the fraction dropped (grood's percentile / 100)."""
    train, test, fc = layer
    theirs = DICE(None, fc.weight, fc.bias, p=0.9).fit_features(
        train, torch.zeros(len(train), dtype=torch.long))
    ours = grood.DICE(percentile=90).fit(train, weight=fc.weight, bias=fc.bias)
    assert ours.threshold_ == pytest.approx(theirs.threshold, rel=1e-5)
    assert torch.equal(ours.masked_weight_ != 0, theirs.masked_w != 0)
    torch.testing.assert_close(ours.score_samples(test), -theirs.predict_features(test),
                               rtol=1e-5, atol=1e-5)


def test_fdbd_equals_pytorch_oods(layer):
    train, test, fc = layer
    theirs = fDBD(None, fc).fit_features(train)
    ours = grood.FDBD().fit(train, weight=fc.weight, bias=fc.bias)
    torch.testing.assert_close(ours.score_samples(test), -theirs.predict_features(test),
                               rtol=1e-5, atol=1e-6)


def test_scale_equals_pytorch_oods(layer):
    """On feature maps of 48 x 1 x 1 (pooled features); pytorch-ood's percentile is a
    fraction."""
    train, test, fc = layer
    theirs = SCALE(None, lambda maps: fc(maps.flatten(1)), percentile=0.85)
    ours = grood.SCALE(percentile=85).fit(train, weight=fc.weight, bias=fc.bias)
    torch.testing.assert_close(ours.score_samples(test),
                               -theirs.predict_feature_maps(test[:, :, None, None]),
                               rtol=1e-5, atol=1e-5)


def test_nnguide_equals_pytorch_oods(layer):
    """Both with the whole training set as the bank."""
    train, test, fc = layer
    theirs = NNGuide(None, fc, k=10).fit_features(train, torch.zeros(len(train),
                                                                      dtype=torch.long))
    ours = grood.NNGuide(k=10, bank_fraction=1.0).fit(train, weight=fc.weight, bias=fc.bias)
    torch.testing.assert_close(ours.score_samples(test), -theirs.predict_features(test),
                               rtol=1e-5, atol=1e-5)


def test_odin_equals_pytorch_oods():
    # a smooth image model (no input element with a gradient of exactly 0, which the
    # two count alike anyway: both take its sign, 0), per-channel std, three settings
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6), torch.nn.Tanh(),
        torch.nn.Flatten(), torch.nn.Linear(6 * 5 * 5, 10)).eval()
    x = torch.rand(24, 3, 7, 7)
    std = [0.229, 0.224, 0.225]
    for t, eps in ((1000.0, 0.0014), (10.0, 0.01), (1.0, 0.05)):
        theirs = ODIN(net, eps=eps, temperature=t, norm_std=std).predict(x)
        ours, _ = grood.ODIN(temperature=t, noise=eps, input_std=std).score_inputs(net, x)
        torch.testing.assert_close(ours, -theirs, rtol=2e-6, atol=0)


def test_rankfeat_equals_pytorch_oods():
    from collections import OrderedDict

    from grood.extract import split_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(OrderedDict([
        ("stem", torch.nn.Conv2d(3, 8, 3)), ("bn", torch.nn.BatchNorm2d(8)),
        ("act", torch.nn.ReLU()), ("layer4", torch.nn.Conv2d(8, 16, 3)),
        ("pool", torch.nn.AdaptiveAvgPool2d(1)), ("flat", torch.nn.Flatten()),
        ("fc", torch.nn.Linear(16, 10))])).eval()
    x = torch.rand(24, 3, 9, 8)
    stem, tail = split_model(net, "layer4")
    theirs = RankFeat(backbone=stem, head=tail).predict(x)
    ours, _ = grood.RankFeat(layers="layer4").score_inputs(net, x)
    torch.testing.assert_close(ours, -theirs, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # (and the removal matters here)
        assert not torch.allclose(ours, torch.logsumexp(net(x), 1), rtol=1e-3)


def test_tempscale_scores_as_pytorch_oods_and_fits_its_optimum():
    # pytorch-ood fits T by 50 L-BFGS steps of lr 0.01 from T = 1, which stop short of the
    # optimum here (T = 1.17 where it lies at 1.96); grood's T has the least NLL, and at the
    # same T the two score alike
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(500, 7, generator=gen) * 3
    y = (z + 3 * torch.randn(500, 7, generator=gen)).argmax(1)
    theirs = TemperatureScaling(None).fit_logits(z, y)
    ours = grood.TempScale().fit(z, y)

    def nll(t):
        return float(torch.nn.functional.cross_entropy(z.double() / float(t), y))

    assert ours.nll_ == pytest.approx(nll(ours.temperature_), rel=1e-9)
    assert ours.nll_ < nll(theirs.t.detach()) - 1e-3  # (a parameter: T without its grad)
    with torch.no_grad():
        theirs.t.fill_(ours.temperature_)
    torch.testing.assert_close(ours.score_samples(z), -theirs.predict_logits(z), rtol=1e-5,
                               atol=1e-7)
