"""ODIN and RankFeat, the baselines that score the model's inputs: against float64
row-by-row computations of their definitions, alone and beside GROOD in evaluate_model."""

import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from grood import GROOD, MSP, ODIN, RankFeat, RowsRefusedError, evaluate, evaluate_model


def smooth_net(channels=3, n_classes=5, dtype=torch.float64, seed=0):
    """A small CNN with batch norm (eval mode must use its running statistics)."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(channels, 4, 3), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(),
        nn.Linear(4 * 3 * 4, 8), nn.Tanh(), nn.Linear(8, n_classes)).to(dtype)
    net[1].running_mean.uniform_(-0.2, 0.2)
    net[1].running_var.uniform_(0.5, 2.0)
    return net


def odin_twin(net, x, temperature, noise, std):
    """ODIN of each row on its own, in float64: x - noise * sign(grad of -log softmax(f/T) at
    the row's predicted class) / std, then max softmax(f(x~) / T)."""
    net = net.double().eval()
    scores, preds = [], []
    for row in x.double():
        xi = row[None].clone().requires_grad_(True)
        z = net(xi) / temperature
        loss = F.cross_entropy(z, z.argmax(1))
        (g,) = torch.autograd.grad(loss, xi)
        step = g.sign() / torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
        with torch.no_grad():
            p = torch.softmax(net(xi - noise * step) / temperature, 1)
        scores.append(p.max().item())
        preds.append(p.argmax().item())
    return np.array(scores), np.array(preds)


def test_odin_matches_its_definition_row_by_row_in_float64():
    net = smooth_net()
    x = torch.rand(7, 3, 5, 6, dtype=torch.float64)  # odd sizes
    std = (0.229, 0.224, 0.225)
    for t, noise in ((1000.0, 0.0014), (10.0, 0.05), (1.0, 0.02)):
        scores, preds = ODIN(temperature=t, noise=noise, input_std=std).score_inputs(net, x)
        want, want_pred = odin_twin(net, x, t, noise, std)
        assert scores.dtype == torch.float64
        np.testing.assert_allclose(scores.numpy(), want, rtol=1e-12, atol=0)
        np.testing.assert_array_equal(preds.numpy(), want_pred)
    # a float32 model: float32 scores, to float32 rounding of the same numbers
    s32, _ = ODIN(temperature=10.0, noise=0.05, input_std=std).score_inputs(
        smooth_net(dtype=torch.float32), x.float())
    assert s32.dtype == torch.float32
    twin = smooth_net(dtype=torch.float32).double()  # (the same float32 parameters)
    np.testing.assert_allclose(s32.numpy(), odin_twin(twin, x, 10.0, 0.05, std)[0], rtol=1e-5)


def test_the_step_moves_scores_and_noise_zero_is_msp_at_temperature():
    net = smooth_net()
    x = torch.rand(9, 3, 5, 6, dtype=torch.float64)
    with torch.no_grad():
        logits = net.eval()(x)
    plain, _ = ODIN(temperature=100.0, noise=0.0).score_inputs(net, x)
    np.testing.assert_allclose(plain.numpy(), MSP(temperature=100.0).fit(logits)
                               .score_samples(logits).numpy(), rtol=1e-12)
    moved, _ = ODIN(temperature=100.0, noise=0.01).score_inputs(net, x)
    assert (moved > plain).all()  # a step down the cross-entropy raises the top probability


def test_nothing_given_is_changed():
    net = smooth_net(dtype=torch.float32)
    net.train()
    net[1].eval()  # a mixed state, restored module by module
    x = torch.rand(6, 3, 5, 6)
    before, state = x.clone(), {k: v.clone() for k, v in net.state_dict().items()}
    ODIN(input_std=0.5).score_inputs(net, x)
    assert torch.equal(x, before)
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())  # BN stats too
    assert all(p.grad is None for p in net.parameters())
    assert net.training and not net[1].training and net[0].training


def test_runs_inside_inference_mode_and_leaves_unmoved_what_the_model_ignores():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(10, 4))
    with torch.no_grad():
        net[1].weight[:, 5:] = 0  # the last five inputs change nothing: gradient exactly 0
    x = torch.rand(5, 10)
    odin = ODIN(noise=0.1)
    moved = odin.perturb(net, x)
    assert torch.equal(moved[:, 5:], x[:, 5:]) and not torch.equal(moved[:, :5], x[:, :5])
    still = ODIN(noise=0.0).perturb(net, x)  # no step: a copy all the same
    assert torch.equal(still, x) and still.data_ptr() != x.data_ptr()
    with torch.inference_mode():
        inside, _ = odin.score_inputs(net, x.clone())
    assert torch.equal(inside, odin.score_inputs(net, x)[0])


def test_clear_errors():
    net = smooth_net(dtype=torch.float32)
    x = torch.rand(4, 3, 5, 6)
    with pytest.raises(ValueError, match="input_std has 2 values, one per channel, but the "
                                         "inputs have 3 channel"):
        ODIN(input_std=[0.2, 0.3]).score_inputs(net, x)
    with pytest.raises(TypeError, match=r"must be floating point; got torch\.uint8"):
        ODIN().score_inputs(net, (x * 255).to(torch.uint8))
    for kwargs, match in (({"noise": -0.1}, "noise must be >= 0"),
                          ({"noise": float("nan")}, "noise must be a finite"),
                          ({"temperature": 0}, "temperature must be a finite number > 0"),
                          ({"input_std": [0.2, 0.0, 0.3]}, "input_std must be a finite number"),
                          ({"input_std": []}, "input_std is empty")):
        with pytest.raises(ValueError, match=match):
            ODIN(**kwargs).score_inputs(net, x)

    class NaNRows(nn.Module):
        def forward(self, x):
            z = x.flatten(1)[:, :3] * 1.0
            return torch.where(torch.arange(len(x))[:, None] == 2, float("nan"), z)

    with pytest.raises(ValueError, match=r"the model's logits contains NaN or Inf in "
                                         r"row\(s\) 2$"):
        ODIN().score_inputs(NaNRows(), x)

    class Features(nn.Module):  # an output that is no [B, C] of logits
        def forward(self, x):
            return x

    with pytest.raises(ValueError,
                       match=r"needs the model's logits \[4, C\].*shape \(4, 3, 5, 6\)"):
        ODIN().score_inputs(Features(), x)


def test_score_model_streams_a_loader_in_its_order_and_takes_empty_batches():
    net = smooth_net(dtype=torch.float32)
    x = torch.rand(11, 3, 5, 6)
    odin = ODIN(temperature=50.0, noise=0.01)
    batches = [(x[:4], torch.zeros(4)), (x[4:4],), {"data": x[4:], "label": torch.ones(7)}]
    scores, preds = odin.score_model(net, batches)
    want, want_pred = odin.score_inputs(net, x)
    torch.testing.assert_close(scores, want, rtol=1e-6, atol=0)
    assert torch.equal(preds, want_pred) and scores.device.type == "cpu"
    with pytest.warns(UserWarning, match="shuffles"):
        odin.score_model(net, DataLoader(TensorDataset(x), batch_size=4, shuffle=True))
    with pytest.raises(ValueError, match="yielded no batches"):
        odin.score_model(net, [])


def test_score_model_names_the_loader_batch_and_row_a_refusal_comes_from():
    """A sample whose logits hold NaN is named by its loader batch and its row there, as
    GROOD's score_model names them (the row alone, 2, named the third sample of some
    batch)."""
    net = smooth_net(dtype=torch.float32)
    x = torch.rand(12, 3, 5, 6)
    x[10, 1, 2, 3] = float("nan")
    with pytest.raises(RowsRefusedError, match=r"^the loader's batch 2 \(numbered from 0\): "
                                               r"the model's logits contains NaN or Inf in "
                                               r"row\(s\) 2$") as caught:
        ODIN(progress=False).score_model(net, DataLoader(TensorDataset(x), batch_size=4))
    assert caught.value.rows == [2]


def _digits_like(n, seed, shift=0.0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.rand(n, 1, 6, 6, generator=gen) * 0.3 + shift
    for c in range(3):
        x[y == c, 0, 2 * c, :] += 1.0
    return x, y


def test_evaluate_model_scores_odin_on_each_loader_as_it_runs():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(36, 12), nn.Tanh(), nn.Linear(12, 3))
    x, y = _digits_like(90, 0)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    train = DataLoader(TensorDataset(x, y), batch_size=32)
    test = DataLoader(TensorDataset(*_digits_like(45, 1)), batch_size=16)
    far = DataLoader(TensorDataset(torch.rand(30, 1, 6, 6) * 2), batch_size=16)
    det = GROOD().fit_model(net, train, features="2")
    odin, msp_like = ODIN(temperature=100.0, noise=0.02), ODIN(temperature=100.0, noise=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ev = evaluate_model(det, net, test, {"far": far}, baselines=[odin, msp_like])
    assert ev.baselines == ["ODIN (T=100, eps=0.02)", "ODIN (T=100, eps=0)"]
    got = ev.scores["ODIN (T=100, eps=0.02)"]
    np.testing.assert_allclose(got["far"], odin.score_model(net, far)[0].numpy(), rtol=1e-6)
    id_scores, id_pred = odin.score_model(net, test)
    np.testing.assert_allclose(got["the ID loader (ID)"], id_scores.numpy(), rtol=1e-6)
    m = ev.results["far"]["baselines"]["ODIN (T=100, eps=0.02)"]
    assert m["id_accuracy"] == pytest.approx(float((id_pred == _digits_like(45, 1)[1])
                                                   .float().mean()))
    assert 0 <= m["auroc"] <= 1


def test_evaluate_on_features_refuses_odin_naming_evaluate_model():
    det = GROOD().fit(torch.randn(30, 4), torch.arange(30) % 3)
    with pytest.raises(ValueError, match=r"the ODIN .* baseline scores the model's inputs.*"
                                         r"grood\.evaluate_model"):
        evaluate(det, torch.randn(10, 4), {"x": torch.randn(10, 4)}, baselines=[ODIN()])
    with pytest.raises(TypeError, match=r"got the class ODIN: pass ODIN\(\)$"):
        evaluate(det, torch.randn(10, 4), {"x": torch.randn(10, 4)}, baselines=[ODIN])


def test_feature_level_front_ends_name_where_odin_runs(tmp_path, capsys):
    from grood.baselines import fit_baselines
    from grood.cli import main

    with pytest.raises(ValueError, match="ODIN scores the model's inputs, which training "
                                         r"arrays do not hold: use grood\.ODIN"):
        fit_baselines(["energy", "odin"], logits=torch.randn(5, 3))
    for name, says in (("ODIN", "ODIN scores the model's inputs, which feature files do not "
                                "hold: use grood.ODIN"),
                       ("rankfeat", "RankFeat scores the model's inputs, which feature files "
                                    "do not hold: use grood.RankFeat")):
        with pytest.raises(SystemExit) as stop:
            main(["eval", "det.safetensors", "--id", "id.npz", "--ood", "o.npz",
                  "--baselines", "energy", name])
        assert stop.value.code == 2
        assert says in capsys.readouterr().err


def test_under_autocast_the_scores_stay_near_float32s():
    net = smooth_net(dtype=torch.float32)
    x = torch.rand(6, 3, 5, 6)
    odin = ODIN(temperature=10.0, noise=0.01)
    full, _ = odin.score_inputs(net, x)
    half, _ = odin.score_inputs(net, x, autocast=torch.bfloat16)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    torch.testing.assert_close(half, full, rtol=2e-2, atol=0)  # bfloat16's logits: 3 digits
    assert not torch.equal(half, full)  # (it ran under autocast)


def blocks_net(dtype=torch.float64, seed=0, n_classes=4):
    """Top-level children that run in order (split like a torchvision ResNet's)."""
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict([
        ("stem", nn.Conv2d(3, 5, 3, padding=1)), ("act", nn.Tanh()),
        ("layer3", nn.Sequential(nn.Conv2d(5, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())),
        ("layer4", nn.Sequential(nn.Conv2d(6, 7, 3, stride=2), nn.ReLU())),
        ("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
        ("fc", nn.Linear(7, n_classes))])).to(dtype)


def rankfeat_twin(net, x, layers, temperature):
    """RankFeat of each row on its own, in float64 with numpy's SVD: the children up to each
    layer, the map as a [C, H*W] matrix less s1 u1 v1^T, the rest; mean logits; energy."""
    children = list(net.double().eval().named_children())
    scores, preds = [], []
    with torch.no_grad():
        for row in x.double():
            fused = 0
            for layer in layers:
                a = row[None]
                cut = [n for n, _ in children].index(layer) + 1
                for _, m in children[:cut]:
                    a = m(a)
                mat = a[0].reshape(a.shape[1], -1).numpy()
                u, sv, vt = np.linalg.svd(mat, full_matrices=False)
                a = torch.from_numpy(mat - sv[0] * np.outer(u[:, 0], vt[0])).reshape(a.shape)
                for _, m in children[cut:]:
                    a = m(a)
                fused = fused + a[0].numpy()
            z = fused / len(layers)
            scores.append(temperature * np.logaddexp.reduce(z / temperature))
            preds.append(int(z.argmax()))
    return np.array(scores), np.array(preds)


def test_rankfeat_matches_its_definition_row_by_row_in_float64():
    x = torch.rand(5, 3, 7, 6, dtype=torch.float64)  # odd sizes: 4 x 3 positions at layer4
    for layers, t in ((("layer3", "layer4"), 1.0), ("layer4", 1.0), (["layer3"], 2.5)):
        net = blocks_net()
        net.layer3[1].running_var.uniform_(0.5, 2.0)
        scores, preds = RankFeat(layers=layers, temperature=t).score_inputs(net, x)
        want, want_pred = rankfeat_twin(net, x, [layers] if isinstance(layers, str) else layers,
                                        t)
        assert scores.dtype == torch.float64
        np.testing.assert_allclose(scores.numpy(), want, rtol=1e-10, atol=1e-12)
        np.testing.assert_array_equal(preds.numpy(), want_pred)
    # the removal changes the scores (the model's own energy is not RankFeat's)
    with torch.no_grad():
        own = torch.logsumexp(blocks_net().eval()(x), 1)
    assert not torch.allclose(own, RankFeat().score_inputs(blocks_net(), x)[0])


def test_rankfeat_splits_once_per_model_or_as_given(monkeypatch):
    import grood.model_baselines as mb

    checked = []
    real = mb.check_split
    monkeypatch.setattr(mb, "check_split", lambda *a: checked.append(1) or real(*a))
    net, x = blocks_net(torch.float32), torch.rand(4, 3, 6, 6)
    rf = RankFeat()
    first = rf.score_inputs(net, x)[0]
    rf.score_inputs(net, x)
    assert len(checked) == 2  # (two layers, on the first batch only)
    rf.score_inputs(blocks_net(torch.float32, seed=1), x)  # another model: checked again
    assert len(checked) == 4
    rf.score_inputs(net, x)  # (the first again: one model's parts are kept)
    assert len(checked) == 6
    rf.set_params(layers="layer4")  # other layers, the same model: split and checked again
    one_layer = rf.score_inputs(net, x)[0]
    assert len(checked) == 7
    torch.testing.assert_close(one_layer, RankFeat(layers="layer4").score_inputs(net, x)[0])
    from grood.extract import split_model

    given = RankFeat(splits=[split_model(net, "layer3"), split_model(net, "layer4")])
    torch.testing.assert_close(given.score_inputs(net, x)[0], first, rtol=0, atol=0)
    import pickle

    again = pickle.loads(pickle.dumps(rf))  # (after scoring: what it keeps does not travel)
    assert again.get_params() == rf.get_params() and "_parts_of" not in vars(again)


def test_rankfeat_clear_errors():
    net, x = blocks_net(torch.float32), torch.rand(4, 3, 6, 6)
    with pytest.raises(ValueError, match="cannot split the model at 'layer9'"):
        RankFeat(layers="layer9").score_inputs(net, x)
    with pytest.raises(ValueError, match=r"a feature map \(a matrix per sample.*after 'fc' is "
                                         r"of shape \(4, 4\)"):
        RankFeat(layers="fc").score_inputs(net, x)
    with pytest.raises(TypeError, match=r"one \(stem, tail\) pair of modules .* per layer \(2\)"):
        RankFeat(splits=[(net.stem, net.fc)]).score_inputs(net, x)
    with pytest.raises(ValueError, match="names a module twice"):
        RankFeat(layers=["layer4", "layer4"]).score_inputs(net, x)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        RankFeat(temperature=-1).score_inputs(net, x)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got 'hot'"):
        evaluate(GROOD().fit(torch.randn(30, 4), torch.arange(30) % 3), torch.randn(9, 4),
                 {"o": torch.randn(9, 4)}, baselines=[ODIN(temperature="hot")])  # (its name)
    bad = x.clone()
    bad[1] = float("inf")
    with pytest.raises(ValueError, match=r"feature map after 'layer3' contains NaN or Inf in "
                                         r"row\(s\) 1$"):
        RankFeat().score_inputs(net, bad)

    class Shuffled(nn.Module):  # children that do not run in their order
        def __init__(self):
            super().__init__()
            self.b = nn.Linear(6, 3)
            self.a = nn.Conv2d(3, 6, 3)

        def forward(self, x):
            return self.b(self.a(x).mean((2, 3)))

    with pytest.raises(ValueError, match="cannot be split into stem and tail"):
        RankFeat(layers="a").score_inputs(Shuffled(), x)


def test_evaluate_model_scores_rankfeat_beside_odin():
    net = blocks_net(torch.float32)
    gen = torch.Generator().manual_seed(3)
    x, y = torch.rand(40, 3, 6, 6, generator=gen), torch.arange(40) % 4
    train = DataLoader(TensorDataset(x, y), batch_size=16)
    far = DataLoader(TensorDataset(torch.rand(20, 3, 6, 6, generator=gen) * 3), batch_size=8)
    det = GROOD().fit_model(net, train, features="flatten")
    rf, odin = RankFeat(), ODIN()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ev = evaluate_model(det, net, train, {"far": far}, baselines=[rf, odin])
    assert ev.baselines == ["RankFeat (layer3+layer4)", "ODIN (T=1000, eps=0.0014)"]
    for est in (rf, odin):
        got = ev.scores[est.display_name]
        np.testing.assert_allclose(got["far"], est.score_model(net, far)[0].numpy(), rtol=1e-6)
        want, pred = est.score_model(net, train)
        np.testing.assert_allclose(got["the ID loader (ID)"], want.numpy(), rtol=1e-6)
        assert ev.results["far"]["baselines"][est.display_name]["id_accuracy"] == \
            pytest.approx(float((pred == y).float().mean()))
