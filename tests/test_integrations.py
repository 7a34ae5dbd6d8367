"""The OpenOOD postprocessor and pytorch-ood detector adapters."""

import sys

import numpy as np
import pytest
import torch
from conftest import DictDataset, clustered_features
from torch import nn
from torch.utils.data import DataLoader

from grood import GROOD, NotFittedError, ood_metrics
from grood.integrations.openood import GROODPostprocessor
from grood.integrations.pytorch_ood import (
    GROODDetector,
    ModelNotSetException,
    RequiresFittingException,
)


class OpenOODNet(nn.Module):
    """An OpenOOD-style net: forward(x, return_feature_list=True) -> (logits, features)."""

    def __init__(self, n_classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 16, 16)
        self.fc = nn.Linear(16, n_classes)

    def forward(self, x, return_feature_list=False):
        e = torch.relu(self.conv(x))
        f = torch.relu(self.fc1(nn.functional.max_pool2d(e, 2).flatten(1)))
        logits = self.fc(f)
        return (logits, [e, f]) if return_feature_list else logits


def _images(n, seed, ood=False):
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.rand(n, 1, 8, 8, generator=gen) * 0.3
    for c in range(3):
        if ood:  # a vertical bar: a pattern the classes never have
            x[y == c, 0, :, 2 * c + 1] += 1.0
        else:
            x[y == c, 0, 2 * c + 1, :] += 1.0
    return x, (torch.full((n,), -1) if ood else y)


def _loader(n, seed, ood=False):
    return DataLoader(DictDataset(*_images(n, seed, ood)), batch_size=16)


def _trained_net():
    net = OpenOODNet()
    x, y = _images(120, 0)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(150):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def test_openood_protocol_on_an_openood_style_net():
    net = _trained_net()
    id_loaders = {"train": _loader(120, 0), "val": _loader(30, 1), "test": _loader(60, 2)}
    ood_loaders = {"val": _loader(30, 3, ood=True),
                   "near": {"bars": _loader(60, 4, ood=True)},
                   "far": {"noise": DataLoader(DictDataset(torch.rand(60, 1, 8, 8),
                                                     torch.full((60,), -1)), batch_size=16)}}
    for source in ("mean", "val", "noise"):
        post = GROODPostprocessor(ood_prototype=source)
        post.setup(net, id_loaders, ood_loaders)
        id_pred, id_conf, id_label = post.inference(net, id_loaders["test"])
        assert id_pred.dtype.kind == "i" and id_conf.shape == (60,) and id_label.shape == (60,)
        assert float((id_pred == id_label).mean()) > 0.9
        for group in ("near", "far"):
            for loader in ood_loaders[group].values():
                _, ood_conf, ood_label = post.inference(net, loader)
                assert (ood_label == -1).all()
                assert ood_metrics(id_conf, ood_conf)["auroc"] > 0.7, (source, group)
        pred, conf = post.postprocess(net, next(iter(id_loaders["test"]))["data"])
        assert torch.equal(pred, torch.from_numpy(id_pred[:16]))
        np.testing.assert_allclose(conf.numpy(), id_conf[:16], rtol=1e-6)
    with pytest.raises(ValueError, match="yielded no batches"):  # torch.cat([]) before
        post.inference(net, [])
    assert "openood" not in sys.modules


@pytest.mark.parametrize("given", ["argument", "config"])
def test_openood_setup_with_a_cache_runs_the_net_over_the_training_loader_once(tmp_path,
                                                                               given):
    from types import SimpleNamespace

    net = _trained_net()
    rows = []
    net.register_forward_hook(lambda _m, args, _o: rows.append(args[0].shape[0]))
    id_loaders, ood_loaders = {"train": _loader(120, 0)}, {"val": _loader(30, 3, ood=True)}
    ref = GROODPostprocessor(ood_prototype="val")
    ref.setup(net, id_loaders, ood_loaders)
    ran, rows[:] = sum(rows), []
    config = SimpleNamespace(postprocessor=SimpleNamespace(postprocessor_args={
        "use_val_ood": True, **({"cache": str(tmp_path)} if given == "config" else {})}))
    post = GROODPostprocessor(config, **({"cache": "host"} if given == "argument" else {}))
    post.setup(net, id_loaders, ood_loaders)
    assert sum(rows) == ran - 120 and list(tmp_path.iterdir()) == []
    assert torch.equal(post.detector.index_.vectors, ref.detector.index_.vectors)
    assert torch.equal(post.detector.ood_prototype_, ref.detector.ood_prototype_)


def test_openood_inference_shows_progress_only_when_asked(monkeypatch, capsys):
    net = _trained_net()
    post = GROODPostprocessor()
    post.setup(net, {"train": _loader(120, 0)}, {})
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)  # tqdm's bar
    capsys.readouterr()
    post.inference(net, _loader(60, 2), progress=True)
    assert "grood: scoring" in capsys.readouterr().err
    post.inference(net, _loader(60, 2), progress=False)
    assert "grood: scoring" not in capsys.readouterr().err


def test_openood_val_source_uses_the_val_ood_loader():
    net = _trained_net()
    post = GROODPostprocessor(ood_prototype="val")
    ood_val = _loader(30, 3, ood=True)
    post.setup(net, {"train": _loader(120, 0)}, {"val": ood_val})
    with torch.no_grad():
        feats = torch.cat([net(b["data"], return_feature_list=True)[1][-1] for b in ood_val])
    torch.testing.assert_close(post.detector.ood_prototype_, feats.mean(0), rtol=1e-5,
                               atol=1e-6)


def test_openood_adapter_names_a_bad_loader_dict_or_parameter_up_front():
    """A misspelt GROOD parameter was found in setup (GROOD's TypeError), a missing 'train'
    loader as KeyError 'train'; a tensor given to inference ran each image through the net
    alone ("features has 1 columns"), one dict batch given as the training loader failed
    on its keys ("got str"), and labels of the wrong shape went into label_list unchecked."""
    net = _trained_net()
    with pytest.raises(TypeError, match=r"GROODPostprocessor got unknown parameter\(s\) "
                                        r"batchsize \(did you mean 'batch_size'\?\); .* it takes "
                                        r"GROOD's: backend, batch_size"):
        GROODPostprocessor(batchsize=64)
    post = GROODPostprocessor()
    x, y = _images(40, 0)
    for score in (lambda: post.postprocess(net, x), lambda: post.inference(net, [(x, y)])):
        with pytest.raises(NotFittedError, match=r"^this GROODPostprocessor is not set up yet: "
                                                 r"call setup\(net, id_loader_dict, "):
            score()  # (a RuntimeError, unlike grood's other unfitted objects)
    with pytest.raises(ValueError, match=r"id_loader_dict\['train'\], which it lacks; "
                                         r"id_loader_dict holds \['test', 'val'\]"):
        post.setup(net, {"val": _loader(30, 1), "test": _loader(30, 2)}, {})
    with pytest.raises(TypeError, match=r"the loader must yield batches, got a dict "
                                        r"\(iterating it gives its keys\): pass .* \(one dict "
                                        r"batch: \[batch\]\)"):
        post.setup(net, {"train": {"data": x, "label": y}}, {})
    post.setup(net, {"train": [{"data": x, "label": y}]}, {})
    for loader in (x, {"data": x, "label": y}):
        with pytest.raises(TypeError, match=r"^inference takes a loader of batches, got a "
                                            r"(Tensor|dict)"):
            post.inference(net, loader, progress=False)
    with pytest.raises(ValueError, match=r"batch 1 \(numbered from 0\) has labels of shape "
                                         r"\(8, 2\) for 8 inputs"):
        post.inference(net, [{"data": x[:8], "label": y[:8]},
                             {"data": x[8:16], "label": torch.zeros(8, 2, dtype=torch.long)}],
                       progress=False)


def test_pytorch_ood_adapter_without_pytorch_ood():
    """The adapter works with pytorch-ood absent (tests/integration/ runs it against 0.4.0)."""
    net = _trained_net()

    def encoder(x):
        return net(x, return_feature_list=True)[1][-1]

    x_train, y_train = _images(120, 0)
    y_mixed = y_train.clone()
    y_mixed[::7] = -1  # OOD-labelled rows are skipped, as pytorch-ood's detectors do
    loader = DataLoader(torch.utils.data.TensorDataset(x_train, y_mixed), batch_size=32)
    det = GROODDetector(encoder, head=net.fc).fit(loader)
    x_in, _ = _images(30, 5)
    x_out, _ = _images(30, 6, ood=True)
    known = y_mixed >= 0
    ref = GROOD().fit_model(net, [(x_train[known], y_train[known])])
    torch.testing.assert_close(det.predict(x_in), -ref.score_model(net, [x_in])[0])
    assert float(det(x_out).mean()) > float(det(x_in).mean())
    # fit(loader) is fit_features on the extracted features: the same detector.
    with torch.no_grad():
        feats = encoder(x_train)
    by_features = GROODDetector(head=net.fc).fit_features(feats, y_mixed)
    assert torch.equal(by_features.predict_features(encoder(x_in)), det.predict(x_in))
    with pytest.raises(RequiresFittingException):
        GROODDetector(encoder).predict(x_in)
    with pytest.raises(ModelNotSetException):
        GROODDetector().fit(loader)
    det.set_hyperparameters(k=3)
    assert det.get_hyperparameters() == {"k": 3, "ood_prototype": "mean", "precision": "ieee"}
    assert det.grood.k == 1
    det.set_hyperparameters(precision="tf32")
    det.predict(x_in)
    assert det.grood.k == 3  # k applies at the next scoring, no refit needed
    assert det.grood.precision == "tf32"  # so does the GEMM precision
    assert det.to("cpu") is det and det.device == torch.device("cpu")
    assert "pytorch_ood" not in sys.modules


@pytest.mark.filterwarnings("ignore:the logits classify")  # (an untrained head: fine here)
def test_empty_batches_add_no_rows_in_both_adapters():
    """A loader batch of 0 rows neither runs the net (which may not take one) nor adds rows:
    OpenOOD's ``inference`` and pytorch-ood's ``fit`` give what they give without it."""
    net = _trained_net()

    def refuse_empty(_module, args):
        if args[0].shape[0] == 0:
            raise RuntimeError("this net cannot take an empty batch")

    post = GROODPostprocessor()
    post.setup(net, {"train": _loader(120, 0)}, {})
    batches = list(_loader(40, 2))
    empty = {"data": batches[0]["data"][:0], "label": batches[0]["label"][:0]}
    ref = post.inference(net, batches, progress=False)
    x_train, y_train = _images(120, 0)

    def encoder(x):
        return net(x, return_feature_list=True)[1][-1]

    plain = [(x_train[:64], y_train[:64]), (x_train[64:], y_train[64:])]
    fitted = GROODDetector(encoder, head=net.fc).fit(plain)
    handle = net.register_forward_pre_hook(refuse_empty)
    try:
        got = post.inference(net, [empty, batches[0], empty, *batches[1:], empty],
                             progress=False)
        for a, b in zip(got, ref, strict=True):
            np.testing.assert_array_equal(a, b)
        with pytest.raises(ValueError, match="the data loader yielded no batches with rows"):
            post.inference(net, [empty], progress=False)
        det = GROODDetector(encoder, head=net.fc).fit(
            [(x_train[:0], y_train[:0]), plain[0], (x_train[:0], y_train[:0]), plain[1]])
        x_in, _ = _images(30, 5)
        assert torch.equal(det.predict(x_in), fitted.predict(x_in))
        # An empty batch scores as 0 rows, without the encoder (it failed there before).
        none = det.predict(x_in[:0])
        assert none.shape == (0,) and none.dtype == det.predict(x_in).dtype
        assert det.predict_features(torch.empty(0, 16)).shape == (0,)
    finally:
        handle.remove()


def test_pytorch_ood_adapter_runs_modules_in_eval_mode_and_restores_them():
    """An encoder and head left in training mode (dropout, batch norm) fit and score as in
    eval mode, and are handed back in the mode they came in."""
    x, y = clustered_features(90, 3, 6, seed=1, dtype=torch.float32)
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.ReLU())
    head = nn.Sequential(nn.Dropout(0.5), nn.Linear(8, 3))
    loader = DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=30)
    encoder.eval(), head.eval()
    want = GROODDetector(encoder, head=head).fit(loader)
    want_scores = want.predict(x)
    encoder.train(), head.train()
    head[0].eval()  # a mixed model: each submodule gets its own mode back
    det = GROODDetector(encoder, head=head).fit(loader)
    assert torch.equal(det.grood.ood_prototype_, want.grood.ood_prototype_)
    assert det.grood.index_.ntotal == want.grood.index_.ntotal
    assert torch.equal(det.predict(x), want_scores)
    assert [m.training for m in (*encoder.modules(), *head.modules())] \
        == [True] * 5 + [True, False, True]


@pytest.mark.parametrize(("n_labels", "n_logits", "match"), [
    ((50,), None, r"labels must have shape \[60\]"),
    ((60, 1), None, r"labels must have shape \[60\]"),
    ((60,), (50, 3), r"logits must have shape \[60, C\]"),
])
def test_pytorch_ood_adapter_names_mismatched_shapes(n_labels, n_logits, match):
    """Shapes are checked before the rows labelled < 0 are dropped (a mask of the wrong shape
    failed inside torch's indexing)."""
    x, y = clustered_features(60, 3, 5, seed=0, dtype=torch.float32)
    labels = y[: n_labels[0]].reshape(n_labels)
    logits = None if n_logits is None else torch.randn(n_logits)
    with pytest.raises(ValueError, match=match):
        GROODDetector().fit_features(x, labels, logits)
    # A loader may give labels as a list, and NumPy batches (they failed in Tensor.to).
    det = GROODDetector(encoder=lambda t: t).fit([(x, y.tolist())])
    assert det.grood.n_train_ == 60
    module = GROODDetector(encoder=nn.Identity()).fit([(x.numpy(), y.numpy())])
    assert torch.equal(module.predict(x.numpy()), det.predict(x))


def test_pytorch_ood_adapter_names_a_bad_loader_or_parameter_up_front():
    """A tensor given as the loader, a batch that is not (inputs, labels), and a misspelt
    GROOD parameter are named; they failed in Python's unpacking ("too many values to
    unpack") or at the first fit, in GROOD's constructor."""
    x, y = clustered_features(30, 3, 5, seed=0, dtype=torch.float32)
    det = GROODDetector(encoder=nn.Identity())
    for loader, said in ((x, r"fit takes a loader of \(inputs, labels\) batches, got a Tensor"),
                         (x.numpy(), "got a ndarray"),
                         ([(x, y, y)], r"the loader's batch 0 \(numbered from 0\) must be "
                                       r"\(inputs, labels\), got a tuple of 3"),
                         ([(x, y), x], r"batch 1 .* got a Tensor"),
                         ([{"pixel_values": x, "labels": y}],  # a dataset of dict samples
                          r"got a dict \(keys 'pixel_values', 'labels'\): pass the arrays "
                          r"themselves, e.g. \(\(b\['pixel_values'\], b\['labels'\]\) for b "
                          r"in loader\)$")):
        with pytest.raises(TypeError, match=said):
            det.fit(loader)
    with pytest.raises(TypeError, match=r"unknown parameter\(s\) batchsize \(did you mean "
                                        r"'batch_size'\?\); besides encoder, "
                                        r"head, k, ood_prototype and precision it takes "
                                        r"GROOD's: backend, batch_size"):
        GROODDetector(nn.Identity(), batchsize=8)
    assert GROODDetector(nn.Identity(), batch_size=8).fit([(x, y)]).grood.batch_size == 8
    # Class names as labels, as GROOD names them (torch's "can't convert np.ndarray of type
    # numpy.str_" before); big-endian features read as GROOD reads them (refused by torch).
    names = np.array(["ant", "bee", "cat"])[y.numpy()]
    for fit in (lambda: det.fit([(x, names)]), lambda: det.fit_features(x, names)):
        with pytest.raises(TypeError, match=r"labels holds class names \('.*'\), not integer"):
            fit()
    swapped = GROODDetector().fit_features(x.numpy().astype(">f4"), y.numpy().astype(">i8"))
    assert torch.equal(swapped.predict_features(x.numpy().astype(">f4")),
                       GROODDetector().fit_features(x, y).predict_features(x))


def test_openood_reference_mode_refuses_an_index_of_its_own():
    """reference=True builds the official code's IVF index; an index given beside it was
    silently replaced."""
    with pytest.raises(ValueError, match="index cannot be given"):
        GROODPostprocessor(reference=True, index="exact")
    with pytest.raises(ValueError, match="index_options cannot be given"):
        GROODPostprocessor(reference=True, index_options={"nprobe": 8})
    assert GROODPostprocessor(index="exact").grood_kwargs == {"index": "exact"}
    post = GROODPostprocessor(reference=True)  # the official rule counts the loader's batches
    with pytest.raises(ValueError, match="needs a training loader with a length"):
        post.setup(_trained_net(), {"train": (b for b in _loader(30, 0))}, {})


def _aps_config(sweep, aps=True, **args):
    from types import SimpleNamespace

    return SimpleNamespace(postprocessor=SimpleNamespace(
        postprocessor_args=args, APS_mode=aps, postprocessor_sweep=sweep))


def test_openood_automatic_parameter_search_sets_k_without_a_refit():
    """OpenOOD's evaluator, with APS_mode, calls set_hyperparam with each combination of
    postprocessor_sweep's values (keys in order) after setup, scores its val loaders with
    each, and sets the best: k applies at the next score, the index fitted once."""
    net = _trained_net()
    id_loaders = {"train": _loader(120, 0), "val": _loader(30, 1), "test": _loader(60, 2)}
    ood_loaders = {"val": _loader(30, 3, ood=True)}
    sweep = {"pre_layer_indx_list": [2], "lam_list": [0.5], "k_list": [1, 4, 9]}
    post = GROODPostprocessor(_aps_config(sweep, use_proto_mean=True))
    assert post.APS_mode and not post.hyperparam_search_done and post.args_dict == sweep
    post.setup(net, id_loaders, ood_loaders)
    fitted = post.detector
    confs = []
    for combination in ([2, 0.5, 1], [2, 0.5, 4], [2, 0.5, 9]):  # OpenOOD's order
        post.set_hyperparam(combination)
        assert post.get_hyperparam() == combination and post.detector is fitted
        _, id_conf, _ = post.inference(net, id_loaders["val"], progress=False)
        confs.append(id_conf)
        other = GROODPostprocessor(k=combination[2])  # set up with that k from the start
        other.setup(net, id_loaders, ood_loaders)
        np.testing.assert_array_equal(id_conf, other.inference(net, id_loaders["val"],
                                                               progress=False)[1])
    assert not np.array_equal(confs[0], confs[2])  # (k changes the scores)
    # without APS_mode the sweep is only kept, as OpenOOD's other postprocessors keep it
    quiet = GROODPostprocessor(_aps_config({"lam_list": [0.5, 0.9]}, aps=False))
    assert not quiet.APS_mode and quiet.hyperparam_search_done


@pytest.mark.parametrize("index", ["exact", "faiss-ivf"])
def test_openood_parameter_search_runs_each_val_loader_once(index):
    """During OpenOOD's parameter search each val loader goes through the net once and is
    searched once at the sweep's largest k; every k's (pred, conf, label) lists equal those
    of a postprocessor scoring at that k. After the search (hyperparam_search_done) every
    call scores anew. An IVF index scores each call on its own."""
    if index == "faiss-ivf":
        pytest.importorskip("faiss")
    net = _trained_net()
    passes = []
    net.register_forward_hook(lambda module, args, out: passes.append(args[0].shape[0]))
    id_loaders = {"train": _loader(120, 0), "val": _loader(30, 1)}
    ood_loaders = {"val": _loader(30, 3, ood=True)}
    kwargs = {"index": index} if index == "exact" else {
        "index": index, "index_options": {"nlist": 2, "nprobe": 2}}
    post = GROODPostprocessor(_aps_config({"k_list": [1, 4, 9]}, use_proto_mean=True),
                              **kwargs)
    post.setup(net, id_loaders, ood_loaders)
    for k in (1, 4, 9):
        post.set_hyperparam([k])
        passes.clear()
        got = [post.inference(net, loader, progress=False)
               for loader in (id_loaders["val"], ood_loaders["val"])]
        assert sum(passes) == (60 if k == 1 or index != "exact" else 0)
        other = GROODPostprocessor(k=k, **kwargs)
        other.setup(net, id_loaders, ood_loaders)
        for lists, loader in zip(got, (id_loaders["val"], ood_loaders["val"]), strict=True):
            for a, b in zip(lists, other.inference(net, loader, progress=False), strict=True):
                np.testing.assert_array_equal(a, b)
    post.hyperparam_search_done = True  # (as OpenOOD's evaluator sets it)
    passes.clear()
    post.inference(net, id_loaders["val"], progress=False)
    assert sum(passes) == 30 and not post._swept
    # a k beyond the index is refused at its own turn, as without the shared search
    post = GROODPostprocessor(_aps_config({"k_list": [1, 5000]}, use_proto_mean=True),
                              **kwargs)
    post.setup(net, id_loaders, ood_loaders)
    post.set_hyperparam([1])
    post.inference(net, id_loaders["val"], progress=False)
    post.set_hyperparam([5000])
    with pytest.raises(ValueError, match="k=5000 but the index holds only"):
        post.inference(net, id_loaders["val"], progress=False)


@pytest.mark.parametrize(("sweep", "kwargs", "said"), [
    ({"lam_list": [0.5]}, {}, "give k's values once, as k_list"),
    ({"k_list": [1, 2], "K_list": [3]}, {}, r"\(got k_list, K_list\)"),
    ({"k_list": [1, 2], "lam_list": [0.5, 0.9]}, {}, "would search lam_list, which GROOD fixes"),
    ({"k_list": [1, 0]}, {}, "postprocessor_sweep k_list must be a positive integer"),
    ({"k_list": []}, {}, "k_list is empty"),
    ({"k_list": [1, 3]}, {"reference": True}, r"a sweep of k_list=\[1, 3\] has nothing to"),
])
def test_openood_automatic_parameter_search_refuses_what_it_cannot_search(sweep, kwargs, said):
    with pytest.raises(ValueError, match=said):
        GROODPostprocessor(_aps_config(sweep), **kwargs)


def test_openood_set_hyperparam_takes_one_value_per_sweep_key():
    post = GROODPostprocessor(_aps_config({"k_list": [1, 2]}))
    with pytest.raises(ValueError, match=r"one value per postprocessor_sweep key \(k_list\)"):
        post.set_hyperparam([1, 2])
    post.set_hyperparam([2])  # before setup: the fit takes it
    assert post.get_hyperparam() == [2] and post.grood_kwargs["k"] == 2
