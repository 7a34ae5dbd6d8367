"""The OpenOOD adapter's reference mode against an independent implementation of the official
postprocessor's rules (val prototype from the first whole batches reaching n_noise_samples rows,
100 by default; IVF
quantizer trained on the first T = min(600, int(0.8 B)) loader batches, nlist = int(4 sqrt T),
nprobe 4; optionally batch T left out), and its OpenOOD base class."""

from __future__ import annotations

import importlib
import math
import sys
import types

import pytest
import torch
from conftest import DictDataset
from test_integrations import _images, _trained_net
from torch.utils.data import DataLoader

from grood import functional

faiss = pytest.importorskip("faiss")


def _loader(n, seed, ood=False, batch_size=16):
    return DataLoader(DictDataset(*_images(n, seed, ood)), batch_size=batch_size)


def _features(net, x):
    with torch.no_grad():
        logits, feats = net(x, return_feature_list=True)
    return feats[-1].float(), logits


def reference_scores(net, train, val, test_x, omit_batch_t, val_rows=100):
    """The official rules, written out: OOD prototype, class prototypes, IVF index, scores."""
    taken, n = [], 0
    for batch in val:  # whole batches until val_rows rows
        taken.append(_features(net, batch["data"])[0])
        n += taken[-1].shape[0]
        if n >= val_rows:
            break
    p_ood = torch.cat(taken).double().mean(0).float()
    per_batch = [(*_features(net, b["data"]), b["label"]) for b in train]
    feats = torch.cat([f for f, _, _ in per_batch])
    labels = torch.cat([y for _, _, y in per_batch])
    protos = torch.stack([feats[labels == c].double().mean(0) for c in range(3)]).float()
    centred = protos.double() - p_ood.double()
    sq = (centred * centred).sum(1).float()

    def grads(f):
        return functional.ncp_gradient(f, protos, p_ood, prototype_sq_norms=sq).grad

    n_batches = len(per_batch)
    t = max(1, min(600, int(0.8 * n_batches)))
    correct = [grads(f)[lg.argmax(1) == y].numpy() for f, lg, y in per_batch]
    train_rows = torch.cat([torch.from_numpy(c) for c in correct[:t]]).numpy()
    quantizer = faiss.IndexFlatL2(train_rows.shape[1])
    nlist = min(int(4 * math.sqrt(t)), train_rows.shape[0])
    index = faiss.IndexIVFFlat(quantizer, train_rows.shape[1], nlist, faiss.METRIC_L2)
    index.train(train_rows)
    index.add(train_rows)
    for i in range(t, n_batches):
        if omit_batch_t and i == t:
            continue
        if correct[i].shape[0]:
            index.add(correct[i])
    index.nprobe = 4
    dist, ids = index.search(grads(_features(net, test_x)[0]).numpy(), 1)
    # The training row of each indexed gradient, in the order the reference added them.
    starts = [0, *torch.tensor([y.shape[0] for _, _, y in per_batch]).cumsum(0).tolist()]
    rows = torch.cat([(lg.argmax(1) == y).nonzero().squeeze(1) + starts[i]
                      for i, (_, lg, y) in enumerate(per_batch)
                      if not (omit_batch_t and i == t)])
    return -torch.from_numpy(dist[:, 0]), index.ntotal, rows[torch.from_numpy(ids[:, 0])]


@pytest.mark.parametrize("omit", [False, True])
def test_reference_mode_reproduces_the_official_rules(omit):
    from grood.integrations.openood import GROODPostprocessor

    net = _trained_net()
    train, val = _loader(200, 0), _loader(150, 3, ood=True)
    test_x = torch.cat([_images(40, 5)[0], _images(40, 6, ood=True)[0]])
    post = GROODPostprocessor(ood_prototype="val", reference=True, omit_batch_t=omit)
    post.setup(net, {"train": train}, {"val": val})
    want, ntotal, nearest = reference_scores(net, train, val, test_x, omit)
    _, conf = post.postprocess(net, test_x)
    assert post.detector.index_.ntotal == ntotal
    # The neighbours are named by training row, the omitted batch's rows left out.
    features = _features(net, test_x)[0]
    assert torch.equal(post.detector.kneighbors(features)[1][:, 0], nearest)
    assert post.detector.index_.index.nlist == int(4 * math.sqrt(int(0.8 * len(train))))
    assert torch.equal(conf, want)


def test_reference_mode_takes_the_val_rows_from_the_config():
    """The official code averages val batches until n_noise_samples rows; 40 rows here are
    three batches of 16, where the default 100 would take seven."""
    from grood.integrations.openood import GROODPostprocessor

    net = _trained_net()
    train, val = _loader(200, 0), _loader(150, 3, ood=True)
    test_x = torch.cat([_images(40, 5)[0], _images(40, 6, ood=True)[0]])
    args = {"use_val_ood": True, "reference": True, "n_noise_samples": 40}
    post = GROODPostprocessor(_config(args))
    post.setup(net, {"train": train}, {"val": val})
    want, _, _ = reference_scores(net, train, val, test_x, False, val_rows=40)
    default, _, _ = reference_scores(net, train, val, test_x, False)
    _, conf = post.postprocess(net, test_x)
    assert torch.equal(conf, want) and not torch.equal(conf, default)


def _config(args):
    return types.SimpleNamespace(postprocessor=types.SimpleNamespace(postprocessor_args=args))


def test_config_switches_reference_mode_and_the_val_prototype():
    from grood.integrations.openood import GROODPostprocessor

    args = {"use_val_ood": True, "K": 3}
    post = GROODPostprocessor(_config(args))
    assert (post.ood_prototype, post.reference, post.omit_batch_t) == ("val", False, False)
    assert post.grood_kwargs["k"] == 3 and post.val_rows is None
    assert args == {"use_val_ood": True, "K": 3}  # (not modified)
    post = GROODPostprocessor(_config({"reference": True, "K": 1}))
    assert (post.ood_prototype, post.reference, post.grood_kwargs) == ("mean", True, {"k": 1})
    # The official code reads k and searches 1 neighbour: another k cannot be reproduced.
    for config, kwargs in (({"reference": True, "K": 3}, {}), (None, {"reference": True,
                                                                     "k": 2})):
        with pytest.raises(ValueError, match="reads k but searches 1 neighbour; got k="):
            GROODPostprocessor(config and _config(config), **kwargs)
    with pytest.raises(ValueError, match="needs reference=True"):
        GROODPostprocessor(omit_batch_t=True)


#: The official postprocessor's arguments with its variants switched off.
OFFICIAL = {"pre_layer_indx": 2, "lam": 0.5, "n_noise_samples": 100, "distance_loss": False,
            "use_val": False, "use_gaussian_noise": False, "use_val_ood": True,
            "use_synthetic": False, "synthetic_name": "synthetic", "use_proto_mean": False,
            "use_cosine": False, "use_pseudo_prototype": False, "no_gradients": False,
            "use_grad_norm": False, "use_direct_grad": True, "filter_ood": False, "k": 1,
            "sampling_ratio": 1.0}


def test_the_official_postprocessors_arguments_are_read_or_refused_by_name():
    from grood.integrations.openood import GROODPostprocessor

    post = GROODPostprocessor(_config({**OFFICIAL, "reference": True}))
    assert (post.ood_prototype, post.val_rows, post.grood_kwargs) == ("val", 100, {"k": 1})
    # use_proto_mean replaces any other source there, as it does here.
    assert GROODPostprocessor(_config({**OFFICIAL, "use_proto_mean": True})).ood_prototype \
        == "mean"
    for name in ("use_gaussian_noise", "use_synthetic", "use_cosine", "no_gradients",
                 "distance_loss", "use_val", "filter_ood", "use_pseudo_prototype",
                 "use_grad_norm"):
        with pytest.raises(ValueError, match=f"does not implement: {name} "):
            GROODPostprocessor(_config({**OFFICIAL, name: True}))
    refused = [({"ood_protoype": "mean"}, r"unknown key\(s\) 'ood_protoype'; "
                "GROODPostprocessor reads ood_prototype, "),
               ({"K": 3, "k": 5}, "both K=3 and k=5"),
               ({"sampling_ratio": 0.5}, "sampling_ratio=0.5: grood fits on every"),
               ({"n_noise_samples": 0}, "n_noise_samples must be a positive integer, got 0")]
    for args, match in refused:
        with pytest.raises(ValueError, match=match):
            GROODPostprocessor(_config({**OFFICIAL, **args}))
    assert GROODPostprocessor(_config({"K": 3, "k": 3})).grood_kwargs == {"k": 3}
    # With every source switch off, the official OOD prototype stays the zero vector.
    off = {**OFFICIAL, "use_val_ood": False, "reference": True}
    with pytest.raises(ValueError, match="would be the zero vector"):
        GROODPostprocessor(_config(off))
    assert GROODPostprocessor(_config(off), ood_prototype="mean").ood_prototype == "mean"
    assert GROODPostprocessor(_config({**off, "reference": False})).ood_prototype == "mean"


def test_subclasses_openoods_base_postprocessor_when_it_imports(monkeypatch):
    class BasePostprocessor:
        def __init__(self, config):
            self.config = config

    fake = types.ModuleType("openood.postprocessors.base_postprocessor")
    fake.BasePostprocessor = BasePostprocessor
    for name in ("openood", "openood.postprocessors"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    import grood.integrations.openood as adapter

    try:
        reloaded = importlib.reload(adapter)
        post = reloaded.GROODPostprocessor(None)
        assert isinstance(post, BasePostprocessor) and post.config is None
    finally:
        monkeypatch.undo()
        importlib.reload(adapter)
    assert adapter.GROODPostprocessor.__mro__[1] is object
