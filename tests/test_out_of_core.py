"""Datasets larger than memory: memory-mapped files and iterables of batches."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from conftest import clustered_features

from grood import GROOD


def _arrays():
    x, y = clustered_features(300, 4, 10, seed=0, spread=0.5, dtype=torch.float32)
    logits = torch.nn.functional.one_hot(y, 4).float() * 3
    return x, y, logits


@pytest.mark.parametrize("style", ["list", "factory", "with-logits"])
def test_fit_batches_equals_fit(style):
    x, y, logits = _arrays()
    if style == "with-logits":
        batches = [(x[i:i + 64], y[i:i + 64], logits[i:i + 64]) for i in range(0, 300, 64)]
        ref = GROOD().fit(x, y, logits=logits)
    else:
        pieces = [(x[i:i + 64].numpy(), y[i:i + 64].numpy()) for i in range(0, 300, 64)]
        batches = pieces if style == "list" else (lambda: iter(pieces))
        ref = GROOD().fit(x, y)
    det = GROOD().fit_batches(batches)
    assert torch.equal(det.class_prototypes_, ref.class_prototypes_)
    assert torch.equal(det.index_.vectors, ref.index_.vectors)
    test = x[:50]
    got = torch.cat([s for s, _ in det.score_batches([test[:20], test[:0], test[20:]])])
    assert torch.equal(got, ref.score_samples(test))  # an empty batch yields empty results
    (s, p), = det.score_batches([test[:0].numpy()])
    assert s.shape == p.shape == (0,) and isinstance(s, np.ndarray)
    with pytest.raises(ValueError, match="features is empty"):
        det.score_and_predict(test[:0])
    # A DataLoader's (features, labels[, logits]) or [features] batches: the features scored.
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(test, y[:50]),
                                         batch_size=16)
    assert torch.equal(torch.cat([s for s, _ in det.score_batches(loader)]), got)
    alone = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(test), batch_size=16)
    assert torch.equal(torch.cat([s for s, _ in det.score_batches(alone)]), got)
    (s, p), = det.score_batches([(test.numpy(), y[:50].numpy(), logits[:50].numpy())])
    assert isinstance(s, np.ndarray) and np.array_equal(s, got.numpy())
    rows = list(test[:3].numpy())  # a batch given as a list of rows [D] is still one batch
    assert np.array_equal(next(det.score_batches([rows]))[0], got[:3].numpy())
    for one_array in (test, test.numpy()):  # iterated, it would be scored row by row
        with pytest.raises(TypeError, match="score_batches takes an iterable of batches"):
            next(det.score_batches(one_array))
    # A bad batch is named by its number: its row numbers are the batch's own.
    bad = test.clone()
    bad[23, 1] = float("nan")
    with pytest.raises(ValueError, match=r"^batch 2 \(numbered from 0\): features contains "
                                         r"NaN or Inf in row\(s\) 3$"):
        list(det.score_batches([bad[:20], test[:0], bad[20:]]))  # empty batches count too
    with pytest.raises(ValueError, match=r"^batch 2 \(numbered from 0\): features has 3 "):
        list(det.score_batches([test[:20], test[:0], test[20:, :3]]))


def test_fit_batches_refuses_a_generator_and_bad_batches():
    x, y, _ = _arrays()
    with pytest.raises(TypeError, match="used up after one pass"):
        GROOD().fit_batches(b for b in [(x, y)])
    with pytest.raises(TypeError, match=r"must be \(features, labels\)"):
        GROOD().fit_batches([x])
    # One array, or one batch as a dict, where the batches belong: its rows or keys were
    # read as batches ("batch 0 must be (features, labels) ..., got Tensor").
    for one, said in ((x, r"Tensor \(iterating it gives single rows\)"),
                      (x.numpy(), "ndarray"),
                      ({"features": x, "labels": y}, r"dict \(iterating it gives its keys\)")):
        with pytest.raises(TypeError, match=r"^the training data must be an iterable of "
                                            r"\(features, labels\) batches, got a " + said):
            GROOD().fit_batches(one)
    with pytest.raises(TypeError, match=r"^score_batches takes an iterable of batches \[B, D\]"
                                        r", got a dict"):
        next(GROOD().fit(x, y).score_batches({"features": x}))
    # A loader of dict samples (Hugging Face datasets, OpenOOD) yields dict batches: named
    # with their keys and how to give the arrays ("got dict" alone; score_batches said
    # "features must be a torch.Tensor or a numpy array, got dict").
    from torch.utils.data import DataLoader

    samples = [{"feats": a, "label": b} for a, b in zip(x, y, strict=True)]
    dicts = DataLoader(samples, batch_size=64)
    with pytest.raises(TypeError, match=r"^batch 0 must be \(features, labels\) or \(features, "
                                        r"labels, logits\), got dict \(keys 'feats', 'label'\): "
                                        r"pass the arrays themselves, e.g. lambda: \(\(b\['feats'"
                                        r"\], b\['label'\]\) for b in loader\)$"):
        GROOD().fit_batches(dicts)
    det = GROOD().fit_batches(lambda: ((b["feats"], b["label"]) for b in dicts))  # as it says
    assert torch.equal(det.class_prototypes_, GROOD().fit(x, y).class_prototypes_)
    with pytest.raises(TypeError, match=r"^score_batches takes batches of features \[B, D\], "
                                        r"got a dict \(keys 'feats', 'label'\): pass the arrays "
                                        r"themselves, e.g. \(b\['feats'\] for b in loader\)$"):
        next(det.score_batches(dicts))
    assert torch.equal(torch.cat([s for s, _ in det.score_batches(b["feats"] for b in dicts)]),
                       det.score_samples(x))
    with pytest.raises(ValueError, match=r"NaN or Inf in row\(s\) 67"):  # counted overall
        bad = x.clone()
        bad[67] = float("nan")
        GROOD().fit_batches([(bad[:64], y[:64]), (bad[64:], y[64:])])
    with pytest.raises(ValueError, match="features has 5 columns but the first training batch "
                                         f"has {x.shape[1]}"):
        GROOD().fit_batches([(x[:64], y[:64]), (x[64:, :5], y[64:])])


def test_a_loader_given_where_an_array_belongs_is_sent_to_the_streaming_methods():
    """A DataLoader or generator given to fit, score_samples, calibrate or evaluate was
    refused as "must be a torch.Tensor or a numpy array" alone; the error now names the
    methods that take batches. Other objects are refused as before."""
    from torch.utils.data import DataLoader, TensorDataset

    from grood import evaluate

    x, y, _ = _arrays()
    det = GROOD().fit(x, y)
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    said = (r"features must be a torch.Tensor or a numpy array, got {}; batches from a loader "
            r"go to the streaming methods: fit_batches / score_batches \(feature batches\), "
            r"fit_model / score_model / evaluate_model \(a model's inputs\)$")
    for call in (lambda v: GROOD().fit(v, y), det.score_samples, det.calibrate,
                 lambda v: evaluate(det, v, ood={"far": x})):
        for given, kind in ((loader, "DataLoader"), ((row for row in x), "generator")):
            with pytest.raises(TypeError, match=said.format(kind)):
                call(given)
    with pytest.raises(TypeError, match=r"got int$"):
        det.score_samples(5)


def test_fit_batches_with_ood_features_equals_fit():
    x, y, _ = _arrays()
    ood = x[:40] + 2.0
    ref = GROOD(ood_prototype="features").fit(x, y, ood_features=ood)
    det = GROOD(ood_prototype="features").fit_batches(
        [(x[:150], y[:150]), (x[150:], y[150:])], ood_features=ood.numpy())
    assert torch.equal(det.ood_prototype_, ref.ood_prototype_)
    assert torch.equal(det.score_samples(x[:30]), ref.score_samples(x[:30]))


def test_bad_streams_and_sources_are_named():
    from grood.prototypes import OODPrototypeSource

    x, y, logits = _arrays()
    with pytest.raises(ValueError, match="batches yielded nothing in the first pass"):
        GROOD().fit_batches(lambda: iter([]))
    with pytest.raises(ValueError, match="the training batches carry no labels"):
        GROOD().fit_batches([(x, None)])  # the classes counted from the labels
    with pytest.raises(ValueError, match=r"logits of shape \(150, 3\) do not match 150 rows "
                                         "and 4 classes"):
        GROOD().fit_batches([(x[:150], y[:150], logits[:150]),
                             (x[150:], y[150:], logits[150:, :3])])

    class Wrong(OODPrototypeSource):  # not registered: used as an object only
        name = "test-wrong-shape"

        def build(self, ctx):
            return ctx.class_prototypes[:, :3].mean(0)

    with pytest.raises(ValueError, match=r"OOD prototype source Wrong\(\) did not give a "
                                         r"finite vector of shape \[10\]"):
        GROOD(ood_prototype=Wrong()).fit_batches([(x, y)])


def test_batches_that_lose_their_labels_in_the_second_pass_are_refused():
    """A factory whose later passes give other batches: a batch without labels in the
    gradient-index pass is named (it was compared with the predictions as None)."""
    x, y, _ = _arrays()
    calls = []

    def factory():  # the first batch, the prototype pass, then the gradient-index pass
        calls.append(1)
        return iter([(x[:150], y[:150]), (x[150:], y[150:] if len(calls) < 3 else None)])

    with pytest.raises(ValueError, match="the training batches carry no labels"):
        GROOD().fit_batches(factory, n_classes=4)
    assert len(calls) == 3


def test_fit_batches_takes_empty_batches_and_refuses_mixed_logits():
    """Empty batches (a filtered stream) are skipped (counting the classes failed on one
    inside torch's max); logits given for some batches only would index those rows by the
    logits and the others by the nearest prototype: refused, in either order."""
    x, y, logits = _arrays()
    empty = (x[:0], y[:0])
    ref = GROOD().fit(x, y)
    for batches in ([empty, (x[:150], y[:150]), empty, (x[150:], y[150:])],
                    lambda: iter([(x[:150], y[:150]), empty, (x[150:], y[150:])])):
        det = GROOD().fit_batches(batches)
        assert torch.equal(det.index_.vectors, ref.index_.vectors) and det.n_train_ == 300
    with pytest.raises(ValueError, match="the batch at row 150 has no logits"):
        GROOD().fit_batches([(x[:150], y[:150], logits[:150]), (x[150:], y[150:])])
    with pytest.raises(ValueError, match="the batch at row 150 has logits and the first"):
        GROOD().fit_batches([(x[:150], y[:150]), (x[150:], y[150:], logits[150:])],
                            n_classes=4)
    with pytest.raises(ValueError, match="the training data is empty"):
        GROOD().fit_batches([empty, empty])
    with pytest.raises(ValueError, match="the training data is empty"):
        GROOD().fit_batches([empty], n_classes=3)
    for bad in (0, 4.0, "4"):
        with pytest.raises(ValueError, match="n_classes must be a positive integer"):
            GROOD().fit_batches([(x, y)], n_classes=bad)
    # A label beyond the class count says where the count came from.
    with pytest.raises(ValueError, match=r"class id 3, out of range for 3 classes \(n_classes\)"):
        GROOD().fit_batches([(x, y)], n_classes=3)
    with pytest.raises(ValueError, match=r"out of range for 3 classes \(the logits' columns\)"):
        GROOD().fit_batches([(x, y, logits[:, :3])])


def test_a_float64_batch_after_a_float32_one_is_named():
    """The detector computes in the first batch's precision: float64 batches after a float32
    first batch are rounded to float32, which a stream of numpy batches (float64 by default)
    beside tensors gives without meaning to. The fit says so, once, naming the row; batches
    the fit takes without loss (float32 or half after float64, one dtype throughout) pass
    without a word."""
    x, y, _ = _arrays()
    x64 = x.double()
    with pytest.warns(UserWarning, match=r"training batch at row 128 is float64 and the first "
                      r"batch is not: the detector computes in float32") as caught:
        det = GROOD().fit_batches([(x[:64], y[:64]), (x[64:128], y[64:128]),
                                   (x64[128:].numpy(), y[128:]), (x64[:0], y[:0])])
    assert det.class_prototypes_.dtype == torch.float32
    assert sum("is float64" in str(w.message) for w in caught) == 1
    for batches in ([(x64[:150], y[:150]), (x[150:], y[150:]), (x[:0].half(), y[:0])],
                    [(x[:150], y[:150]), (x[150:], y[150:])],
                    [(x64[:150], y[:150]), (x64[150:], y[150:])]):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            GROOD().fit_batches(batches)


def test_memmap_input_equals_in_memory(tmp_path):
    x, y, _logits = _arrays()
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "y.npy", y.numpy())
    xm = np.load(tmp_path / "x.npy", mmap_mode="r")
    ym = np.load(tmp_path / "y.npy", mmap_mode="r")
    det = GROOD(batch_size=50).fit(xm, ym)
    ref = GROOD(batch_size=50).fit(x, y)
    assert torch.equal(det.index_.vectors, ref.index_.vectors)
    np.testing.assert_array_equal(det.score_samples(xm), ref.score_samples(x).numpy())


#: The start of a memory probe: ``anon_mib()`` reads the process's anonymous memory and
#: ``sample()`` (run in a thread) keeps its peak in ``peak[0]`` until ``stop[0]``.
PROBE_PRELUDE = textwrap.dedent("""
    import gc, json, sys, threading, time
    import numpy as np
    import torch
    from grood import GROOD

    def anon_mib():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
        return 0.0

    peak, stop = [0.0], [False]
    def sample():
        while not stop[0]:
            peak[0] = max(peak[0], anon_mib())
            time.sleep(0.001)
""")

MEMORY_PROBE = PROBE_PRELUDE + textwrap.dedent("""
    folder = sys.argv[1]
    x = np.load(f"{folder}/x.npy", mmap_mode="r")
    y = np.load(f"{folder}/y.npy", mmap_mode="r")
    logits = np.load(f"{folder}/logits.npy", mmap_mode="r")
    det = GROOD(batch_size=2048, progress=False)
    baseline = anon_mib()
    threading.Thread(target=sample, daemon=True).start()
    det.fit(x, y, logits=logits)
    fit_peak = peak[0] - baseline
    peak[0] = 0.0
    base2 = anon_mib()
    scores = det.score_samples(x)
    score_peak = peak[0] - base2
    stop[0] = True
    print(json.dumps({"fit": fit_peak, "score": score_peak, "n": int(scores.shape[0]),
                      "finite": bool(np.isfinite(scores).all()),
                      "indexed": det.index_.ntotal}))
""")


@pytest.mark.slow
def test_streaming_a_file_larger_than_the_budget_stays_under_it(tmp_path):
    # The features file is 256 MiB, 4.5x the budget, which covers the working tiles and the
    # outputs (12 bytes per row).
    n, d, budget_mib = 700_000, 96, 56
    xm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32,
                                   shape=(n, d))
    ym = np.lib.format.open_memmap(tmp_path / "y.npy", mode="w+", dtype=np.int64, shape=(n,))
    lm = np.lib.format.open_memmap(tmp_path / "logits.npy", mode="w+", dtype=np.float32,
                                   shape=(n, 4))
    rng = np.random.default_rng(0)
    centres = rng.random((4, d), dtype=np.float32) * 3
    for i in range(0, n, 50_000):
        m = min(50_000, n - i)
        labels = rng.integers(0, 4, m)
        xm[i:i + m] = centres[labels] + rng.standard_normal((m, d), dtype=np.float32) * 0.3
        ym[i:i + m] = labels
        # The classifier is right on 1 sample in 1,000: the index stays small (about 700 rows)
        # and the search short; what is measured is the streaming.
        right = rng.random(m) < 0.001
        lm[i:i + m] = np.eye(4, dtype=np.float32)[np.where(right, labels, (labels + 1) % 4)]
    for arr in (xm, ym, lm):
        arr.flush()
    del xm, ym, lm
    file_mib = (tmp_path / "x.npy").stat().st_size / 2**20
    assert file_mib > 3 * budget_mib
    # A fixed mmap threshold makes glibc return every large freed block at once; its default
    # dynamic threshold keeps freed tiles in the heap, so the reading would depend on history.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["n"] == n and res["finite"]
    index_mib = res["indexed"] * d * 4 / 2**20
    assert res["fit"] < budget_mib + index_mib, res
    assert res["score"] < budget_mib, res
    # The command line on the same rows in two .npz shards, one by np.savez (mapped, not read
    # whole), one by np.savez_compressed (decompressed into a mapped temporary file): grood fit
    # of both, grood score of the compressed one, each under the same budget.
    x, y, logits = (np.load(tmp_path / f"{k}.npy", mmap_mode="r") for k in ("x", "y", "logits"))
    for name, rows, save in (("a", slice(0, n // 3), np.savez),
                             ("b", slice(n // 3, n), np.savez_compressed)):
        save(tmp_path / f"{name}.npz", features=x[rows], labels=y[rows], logits=logits[rows])
    del x, y, logits
    out = subprocess.run([sys.executable, "-c", CLI_MEMORY_PROBE, str(tmp_path)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    cli = json.loads(out.stdout.strip().splitlines()[-1])
    assert cli["indexed"] == res["indexed"] and cli["n"] == n - n // 3
    assert cli["fit"] < budget_mib + index_mib, cli
    assert cli["score"] < budget_mib, cli


CLI_MEMORY_PROBE = PROBE_PRELUDE + textwrap.dedent("""
    from grood.cli import main

    folder = sys.argv[1]
    threading.Thread(target=sample, daemon=True).start()
    peak[0] = base = anon_mib()
    main(["fit", f"{folder}/a.npz", f"{folder}/b.npz", "-o", f"{folder}/det.safetensors",
          "--batch-size", "2048"])
    fit_peak = peak[0] - base
    gc.collect()
    peak[0] = base = anon_mib()
    main(["score", f"{folder}/det.safetensors", f"{folder}/b.npz", "-o", f"{folder}/s.npy",
          "--batch-size", "2048"])
    score_peak = peak[0] - base
    stop[0] = True
    print(json.dumps({"fit": fit_peak, "score": score_peak,
                      "n": int(np.load(f"{folder}/s.npy").shape[0]),
                      "indexed": GROOD.load(f"{folder}/det.safetensors").index_.ntotal}))
""")


SAVE_LOAD_PROBE = PROBE_PRELUDE + textwrap.dedent("""
    n, d = 100_000, 160
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 4
    x = torch.rand(4, d, generator=gen)[y] + 0.1 * torch.rand(n, d, generator=gen)
    det = GROOD(progress=False).fit(x, y, logits=torch.nn.functional.one_hot(y, 4).float())
    del x, y
    gc.collect()
    path = sys.argv[1] + "/det.safetensors"
    threading.Thread(target=sample, daemon=True).start()
    peak[0] = base = anon_mib()
    det.save(path)
    save_peak = peak[0] - base
    del det
    gc.collect()
    peak[0] = base = anon_mib()
    det = GROOD.load(path)
    load_peak = peak[0] - base
    stop[0] = True
    print(json.dumps({"save": save_peak, "load": load_peak,
                      "index": det.index_.ntotal * d * 4 / 2**20}))
""")


@pytest.mark.slow
def test_save_and_load_hold_no_second_copy_of_the_index(tmp_path):
    """The file digest hashed a bytes copy of every tensor (saving took one index size of
    extra memory, loading two) and loading read the whole file to see whether it is JSON."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", SAVE_LOAD_PROBE, str(tmp_path)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["index"] > 60
    assert res["save"] < 0.25 * res["index"], res
    assert res["load"] < 1.25 * res["index"], res
