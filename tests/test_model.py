"""From a model and loaders to scores: extraction, fit_model/score_model, mixup and noise."""

import dataclasses
import sys
import warnings

import pytest
import torch
from conftest import DictDataset
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from grood import (
    GROOD,
    ODIN,
    Mixup,
    RankFeat,
    RowsRefusedError,
    UniformNoise,
    evaluate_model,
)
from grood.extract import FeatureExtractor, check_split, split_model
from grood.sources import gaussian_blur


def small_cnn(n_classes=3):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, n_classes),
    )


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv(x))


class ResNetLike(nn.Module):
    """A residual net whose forward is not its children in order (flatten in forward)."""

    def __init__(self, n_classes=3):
        super().__init__()
        torch.manual_seed(1)
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.layer1 = Block(6)
        self.layer2 = Block(6)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, n_classes)

    def forward(self, x, return_feature_list=False):
        e = self.layer1(torch.relu(self.stem(x)))
        f = self.avgpool(self.layer2(e)).flatten(1) * 2.0  # not a child: cannot be derived
        logits = self.fc(f)
        return (logits, [e, f]) if return_feature_list else logits


def _images(n=60, seed=0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.rand(n, 1, 8, 8, generator=gen) * 0.3
    for c in range(3):  # a bright bar per class
        x[y == c, 0, 2 * c + 1, :] += 1.0
    return x, y


@pytest.mark.parametrize("style", ["tuple", "dict", "hugging-face", "image", "tensor"])
def test_loaders_of_each_style(style):
    x, y = _images()
    model = small_cnn()
    ex = FeatureExtractor(model, features="8")
    if style == "tuple":
        loader = DataLoader(TensorDataset(x, y), batch_size=16)
    elif style == "dict":
        loader = DataLoader(DictDataset(x, y), batch_size=16)
    elif style == "hugging-face":
        loader = [{"pixel_values": x[i:i + 16], "labels": y[i:i + 16]} for i in range(0, 60, 16)]
    elif style == "image":  # a datasets-style batch, with a column that is not an input
        loader = [{"image": x[i:i + 16], "label": y[i:i + 16].tolist(), "id": list(range(16))}
                  for i in range(0, 60, 16)]
    else:
        loader = [x[i:i + 16] for i in range(0, 60, 16)]
    feats, logits, labels = ex.extract(loader)
    assert feats.shape == (60, 16) and logits.shape == (60, 3)
    assert (labels is None) == (style == "tensor")
    if labels is not None:
        assert torch.equal(labels, y)
    with torch.no_grad():
        want = model[:9](x)
    torch.testing.assert_close(feats, want)


def test_a_dict_batch_without_inputs_is_refused_naming_the_keys_it_reads():
    ex = FeatureExtractor(small_cnn(), features="8")
    with pytest.raises(ValueError, match=r"inputs under one of \['data', 'pixel_values'.*"
                                         r"it has \['x_img', 'y'\]"):
        ex.extract([{"x_img": torch.rand(4, 1, 8, 8), "y": torch.zeros(4)}])
    with pytest.raises(TypeError, match="'image' must be a tensor of inputs, got list"):
        ex.extract([{"image": ["a.png", "b.png"], "label": [0, 1]}])


def test_hooks_on_a_residual_net_and_feature_list_models():
    x, _ = _images(10)
    model = ResNetLike()
    by_hook = FeatureExtractor(model, features="avgpool", early="layer1")(x)
    assert by_hook.features.shape == (10, 6) and by_hook.early.shape == (10, 6 * 64)
    by_list = FeatureExtractor(model, early=0)(x)  # return_feature_list=True
    with torch.no_grad():
        logits, (e, f) = model(x, return_feature_list=True)
    torch.testing.assert_close(by_list.features, f)
    torch.testing.assert_close(by_list.early, e.flatten(1))
    torch.testing.assert_close(by_list.logits, logits)

    class NoFeatures(nn.Module):  # a feature list with nothing in it
        def forward(self, x, return_feature_list=False):
            return (x.flatten(1), []) if return_feature_list else x.flatten(1)

    with pytest.raises(ValueError, match="returned an empty feature list: name the penultimate"):
        FeatureExtractor(NoFeatures())(x)


def test_eval_mode_is_restored_and_unknown_modules_named():
    model = small_cnn()
    model.train()
    model[1].eval()
    FeatureExtractor(model, features="8")(torch.rand(2, 1, 8, 8))
    assert model.training and not model[1].training
    with pytest.raises(ValueError, match="features='avgpool' is not a module of the model"):
        FeatureExtractor(model, features="avgpool")
    with pytest.raises(ValueError, match="return_feature_list"):
        FeatureExtractor(small_cnn())(torch.rand(2, 1, 8, 8))
    # A wrapped model (torch.compile's _orig_mod, DataParallel's module): the name is suggested.
    wrapped = nn.Sequential()
    wrapped.add_module("module", model)
    with pytest.raises(ValueError, match=r"features='8' is not a module of the model \(did "
                                         r"you mean 'module.8'\? the model is wrapped\)"):
        FeatureExtractor(wrapped, features="8")
    with pytest.raises(ValueError, match=r"did you mean 'module\.8'"):
        GROOD().fit(torch.rand(6, 16), torch.arange(6) % 2).attach(wrapped, features="8")


def test_wrapped_models_are_read_through_their_wrappers():
    """A detector fitted on a model scores it compiled (torch.compile's ``_orig_mod``) or in
    DataParallel (``module``), and one fitted on a wrapped model scores the bare one, on the
    same layer, named either way, without the warning about another layer (these were
    errors: "features='8' is not a module of the model (did you mean '_orig_mod.8'?"). The
    model they wrap is run, eagerly: a compiled model that has run before the detector's
    hooks were added runs past them ("ran 0 times"), so its scores are the bare model's,
    bit for bit."""
    from grood.extract import bare_name, wrapper_path

    x, y = _images()
    model = small_cnn().eval()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    with warnings.catch_warnings():  # (an untrained model: its logits are near chance)
        warnings.simplefilter("ignore")
        det = GROOD().fit_model(model, loader, features="8")
        fitted = {name: GROOD().fit_model(nn.DataParallel(model), loader, features=name)
                  for name in ("8", "module.8")}
    scores = det.score_model(model, loader)[0]
    compiled = torch.compile(model, backend="eager")
    both = torch.compile(nn.DataParallel(model), backend="eager")
    with torch.no_grad():  # (the user's own inference first: compiled without any hook)
        compiled(x[:16]), both(x[:16])
    assert wrapper_path(model) == [] and wrapper_path(both) == ["_orig_mod", "module"]
    assert bare_name("_orig_mod.module.8") == "8" and bare_name("module") == "module"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for wrapped in (compiled, nn.DataParallel(model), both):
            assert torch.equal(det.score_model(wrapped, loader)[0], scores)
        assert torch.equal(det.score_model(compiled, loader, features="_orig_mod.8")[0],
                           scores)
        for name, on_wrapped in fitted.items():
            assert on_wrapped.extractor_["features"] == name
            assert torch.equal(on_wrapped.score_model(model, loader)[0], scores)
            assert torch.equal(on_wrapped.score_model(compiled, loader)[0], scores)
    # The Mixup source splits the model they wrap (its children run uncompiled there).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mixed = [GROOD(ood_prototype=Mixup(layer=layer)).fit_model(m, loader, features="8")
                 for m, layer in ((model, "4"), (compiled, "4"), (both, "_orig_mod.module.4"))]
    assert all(torch.equal(d.ood_prototype_, mixed[0].ood_prototype_) for d in mixed[1:])
    with pytest.warns(UserWarning, match="reads features='_orig_mod.7' here, but was fitted on "
                                         "features='8'"):
        det.score_model(compiled, loader, features="_orig_mod.7")


def test_logits_of_other_shapes_are_read_or_refused_never_left_out():
    """A convolutional classifier's logits [B, C, 1, 1] are read as [B, C]; logits of any
    other shape ([B, T, C], [B]) are refused, naming it. Both were left out without a word,
    so the fit indexed the rows their nearest prototype gets right, not those the model
    gets right."""
    x, y = _images()

    class Convolutional(nn.Module):  # a 1 x 1 convolution for its classifier
        def __init__(self):
            super().__init__()
            torch.manual_seed(1)
            self.body, self.act = nn.Conv2d(1, 6, 3, padding=1), nn.ReLU()
            self.pool, self.head = nn.AdaptiveAvgPool2d(1), nn.Conv2d(6, 3, 1)

        def forward(self, images):
            return self.head(self.pool(self.act(self.body(images))))

    class Reshaped(Convolutional):
        def __init__(self, shape):
            super().__init__()
            self.shape = shape

        def forward(self, images):
            return super().forward(images).reshape(self.shape(images.shape[0]))

    model = Convolutional().eval()
    with torch.no_grad():
        feats = model.pool(torch.relu(model.body(x))).flatten(1)
        logits = model(x).flatten(1)
    assert 0 < int((logits.argmax(1) == y).sum()) < len(y)  # (the logits decide what is kept)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = GROOD().fit_model(model, [(x, y)], features="pool")
        ref = GROOD().fit(feats, y, logits=logits)
    assert torch.equal(det.indexed_rows_, ref.indexed_rows_)
    torch.testing.assert_close(det.score_model(model, [(x, y)])[0], ref.score_samples(feats))
    # ODIN, RankFeat and the Mixup source read them as [B, C] too (they were refused there)
    flat = Reshaped(lambda b: (b, 3)).eval()
    flat.load_state_dict(model.state_dict())
    torch.testing.assert_close(ODIN().score_model(model, [(x, y)])[0],
                               ODIN().score_model(flat, [(x, y)])[0])
    assert torch.equal(RankFeat(layers="act").score_model(model, [(x, y)])[0],
                       RankFeat(layers="act").score_model(flat, [(x, y)])[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mixed = [GROOD(ood_prototype=Mixup(layer="act")).fit_model(m, [(x, y)], features="pool")
                 for m in (model, flat)]
    assert torch.equal(mixed[0].ood_prototype_, mixed[1].ood_prototype_)
    # (the first forward is the fit's probe of one input)
    for shape, shown in ((lambda b: (b, 1, 3), r"\(1, 1, 3\)"), (lambda b: (b * 3,),
                                                                   r"\(3,\)")):
        with pytest.raises(ValueError, match=rf"the model's logits have shape {shown} for a "
                                             r"batch of 1 input\(s\); grood reads one row "
                                             r"of class logits per input, \[1, C\]"):
            GROOD().fit_model(Reshaped(shape).eval(), [(x, y)], features="pool")


def test_a_map_or_sequence_read_flattened_is_warned_of():
    """Naming a module whose output is a map ("layer4"'s [B, 2048, 7, 7]) or a sequence of
    tokens reads it flattened (100,352 columns there) without a word, though GROOD is meant
    for one vector per input and the index holds a row of those columns per training input:
    the first batch warns; a pooled [B, 8, 1, 1] does not."""
    x, y = _images(12)
    model = small_cnn().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        det = GROOD().fit_model(model, [(x, y)], features="2")  # a max-pooled 4 x 4 x 4 map
        pooled = GROOD().fit_model(model, [(x, y)], features="5")
    said = [str(w.message) for w in caught if "read flattened" in str(w.message)]
    assert det.n_features_in_ == 64 and pooled.n_features_in_ == 8
    assert said and all(m.startswith("features='2' gives a [B, 4, 4, 4] output each batch, "
                                      "read flattened as 64 columns: GROOD works on the "
                                      "penultimate feature") for m in said)


def test_a_torchscript_model_is_refused_by_name():
    """A scripted or traced model's modules take no forward hooks: reading a named layer of
    one was torch's RuntimeError from deep in the extractor; now a ValueError names the
    layer and the way out, for fitting, scoring and attach() alike."""
    x, y = _images(12)
    model = small_cnn().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = GROOD().fit_model(model, [(x, y)], features="8")
    for scripted in (torch.jit.script(model), torch.jit.trace(model, x[:2])):
        message = (r"features='8' names a module of a TorchScript model, whose modules take "
                   r"no hooks to read it by: give the model before torch.jit.script")
        for call in (lambda m: det.score_model(m, [(x, y)]),
                     lambda m: GROOD().fit_model(m, [(x, y)], features="8"),
                     lambda m: det.attach(m, features="8")):
            with pytest.raises(ValueError, match=message):
                call(scripted)


def test_score_model_names_the_loader_batch_an_error_comes_from():
    """Features the model gives with NaN or Inf are named by the loader's batch and the row in
    it (row numbers alone were ambiguous over a loader)."""
    x, y = _images()
    model = small_cnn()
    det = GROOD().fit_model(model, DataLoader(TensorDataset(x, y), batch_size=16), features="8")
    images = x.clone()
    images[37] = float("inf")
    with pytest.raises(RowsRefusedError, match=r"^the loader's batch 2 \(numbered from 0\): "
                                               r"features contains NaN or Inf in row\(s\) 5$"
                       ) as caught:
        det.score_model(model, DataLoader(TensorDataset(images), batch_size=16))
    assert caught.value.rows == [5]


def test_kneighbors_warns_that_a_shuffling_fit_loaders_rows_name_no_sample(tmp_path):
    """fit_model on a loader that shuffles numbers the training rows in that pass's order,
    which the loader does not repeat: the neighbours' rows looked up in the dataset named
    other images, silently. kneighbors (arrays, model, after save and load) says so; the
    scores are those of the unshuffled fit, and an unshuffled fit gives no warning."""
    from torch.utils.data import SubsetRandomSampler

    x, y = _images()
    model = small_cnn()
    plain = GROOD().fit_model(model, DataLoader(TensorDataset(x, y), batch_size=16),
                              features="8")
    torch.manual_seed(0)
    fits = [GROOD().fit_model(model, DataLoader(TensorDataset(x, y), batch_size=16,
                                                shuffle=True), features="8"),
            GROOD().fit_model(model, DataLoader(TensorDataset(x, y), batch_size=16,
                                                sampler=SubsetRandomSampler(range(60))),
                              features="8")]
    fits[0].save(tmp_path / "d.safetensors")
    fits.append(GROOD.load(tmp_path / "d.safetensors"))
    from grood.cli import info_lines
    from grood.persistence import describe

    assert "training rows in the order of a shuffling loader's pass" in "\n".join(
        info_lines(describe(tmp_path / "d.safetensors")))
    said = r"fitted on a loader that shuffles: its training-row numbers"
    test = DataLoader(TensorDataset(x[:8]), batch_size=4)
    feats = FeatureExtractor(model, features="8")(x[:8]).features
    for det in fits:
        assert det.extractor_["row_order"] == "shuffled"
        torch.testing.assert_close(det.score_model(model, test)[0],
                                   plain.score_model(model, test)[0])
        with pytest.warns(UserWarning, match=said) as caught:
            det.kneighbors(feats, 2)
        assert caught[0].filename == __file__
        with pytest.warns(UserWarning, match=said):
            det.kneighbors_model(model, test, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain.kneighbors(feats, 2)
        plain.kneighbors_model(model, test, 2)
    assert "row_order" not in plain.extractor_


def test_results_per_sample_of_a_shuffling_loader_are_warned_of(tmp_path):
    """score_model, predict_model, kneighbors_model and score_batches return one result per
    sample in the order of their own pass over the loader: of a loader that shuffles, that
    order names no sample, and scores matched to the dataset's labels were wrong, silently.
    Each warns, at the caller's line; calibrate_model (a quantile) and an unshuffled loader
    do not. fit_batches on such a loader is recorded, as fit_model's is."""
    from torch.utils.data import DistributedSampler, WeightedRandomSampler

    x, y = _images()
    model = small_cnn()
    det = GROOD().fit_model(model, DataLoader(TensorDataset(x, y), batch_size=16),
                            features="8")
    held_out, held_y = _images(20, seed=5)
    torch.manual_seed(0)
    shuffled = DataLoader(TensorDataset(held_out, held_y), batch_size=8, shuffle=True)
    plain = DataLoader(TensorDataset(held_out, held_y), batch_size=8)
    feats = FeatureExtractor(model, features="8")(x).features
    said = r"reads a loader that shuffles: its results come in the order of this pass"
    calls = {"score_model": lambda ld: det.score_model(model, ld),
             "predict_model": lambda ld: det.predict_model(model, ld),
             "kneighbors_model": lambda ld: det.kneighbors_model(model, ld, 2),
             "score_batches": lambda ld: list(det.score_batches(
                 DataLoader(TensorDataset(feats[:20]), batch_size=8,
                            shuffle=ld is shuffled)))}
    for name, call in calls.items():
        with pytest.warns(UserWarning, match=said) as caught:
            call(shuffled)
        assert caught[0].filename == __file__, name
        if name == "score_model":  # samples drawn at random, with weights
            weighted = DataLoader(TensorDataset(held_out), batch_size=8,
                                  sampler=WeightedRandomSampler(torch.ones(20), 20))
            with pytest.warns(UserWarning, match=said):
                call(weighted)
            # A DistributedSampler shuffles unless told not to (its default is shuffle=True).
            ds = TensorDataset(held_out)
            with pytest.warns(UserWarning, match="give its DistributedSampler shuffle=False"):
                call(DataLoader(ds, batch_size=8,
                                sampler=DistributedSampler(ds, num_replicas=2, rank=0)))
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                call(DataLoader(ds, batch_size=8, sampler=DistributedSampler(
                    ds, num_replicas=2, rank=1, shuffle=False)))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            call(plain)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", "the threshold was chosen on 20 row")  # (few rows)
        det.calibrate_model(model, shuffled)
    threshold = det.threshold_
    assert threshold == det.calibrate_model(model, plain).threshold_
    # fit_batches on feature batches that shuffle: the same record as fit_model's.
    fitted = GROOD().fit_batches(DataLoader(TensorDataset(feats, y), batch_size=16,
                                            shuffle=True))
    assert fitted.extractor_ == {"row_order": "shuffled"}
    with pytest.warns(UserWarning, match="fitted on a loader that shuffles"):
        fitted.kneighbors(feats[:4], 2)
    fitted.save(tmp_path / "b.safetensors")
    from grood.cli import info_lines
    from grood.persistence import describe

    text = "\n".join(info_lines(describe(tmp_path / "b.safetensors")))
    assert "in the order of a shuffling loader's pass" in text and "fit_model" not in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unshuffled = GROOD().fit_batches(DataLoader(TensorDataset(feats, y), batch_size=16))
        unshuffled.kneighbors(feats[:4], 2)
    assert not hasattr(unshuffled, "extractor_")


def test_a_loader_that_is_an_array_and_a_bad_n_neighbors_are_named_before_the_model_runs():
    """An array given as the loader yields its rows, each run through the model as a batch of
    its own (one image [1, 8, 8] through a Conv2d expecting a batch, or a feature row of 1
    column); n_neighbors out of range was found after the model's first batch."""
    x, y = _images()
    model = small_cnn()
    det = GROOD().fit_model(model, DataLoader(TensorDataset(x, y), batch_size=16), features="8")
    for loader in (x, x.numpy()):
        for call in (det.score_model, det.predict_model, det.kneighbors_model,
                     lambda m, ld: det.fit_model(m, ld, features="8")):
            with pytest.raises(TypeError, match=r"^the loader must yield batches, got a "
                                                r"(Tensor|ndarray) \(iterating it gives single "
                                                r"rows\): pass \[\(inputs,\)\]"):
                call(model, loader)
    with pytest.raises(TypeError, match=r"^the loader must yield batches, got a dict "
                                        r"\(iterating it gives its keys\): pass .* \(one dict "
                                        r"batch: \[batch\]\)"):  # ("got str" before)
        det.score_model(model, {"data": x, "label": y})
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    for bad, said in ((0, "n_neighbors must be a positive integer, got 0"),
                      (10_000, "n_neighbors=10000 but the index holds only")):
        with pytest.raises(ValueError, match=f"^{said}"):
            det.kneighbors_model(model, [x[:4]], bad)
    assert not calls


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes are Python 3.11+")
def test_a_model_that_fails_on_a_batch_is_named_with_the_batch():
    """The model's own error passes unchanged, with a note saying which loader batch (and
    input shape) it was running on."""
    x, y = _images()
    model = small_cnn()
    det = GROOD().fit_model(model, DataLoader(TensorDataset(x, y), batch_size=16), features="8")
    odd = [x[:4], torch.rand(4, 2, 8, 8)]  # two channels where the model takes one
    with pytest.raises(RuntimeError) as failed:
        det.score_model(model, odd)
    assert ("grood (grood score): raised running the model on the loader's batch 1 (numbered "
            "from 0), inputs of shape (4, 2, 8, 8)") in failed.value.__notes__


def test_an_early_index_needs_a_feature_list_model():
    """early=2 with a hooked features module read nothing (no feature list is made)."""
    with pytest.raises(ValueError, match=r"early=2 indexes the feature list.*features=None"):
        FeatureExtractor(ResNetLike(), features="avgpool", early=2)
    with pytest.raises(TypeError, match="early must be a module name or an index"):
        FeatureExtractor(ResNetLike(), early=True)
    with pytest.raises(TypeError, match="features must be a module name"):
        GROOD().fit_model(small_cnn(), [_images(6)], features=8)  # 8: not the name "8"
    with pytest.raises(TypeError, match="features must be a module name"):
        GROOD().fit(torch.rand(6, 16), torch.arange(6) % 2).attach(small_cnn(), features=8)
    out = FeatureExtractor(ResNetLike(), early=0)(torch.rand(2, 1, 8, 8))
    assert out.early.shape == (2, 6 * 8 * 8)


def test_a_module_that_runs_more_or_less_than_once_is_refused():
    """A module used at several places (one activation module shared by layers) has no single
    output: its last call's output was taken silently."""

    class SharedReLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.unused = nn.Linear(6, 6), nn.Linear(6, 3), nn.Linear(6, 6)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.b(self.act(self.a(self.act(x))))

    model = SharedReLU()
    x = torch.rand(4, 6)
    with pytest.raises(ValueError, match=r"module 'act' \(features\) ran 2 times"):
        FeatureExtractor(model, features="act")(x)
    with pytest.raises(ValueError, match=r"module 'unused' \(early\) ran 0 times"):
        FeatureExtractor(model, features="a", early="unused")(x)
    out = FeatureExtractor(model, features="a")(x)
    torch.testing.assert_close(out.features, model.a(model.act(x)))


@pytest.mark.parametrize("dtype", [torch.int8, torch.float32, torch.float64])
def test_extractor_refuses_an_autocast_dtype_torch_would_ignore(dtype):
    """torch.autocast warns and runs in full precision for other dtypes; the extractor says
    so instead of silently running something other than what was asked."""
    with pytest.raises(ValueError, match=r"autocast must be torch\.float16, torch\.bfloat16"):
        FeatureExtractor(small_cnn(), features="8", autocast=dtype)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_extractor_names_an_unusable_device():
    with pytest.raises(ValueError, match="needs CUDA, but this torch"):
        GROOD().fit_model(small_cnn(), [(torch.rand(4, 1, 8, 8), torch.arange(4) % 2)],
                          features="8", device="cuda")


def test_split_of_a_sequential_model_and_refusal_for_a_residual_one():
    x, _ = _images(8)
    model = small_cnn()
    stem, tail = split_model(model, "2")
    check_split(model, stem, tail, x)
    res = ResNetLike()
    stem, tail = split_model(res, "layer1")
    with pytest.raises(ValueError, match="cannot be split"):
        check_split(res, stem, tail, x)
    with pytest.raises(ValueError, match="not one of its top-level children"):
        split_model(res, "layer9")


def _train(model, x, y, steps=150):
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained():
    x, y = _images(90)
    return _train(small_cnn(), x, y), x, y


def test_fit_model_equals_fit_on_extracted_features(trained):
    model, x, y = trained
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    det = GROOD(batch_size=16).fit_model(model, loader, features="8")
    feats, logits, labels = FeatureExtractor(model, features="8").extract(loader)
    ref = GROOD().fit(feats, labels, logits=logits)
    torch.testing.assert_close(det.class_prototypes_, ref.class_prototypes_)
    assert det.index_.ntotal == ref.index_.ntotal
    test, _ = _images(30, seed=5)
    scores, preds = det.score_model(model, DataLoader(TensorDataset(test), batch_size=7))
    torch.testing.assert_close(scores, ref.score_samples(FeatureExtractor(
        model, features="8")(test).features))
    assert torch.equal(preds, det.predict_model(model, [test]))
    # Neighbours from the loader: training rows of the loader fit_model read, in its order.
    dists, rows = det.kneighbors_model(model, DataLoader(TensorDataset(test), batch_size=7), 2)
    assert torch.equal(det.indexed_rows_, ref.indexed_rows_)
    ref_d, ref_r = ref.kneighbors(FeatureExtractor(model, features="8")(test).features, 2)
    assert torch.equal(rows, ref_r) and dists.device.type == "cpu"
    torch.testing.assert_close(dists, ref_d)
    assert torch.equal(0.0 - dists[:, 0], scores)
    # Layer "7" (the Linear before the ReLU "8") has the same width: no shape error would
    # tell, so scoring another layer than the fitted one warns.
    with pytest.warns(UserWarning, match="fitted on features='8'"):
        det.score_model(model, [test], features="7")
    # A name the model lacks is an error alone (it came after a warning about that layer).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="features='77' is not a module of the model"):
            det.score_model(model, [test], features="77")
    # Refitted from arrays, the detector no longer claims a layer (a stale one was kept).
    det.fit(feats, labels)
    assert not hasattr(det, "extractor_")


def _refuse_empty(_module, args):
    """A forward pre-hook: the module refuses an input of 0 rows (as a model that reshapes
    with ``x.view(x.shape[0], -1)`` does)."""
    if args[0].shape[0] == 0:
        raise RuntimeError("this model cannot take an empty batch")


def test_empty_batches_of_a_loader_add_no_rows_and_do_not_run_the_model(trained):
    """A batch of 0 rows (a collate that dropped every unreadable image of one) crashed
    extraction in reshape(0, -1); now the model is not run on it and it adds no rows, first,
    in the middle or last, on every path that reads a loader."""
    model, x, y = trained
    plain = [(x[:32], y[:32]), (x[32:64], y[32:64]), (x[64:], y[64:])]
    empty = (x[:0], y[:0])
    gappy = [empty, plain[0], empty, empty, plain[1], plain[2], empty]
    test, _ = _images(30, seed=5)
    ref = GROOD().fit_model(model, plain, features="8")
    ref_scores, ref_preds = ref.score_model(model, plain)
    ref_mixup = GROOD(ood_prototype=Mixup(layer="2")).fit_model(model, plain, features="8")
    handle = model[0].register_forward_pre_hook(_refuse_empty)
    try:
        det = GROOD().fit_model(model, gappy, features="8")
        assert torch.equal(det.class_prototypes_, ref.class_prototypes_)
        assert torch.equal(det.indexed_rows_, ref.indexed_rows_)
        scores, preds = det.score_model(model, gappy)
        assert torch.equal(scores, ref_scores) and torch.equal(preds, ref_preds)
        dists, rows = det.kneighbors_model(model, [empty, (test,), empty], 2)
        ref_d, ref_r = ref.kneighbors_model(model, [(test,)], 2)
        assert torch.equal(dists, ref_d) and torch.equal(rows, ref_r)
        mixup = GROOD(ood_prototype=Mixup(layer="2")).fit_model(model, gappy, features="8")
        assert torch.equal(mixup.ood_prototype_, ref_mixup.ood_prototype_)
        held_out, held_y = _images(30, seed=6)
        noise = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(7))
        ev = evaluate_model(det, model, [(held_out, held_y), empty], {"noise": [empty, (noise,)]})
        assert torch.equal(torch.as_tensor(ev.scores["GROOD"]["noise"]),
                           ref.score_model(model, [(noise,)])[0])
        # A loader of empty batches only: nothing gives the outputs' widths.
        with pytest.raises(ValueError, match=r"each of the loader's 2 batch\(es\) has 0 rows"):
            det.score_model(model, [empty, empty])
    finally:
        handle.remove()
    # A model that takes an empty batch gives the widths: 0 scores, as score_batches gives.
    scores, preds = ref.score_model(model, [empty, empty])
    assert scores.shape == preds.shape == (0,)
    with pytest.raises(ValueError, match="every batch has 0 rows"):
        GROOD().fit_model(model, [empty], features="8")


def test_mixup_at_lambda_one_is_the_samples_own_feature(trained):
    model, x, y = trained
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    det = GROOD(ood_prototype=Mixup(layer="2", lam=1.0)).fit_model(model, loader, features="8")
    feats, _, _ = FeatureExtractor(model, features="8").extract(loader)
    torch.testing.assert_close(det.ood_prototype_, feats.mean(0), rtol=1e-5, atol=1e-6)


def test_fit_model_refuses_a_one_pass_loader_before_running_the_model(trained):
    """A generator (or ``iter(loader)``) was run through the model for the prototypes and only
    found empty on the index's pass; the whole first pass was wasted."""
    model, x, y = trained
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        for loader in ((b for b in [(x[:45], y[:45]), (x[45:], y[45:])]),
                       iter(DataLoader(TensorDataset(x, y), batch_size=32))):
            with pytest.raises(TypeError, match="train_loader must be re-iterable"):
                GROOD().fit_model(model, loader, features="8")
        assert not calls
    finally:
        handle.remove()


@pytest.mark.parametrize("where, autocast", [("host", None), ("folder", None),
                                             ("folder", torch.bfloat16)])
def test_fit_model_with_a_cache_runs_the_model_once_and_fits_the_same_detector(
        trained, tmp_path, where, autocast):
    """cache= keeps the first pass's features, labels and logits (in host memory, or in files
    in a temporary folder removed after the fit) for the second pass, which ran the model over
    the whole loader again; the detector is the one the two passes give, bit for bit."""
    model, x, y = trained
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    rows = []
    handle = model.register_forward_hook(lambda _m, args, _o: rows.append(args[0].shape[0]))
    try:
        ref = GROOD().fit_model(model, loader, features="8", autocast=autocast)
        ran, rows[:] = sum(rows), []
        det = GROOD().fit_model(model, loader, features="8", autocast=autocast,
                                cache=str(tmp_path) if where == "folder" else where)
        assert sum(rows) == ran - len(x)  # one pass over the loader fewer
    finally:
        handle.remove()
    assert list(tmp_path.iterdir()) == []
    for name in ("class_prototypes_", "class_counts_", "ood_prototype_", "indexed_rows_"):
        assert torch.equal(getattr(det, name), getattr(ref, name)), name
    assert torch.equal(det.index_.vectors, ref.index_.vectors)
    test, _ = _images(30, seed=5)
    assert torch.equal(det.score_model(model, [test])[0], ref.score_model(model, [test])[0])
    assert det.extractor_ == ref.extractor_


def test_fit_model_cache_is_checked_before_the_model_runs_and_removed_after_a_failure(
        trained, tmp_path):
    model, x, y = trained
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    (tmp_path / "a-file").write_text("")
    try:
        for cache, what in (("memory", "no such folder"), (tmp_path / "absent", "no such folder"),
                            (tmp_path / "a-file", "not a folder"), (3, "int")):
            with pytest.raises(ValueError, match=rf"cache must be 'host' \(the batches kept in "
                                                 rf"host memory\) or a folder to keep them in, "
                                                 rf"got .* \({what}\)"):
                GROOD().fit_model(model, [(x, y)], features="8", cache=cache)
        assert not calls
    finally:
        handle.remove()
    # a batch refused during the first pass: the batches kept so far are removed with their
    # folder
    bad = x.clone()
    bad[70] = float("nan")
    with pytest.raises(ValueError, match=r"features contains NaN or Inf in row\(s\) 70"):
        GROOD().fit_model(model, DataLoader(TensorDataset(bad, y), batch_size=32),
                          features="8", cache=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@pytest.mark.parametrize("where", ["host", "folder"])
def test_kept_batches_are_given_back_as_given_with_the_logits_class_and_a_short_file_named(
        tmp_path, where):
    """Features and labels come back as they were given (dtype, shape, values); logits as the
    one-hot row of the class they pick, in their dtype (8 bytes a row kept, not C values)."""
    from grood._cache import BatchCache

    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(3, 4, generator=gen).to(dtype), torch.arange(3), logits)
               for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
               for logits in (None, torch.randn(3, 5, generator=gen).to(dtype))] + [
        (torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), torch.zeros(0, 5)),
        (torch.ones(2, 4), None, torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]]))]  # ties
    made = []

    def make():
        made.append(1)
        return iter(batches)

    kept = BatchCache(make, tmp_path if where == "folder" else "host", show=False)
    next(kept())  # a peek keeps nothing: the next iteration calls make again
    assert all(a is b for got, given in zip(kept(), batches, strict=True)  # (the recording)
               for a, b in zip(got, given, strict=True))
    for _ in range(2):
        got = list(kept())
        assert len(made) == 2 and len(got) == len(batches)
        for (x, y, lg), (x0, y0, lg0) in zip(got, batches, strict=True):
            assert x.dtype == x0.dtype and torch.equal(x, x0)
            assert (y is None and y0 is None) or torch.equal(y, y0)
            if lg0 is None:
                assert lg is None
                continue
            assert lg.dtype == lg0.dtype and lg.shape == lg0.shape
            assert torch.equal(lg.argmax(dim=1), lg0.argmax(dim=1))
            assert torch.equal(lg, torch.nn.functional.one_hot(lg0.argmax(dim=1),
                                                               lg0.shape[1]).to(lg0.dtype))
    if where == "host":
        return
    (folder,) = tmp_path.iterdir()
    assert (folder / "logits").stat().st_size == 8 * (4 * 3 + 2)
    features = folder / "features"
    features.write_bytes(features.read_bytes()[:-2])
    with pytest.raises(OSError, match=r"features is shorter than the batches kept in it"):
        list(kept())
    kept.close()
    assert list(tmp_path.iterdir()) == []


def test_mixup_refuses_a_loader_empty_on_its_second_pass(trained):
    """A loader that gave nothing on mixup's mixing pass made the origin the prototype."""
    from grood.prototypes import PrototypeContext
    from grood.sources import ModelContext

    model, x, y = trained

    class Once:  # yields its batch on the first iteration only
        def __init__(self):
            self.used = False

        def __iter__(self):
            batches = [] if self.used else [(x, y)]
            self.used = True
            return iter(batches)

    ex = FeatureExtractor(model, features="8")
    ctx = PrototypeContext(ex(x).features[:3], {"model": ModelContext(ex, Once(), (1, 8, 8))})
    with pytest.raises(ValueError, match="mixup's pass over the training loader yielded no"):
        Mixup(layer="2").build(ctx)


def test_mixup_and_noise_are_finite_deterministic_and_differ(trained):
    model, x, y = trained
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    protos = {}
    for source in (Mixup(layer="5", lam=0.5), UniformNoise(n_samples=64, batch_size=32),
                   "mean"):
        a = GROOD(ood_prototype=source).fit_model(model, loader, features="8")
        b = GROOD(ood_prototype=source).fit_model(model, loader, features="8")
        assert bool(torch.isfinite(a.ood_prototype_).all())
        assert torch.equal(a.ood_prototype_, b.ood_prototype_)
        protos[str(source)] = a.ood_prototype_
    values = list(protos.values())
    assert not torch.allclose(values[0], values[1]) and not torch.allclose(values[0], values[2])


@pytest.mark.filterwarnings("ignore:the logits classify")  # an untrained model
def test_mixup_needs_a_splittable_model_or_an_explicit_split():
    x, y = _images(30)
    model = ResNetLike()
    loader = [(x, y)]
    with pytest.raises(ValueError, match="cannot be split"):
        GROOD(ood_prototype=Mixup(layer="layer1")).fit_model(model, loader, features="avgpool")
    with pytest.raises(ValueError, match=r"mixup needs the intermediate layer: layer='name' "
                                         r"of a top-level child module, or split=\(stem, tail\)"):
        GROOD(ood_prototype=Mixup(layer=None)).fit_model(model, loader, features="avgpool")

    class Stem(nn.Module):
        def forward(self, x):
            return model.layer1(torch.relu(model.stem(x)))

    class Tail(nn.Module):
        def forward(self, e):
            return model.fc(model.avgpool(model.layer2(e)).flatten(1) * 2.0)

    det = GROOD(ood_prototype=Mixup(layer="layer1", split=(Stem(), Tail()))).fit_model(
        model, loader, features="avgpool")
    assert bool(torch.isfinite(det.ood_prototype_).all())
    # With a split the layer's name is not needed.
    unnamed = GROOD(ood_prototype=Mixup(layer=None, split=(Stem(), Tail()))).fit_model(
        model, loader, features="avgpool")
    assert torch.equal(unnamed.ood_prototype_, det.ood_prototype_)


def test_noise_keeps_the_lowest_energy_images(trained):
    model, x, y = trained
    source = UniformNoise(n_samples=40, batch_size=40, keep=0.25, seed=3)
    det = GROOD(ood_prototype=source).fit_model(model, [(x, y)], features="8")
    imgs = source.images(40, (1, 8, 8), torch.Generator().manual_seed(3))
    out = FeatureExtractor(model, features="8")(imgs)
    keep = torch.logsumexp(out.logits, 1).argsort()[:10]
    torch.testing.assert_close(det.ood_prototype_, out.features[keep].mean(0), rtol=1e-5,
                               atol=1e-6)


def test_gaussian_blur_preserves_mean_and_smooths():
    gen = torch.Generator().manual_seed(0)
    imgs = torch.rand(3, 2, 16, 16, generator=gen)
    out = gaussian_blur(imgs, torch.tensor([0.5, 1.5, 4.0]), 7)
    assert out.shape == imgs.shape
    torch.testing.assert_close(out.mean((2, 3)), imgs.mean((2, 3)), rtol=0.05, atol=0.02)
    spread = out.std((1, 2, 3))
    assert bool(spread[0] > spread[1] > spread[2])


def test_ood_loader_feeds_the_features_source(trained):
    """Its mean feature is the OOD prototype, and each of its rows is fingerprinted (the fit
    sees the mean alone), so evaluating on part of it warns."""
    from grood import evaluate
    from grood.prototypes import fingerprint_rows

    model, x, y = trained
    ood = torch.rand(20, 1, 8, 8)
    det = GROOD(ood_prototype="features").fit_model(model, [(x, y)], features="8",
                                                     ood_loader=[ood[:12], ood[12:]])
    feats = FeatureExtractor(model, features="8")(ood).features
    torch.testing.assert_close(det.ood_prototype_, feats.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(det.ood_fingerprints_, fingerprint_rows(feats))
    with pytest.warns(UserWarning, match="part: 5 of its 10 rows repeat rows the detector's "
                                         "OOD prototype was averaged from"):
        evaluate(det, FeatureExtractor(model, features="8")(x + 0.01).features,
                 {"part": torch.cat([feats[:5], feats[:5] + 1])})


@pytest.mark.filterwarnings("ignore:features='2' gives a:UserWarning")  # (a map, on purpose)
def test_ood_loader_that_is_empty_or_of_another_width_is_refused(trained):
    """An OOD loader that yielded nothing made the origin the OOD prototype, silently; one
    whose flattened feature map had another width failed inside torch's broadcasting."""
    model, x, y = trained
    with pytest.raises(ValueError, match="the OOD loader yielded no samples"):
        GROOD(ood_prototype="features").fit_model(model, [(x, y)], features="8",
                                                  ood_loader=[])
    with pytest.raises(ValueError, match="OOD loader gives features of width 16, the "
                                         "training loader 64"):  # pooled maps 4 x 2 x 2 / 4 x 4
        GROOD(ood_prototype="features").fit_model(model, [(x, y)], features="2",
                                                  ood_loader=[x[:, :, ::2, ::2]])


def test_ood_loader_rows_with_nan_are_named_in_the_loaders_order(trained):
    """An OOD sample whose features hold Inf is named by its place in the OOD loader: the
    seventeenth (row 16) was named as row 4, its place in the batch after a first of twelve."""
    model, x, y = trained
    ood = torch.rand(20, 1, 8, 8)
    ood[16] = float("inf")
    with pytest.raises(RowsRefusedError, match=r"OOD features contains NaN or Inf in "
                                               r"row\(s\) 16$") as caught:
        GROOD(ood_prototype="features").fit_model(model, [(x, y)], features="8",
                                                  ood_loader=[ood[:12], ood[12:]])
    assert caught.value.rows == [16]


def test_labels_as_lists_or_arrays_are_read(trained):
    """A collate_fn giving labels as a list or NumPy array: they were taken for no labels
    (tuples) or failed on ``.to`` (dicts)."""
    model, x, y = trained
    ref = GROOD().fit_model(model, [(x, y)], features="8")
    for batch in ((x, y.tolist()), (x, y.numpy()), {"data": x, "label": y.tolist()}):
        det = GROOD().fit_model(model, [batch], features="8")
        assert torch.equal(det.class_prototypes_, ref.class_prototypes_)
    with pytest.raises(ValueError, match="carry no labels"):  # file names are not labels
        GROOD().fit_model(model, [(x, [f"img{i}.png" for i in range(len(x))])], features="8")


def test_loader_without_labels_is_refused_saying_where_they_belong(trained):
    """Text where the labels belong (a collate that keeps class names) is named as such; the
    refusal said only "carry no labels"."""
    model, x, y = trained
    for batch in (x, (x,), {"data": x}):
        with pytest.raises(ValueError, match=r"carry no labels; each batch must carry them: "
                                             r"\(inputs, labels\) tuples, or dicts with labels "
                                             r"under 'label'$"):
            GROOD().fit_model(model, [batch], features="8")
    names = [["ant", "bee", "cat"][int(c)] for c in y]
    for batch, where in (((x, names), "as the second element"),
                         ({"data": x, "target": names}, "under 'target'")):
        with pytest.raises(ValueError, match=rf"carry no labels; the first batch holds text "
                                             rf"{where} \('ant', 'bee', 'cat'\): class names\?"):
            GROOD().fit_model(model, [batch], features="8")


def test_source_parameters_are_checked_and_kept_as_plain_numbers():
    """Mixup and UniformNoise refuse parameters that would silently mean something else
    (n_samples=0 read as "all", an even blur kernel, an inverted range, a string λ) and keep
    numpy numbers as Python ones, so a detector's saved header stays JSON."""
    import json

    import numpy as np

    mixup = Mixup(layer="1", lam=np.float32(0.25), n_samples=np.int64(10))
    noise = UniformNoise(n_samples=np.int64(40), keep=np.float64(0.5), batch_size=np.int32(8))
    json.dumps([mixup.params(), noise.params()])
    assert mixup.params()["n_samples"] == 10 and noise.params()["batch_size"] == 8
    bad = [
        (lambda: Mixup(n_samples=0), "n_samples must be a positive integer"),
        (lambda: Mixup(lam="0.5"), "lam must be a real number"),
        (lambda: Mixup(lam=float("nan")), "lam must be a finite real number"),
        (lambda: UniformNoise(kernel_size=4), "kernel_size must be odd"),
        (lambda: UniformNoise(kernel_size=0), "kernel_size must be a positive integer"),
        (lambda: UniformNoise(sigma_range=(-1.0, 2.0)), "sigma_range must be"),
        (lambda: UniformNoise(value_range=(1.0, 0.0)), "value_range must be"),
        (lambda: UniformNoise(seed=1.5), "seed must be an integer"),
        (lambda: UniformNoise(n_samples=0), "n_samples must be a positive integer"),
        # Shapes that failed in Python's unpacking ("not enough values to unpack") or later.
        (lambda: UniformNoise(sigma_range=(1.0,)), r"sigma_range must be a pair \(low, high\), "
                                                   r"got \(1.0,\)"),
        (lambda: UniformNoise(sigma_range=1.0), "sigma_range must be a pair"),
        (lambda: UniformNoise(value_range=(0, 1, 2)), "value_range must be a pair"),
    ]
    for make, message in bad:
        with pytest.raises(ValueError, match=message):
            make()
    # A module where a name or a pair of modules belongs was kept until the fit.
    for make, message in (
            (lambda: Mixup(layer=nn.Linear(2, 2)), "layer must name a top-level child module"),
            (lambda: Mixup(layer=""), "layer must name"),
            (lambda: Mixup(layer=3), "layer must name"),
            (lambda: Mixup(split=nn.Linear(2, 2)), r"split must be \(stem, tail\)"),
            (lambda: UniformNoise(input_shape=5), "input_shape must be one input's shape")):
        with pytest.raises(TypeError, match=message):
            make()
    assert Mixup(None, split=[nn.Identity(), nn.Identity()]).params()["layer"] is None
    assert UniformNoise(sigma_range=np.array([0.5, 2.0])).params()["sigma_range"] == [0.5, 2.0]


def vgg_like():
    """nn.ReLU(inplace=True) after every layer, as in torchvision's VGG and AlexNet."""
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Linear(16, 3),
    ).eval()


@pytest.mark.filterwarnings("ignore:the logits classify")  # an untrained model
def test_outputs_changed_in_place_later_are_read_as_the_named_module_gave_them():
    """A module whose output the next layer changes in place (nn.ReLU(inplace=True)): the
    extractor and an attached head read the post-ReLU values instead of the named module's,
    and mixup mixed the intermediate feature after the tail's ReLU had changed it, silently."""
    model, (x, y) = vgg_like(), _images(60)
    with torch.no_grad():
        linear = model[7](model[:7](x))  # the named module's own output: pre-ReLU
    assert bool((linear < 0).any())
    torch.testing.assert_close(FeatureExtractor(model, features="7")(x).features, linear,
                               rtol=0, atol=0)
    det = GROOD().fit(linear, y)
    with torch.no_grad():
        logits, score, _ = det.attach(model, features="7")(x)
    assert torch.equal(score, det.score_samples(linear)) and torch.equal(logits, model(x))

    loader = DataLoader(TensorDataset(x, y), batch_size=20)
    mixed_det = GROOD(ood_prototype=Mixup(layer="3", lam=0.5)).fit_model(model, loader,
                                                                        features="7")
    with torch.no_grad():  # mixup at the conv "3", whose output the tail's ReLU changes
        early = model[:4](x)
        protos = torch.stack([early[y == c].mean(0) for c in range(3)])
        second = model[4:](early.clone()).topk(2, dim=1).indices[:, 1]
        mixed = 0.5 * early + 0.5 * protos[second]
        want = model[7](model[4:7](mixed)).mean(0)
        first_27 = model[7](model[4:7](mixed[:27])).mean(0)
    torch.testing.assert_close(mixed_det.ood_prototype_, want, rtol=1e-5, atol=1e-6)
    # n_samples mixes the loader's first images only (here all 20 of one batch and 7 of the
    # next); the intermediate prototypes still come from every image.
    capped = GROOD(ood_prototype=Mixup(layer="3", lam=0.5, n_samples=27)).fit_model(
        model, loader, features="7")
    torch.testing.assert_close(capped.ood_prototype_, first_27, rtol=1e-5, atol=1e-6)


class _Output(dict):
    """A mapping output like Hugging Face's ``ModelOutput`` (an ordered dict subclass)."""


@dataclasses.dataclass
class _Record:
    logits: torch.Tensor
    hidden: torch.Tensor


class _Wrapped(nn.Module):
    """The trained model, its logits returned in another container."""

    def __init__(self, model, style):
        super().__init__()
        self.net, self.style = model, style

    def forward(self, x):
        logits = self.net(x)
        if self.style == "mapping":
            return _Output(logits=logits, hidden=x)
        if self.style == "dict-first":  # a dict whose first value is not the logits
            return {"hidden": x.flatten(1), "logits": logits}
        if self.style == "object":
            return _Record(logits=logits, hidden=x)
        if self.style == "no-logits":
            return {"out": logits}
        return "not an output"


@pytest.mark.parametrize("style", ["mapping", "dict-first", "object"])
def test_logits_returned_in_a_mapping_or_an_object_are_read(trained, style):
    # Without them fit would silently index the samples their nearest prototype gets right
    # rather than those the model gets right, and the noise source would find no energy.
    model, x, y = trained
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    wrapped = _Wrapped(model, style)
    plain = GROOD(ood_prototype=UniformNoise(n_samples=32, batch_size=16)).fit_model(
        model, loader, features="8")
    det = GROOD(ood_prototype=UniformNoise(n_samples=32, batch_size=16)).fit_model(
        wrapped, loader, features="net.8")
    _, logits, _ = FeatureExtractor(wrapped, features="net.8").extract(loader)
    torch.testing.assert_close(logits, model(x))
    assert det.index_.ntotal == plain.index_.ntotal == int((model(x).argmax(1) == y).sum())
    torch.testing.assert_close(det.ood_prototype_, plain.ood_prototype_)
    torch.testing.assert_close(det.score_model(wrapped, [x])[0], plain.score_model(model, [x])[0])
    # Mixup reads its second most likely class from a tail that returns such an output too.
    stem, tail = split_model(model, "5")
    mixed = Mixup(layer="5", split=(stem, lambda e: _Wrapped(tail, style)(e)))
    det = GROOD(ood_prototype=mixed).fit_model(wrapped, loader, features="net.8")
    ref = GROOD(ood_prototype=Mixup(layer="5")).fit_model(model, loader, features="8")
    torch.testing.assert_close(det.ood_prototype_, ref.ood_prototype_)


def test_an_output_without_readable_logits_is_refused_by_name(trained):
    model, x, y = trained
    with pytest.raises(ValueError, match=r"_Output|keys \['out'\] and no 'logits'"):
        GROOD().fit_model(_Wrapped(model, "no-logits"), [(x, y)], features="net.8")
    with pytest.raises(TypeError, match="returned a str"):
        GROOD().fit_model(_Wrapped(model, "other"), [(x, y)], features="net.8")


class _DictBlock(nn.Module):
    def forward(self, x):
        return {"hidden": x.flatten(1)}


class _DictBlockNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.block, self.fc = _DictBlock(), nn.Linear(64, 3)

    def forward(self, x):
        return self.fc(self.block(x)["hidden"])


def test_a_named_module_whose_output_is_not_a_tensor_is_refused_by_name():
    x, y = _images(12)
    with pytest.raises(TypeError, match=r"module 'block' \(features\) returned a dict"):
        GROOD().fit_model(_DictBlockNet(), [(x, y)], features="block")


class _TokenNet(nn.Module):
    """A ViT-like classifier: its penultimate feature is the class token, taken by slicing in
    forward, so no module outputs it; the head's input is the only module-level handle."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.embed = nn.Linear(8, 12)
        self.norm = nn.LayerNorm(12)
        self.heads = nn.Sequential()
        self.heads.add_module("head", nn.Linear(12, 3))

    def forward(self, x):
        tokens = self.norm(self.embed(x.reshape(x.shape[0], 8, 8)))  # [B, 8 tokens, 12]
        cls = tokens[:, 0]
        return self.heads(cls)


def test_features_can_be_a_modules_input():
    """features="heads.head:input" reads what the classifier receives (a ViT's class token):
    fit_model, score_model, the sources and attach() alike."""
    x, y = _images(60)
    model = _TokenNet().eval()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    with torch.no_grad():
        want = model.norm(model.embed(x.reshape(60, 8, 8)))[:, 0]
    feats, logits, _ = FeatureExtractor(model, features="heads.head:input").extract(loader)
    torch.testing.assert_close(feats, want)
    torch.testing.assert_close(logits, model(x))
    det = GROOD(ood_prototype=UniformNoise(n_samples=16, batch_size=8)).fit_model(
        model, loader, features="heads.head:input")
    ref = GROOD(ood_prototype="features").fit(feats, y, logits=logits,
                                              ood_features=det.ood_prototype_[None])
    torch.testing.assert_close(det.class_prototypes_, ref.class_prototypes_)
    scores, preds = det.score_model(model, [x])
    torch.testing.assert_close(scores, ref.score_samples(want))
    att_logits, att_scores, att_preds = det.attach(model, features="heads.head:input")(x)
    torch.testing.assert_close(att_logits, model(x))
    assert torch.equal(att_preds, preds)
    torch.testing.assert_close(att_scores, scores)
    # The input of a module that changes it in place is read as it came in.
    torch.manual_seed(3)
    relu_net = nn.Sequential(nn.Linear(64, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)).eval()
    flat = x.flatten(1)
    with torch.no_grad():
        pre = relu_net[0](flat)
    assert bool((pre < 0).any())
    torch.testing.assert_close(FeatureExtractor(relu_net, features="1:input")(flat).features, pre)
    det = GROOD().fit(pre, y)
    torch.testing.assert_close(det.attach(relu_net, features="1:input")(flat)[1],
                               det.score_samples(pre))
    # An input that is not a tensor, or a module name with the suffix that does not exist.
    with pytest.raises(ValueError, match=r"features='head:input' is not a module of the model "
                                         r"\(did you mean 'heads.head:input'\?"):
        FeatureExtractor(model, features="head:input")
    with pytest.raises(TypeError, match=r"module 'embed:input' \(features\) was called "
                                        "without a tensor"):
        FeatureExtractor(_KwargNet(), features="embed:input")(torch.rand(2, 1, 8, 8))


class _KwargNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Identity(), nn.Linear(64, 3)

    def forward(self, x):
        return self.head(self.embed(input=x.flatten(1)))


def test_calibrate_model_equals_calibrate_on_extracted_features(trained):
    """calibrate_model streams a held-out loader through the model (score_model's options)
    and sets the threshold calibrate sets on those features; a tpr out of range is refused
    before the model runs."""
    model, x, y = trained
    det = GROOD().fit_model(model, DataLoader(TensorDataset(x, y), batch_size=32),
                            features="8")
    val, _ = _images(40, seed=6)
    loader = DataLoader(TensorDataset(val), batch_size=16)
    det.calibrate_model(model, loader, tpr=0.9)
    ref = GROOD().fit_model(model, DataLoader(TensorDataset(x, y), batch_size=32),
                            features="8")
    ref.calibrate(FeatureExtractor(model, features="8")(val).features, tpr=0.9)
    assert det.calibration_ == ref.calibration_
    with pytest.warns(UserWarning, match=r"of the 48 calibration rows equal indexed training"):
        det.calibrate_model(model, DataLoader(TensorDataset(torch.cat([val, x[:8]])),
                                              batch_size=16), tpr=0.9)

    class Never(nn.Module):
        def forward(self, inp):
            raise AssertionError("the model ran")

    with pytest.raises(ValueError, match=r"tpr is a fraction in \(0, 1\]"):
        det.calibrate_model(Never(), loader, tpr=90)


def test_features_that_are_the_logits_are_named(trained):
    """features naming the classifier itself reads the logits: fit_model warns and names the
    classifier's input; the penultimate layer does not warn."""
    import warnings

    model, x, y = trained
    loader = [(x, y)]
    with pytest.warns(UserWarning, match=r"features='9' reads the model's logits.*"
                                         r"\(e\.g\. '9:input' when '9' is the classifier\)"
                      ) as record:
        GROOD().fit_model(model, loader, features="9")
    assert sum("reads the model's logits" in str(w.message) for w in record) == 1  # once
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GROOD().fit_model(model, loader, features="9:input")


def test_an_error_between_batches_leaves_grad_mode_and_the_models_modes_alone():
    """The extractor's pass held torch.no_grad() and the model's eval mode across each yield:
    an error raised by grood between two batches (a NaN feature) left the generator suspended
    inside both for as long as the traceback lived (a notebook keeps the last one), so the
    caller's next training step ran without gradients, or in eval mode (dropout and batch norm
    off, silently). They now hold only while the model runs on a batch."""
    x, y = _images()
    model = nn.Sequential(*small_cnn(), nn.Dropout(0.1))
    det = GROOD().fit_model(model, DataLoader(TensorDataset(x, y), batch_size=16),
                            features="8")
    model.train()
    bad = x.clone()
    bad[20] = float("nan")  # the second batch's features hold a NaN row
    kept = []
    for call in (lambda: det.score_model(model, DataLoader(TensorDataset(bad), batch_size=16)),
                 lambda: GROOD().fit_model(model, DataLoader(TensorDataset(bad, y),
                                                             batch_size=16), features="8")):
        with pytest.raises(ValueError, match="NaN") as caught:
            call()
        kept.append(caught)  # the traceback stays alive, as an interactive session keeps it
        assert torch.is_grad_enabled()
        assert all(m.training for m in model.modules())
    # Within a pass, the model runs in eval mode without gradients, as before.
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append((m.training,
                                                             torch.is_grad_enabled())))
    det.score_model(model, DataLoader(TensorDataset(x), batch_size=16))
    assert seen and set(seen) == {(False, False)}
    assert model.training
