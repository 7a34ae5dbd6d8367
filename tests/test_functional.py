"""grood.functional against plain float64 loops and torch.autograd."""

from functools import partial

import pytest
import torch
from conftest import clustered_features
from reference import duplicated_prototypes_problem, knn_naive, ncp_naive, prototypes_naive

from grood import functional as F

# (N, C, D): single row, single class, prime sizes, an aligned size, one past a block.
SHAPES = [(1, 1, 1), (1, 3, 7), (7, 1, 13), (13, 5, 31), (64, 16, 64), (65, 17, 129)]


def _ids(shapes):
    return [f"N{n}-C{c}-D{d}" for n, c, d in shapes]


def _problem(n, c, d, dtype=torch.float64, seed=0):
    x, y = clustered_features(max(n, c) + c, c, d, seed=seed)
    protos = prototypes_naive(x, y, c)
    h = x[:n]
    return h.to(dtype), protos.to(dtype), protos.mean(0).to(dtype)


@pytest.mark.parametrize(("n", "c", "d"), SHAPES, ids=_ids(SHAPES))
def test_ncp_gradient_matches_loop_float64(n, c, d):
    h, protos, p_ood = _problem(n, c, d)
    res = F.ncp_gradient(h, protos, p_ood)
    grad, q, pred, min_dist, lse = ncp_naive(h, protos, p_ood)
    assert res.grad.dtype == torch.float64
    torch.testing.assert_close(res.grad, grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.q_ood, q, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.min_dist, min_dist, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(res.lse, lse, rtol=1e-10, atol=1e-10)
    assert torch.equal(res.pred, pred)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
def test_ncp_gradient_low_precision_inputs_close_to_float64(dtype):
    h, protos, p_ood = _problem(33, 9, 40, dtype=dtype, seed=3)
    res = F.ncp_gradient(h, protos, p_ood)
    assert res.grad.dtype == torch.float32
    grad, q, *_ = ncp_naive(h, protos, p_ood)  # reference on the same rounded inputs
    torch.testing.assert_close(res.grad.double(), grad, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(res.q_ood.double(), q, rtol=2e-5, atol=2e-6)


def test_ncp_gradient_streaming_blocks_give_same_result():
    h, protos, p_ood = _problem(50, 23, 17, seed=4)
    whole = F.ncp_gradient(h, protos, p_ood)
    tiled = F.ncp_gradient(h, protos, p_ood, block_rows=7, block_classes=5)
    for a, b in zip(whole, tiled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("c", [10, 50, 300, 1000], ids=["topk", "minima", "wide", "topk-wide"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_ncp_gradient_candidate_pickers_ties_and_tiles(c, dtype):
    """Every CPU candidate picker (torch.topk; packed-key minima for float32 and argmin rounds
    for float64 where the class block is a few dozen to a few hundred wide) gives the float64
    loop's answer; duplicated prototypes go to the lower class id; rows computed alone or in
    tiles of 3 agree with the whole batch (to rounding: the CPU GEMM's summation order may
    follow the row count)."""
    h, protos, p_ood = _problem(12, c, 9, seed=8)
    protos = protos.clone()
    protos[c - 2] = protos[c // 3]  # a duplicate with a higher id
    h = h.clone()
    h[4] = protos[c // 3]  # a row on both duplicates
    h[7] = (protos[1] + protos[c // 3]) / 2
    h, protos, p_ood = h.to(dtype), protos.to(dtype), p_ood.to(dtype)
    res = F.ncp_gradient(h, protos, p_ood)
    grad, q, pred, min_dist, _ = ncp_naive(h, protos, p_ood)
    assert torch.equal(res.pred, pred) and int(res.pred[4]) == c // 3
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else \
        {"rtol": 2e-5, "atol": 2e-6}
    torch.testing.assert_close(res.q_ood.double(), q, **tol)
    torch.testing.assert_close(res.grad.double(), grad, **tol)
    torch.testing.assert_close(res.min_dist.double(), min_dist, rtol=1e-6, atol=1e-6)
    tiled = F.ncp_gradient(h, protos, p_ood, block_rows=3)
    alone = [F.ncp_gradient(h[i:i + 1], protos, p_ood) for i in range(12)]
    for other in (tiled, [torch.cat(parts) for parts in zip(*alone, strict=True)]):
        assert torch.equal(other[2], res.pred)  # pred
        for mine, theirs in zip(res, other, strict=True):
            torch.testing.assert_close(mine, theirs, **tol)


@pytest.mark.parametrize("c", [10, 40, 5000])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_ncp_gradient_predicts_lowest_of_many_duplicated_prototypes(c, dtype):
    """Seven copies of the nearest prototype, more than the NCP_CANDIDATES re-ranked: every
    row predicts the first copy, in one class block or several."""
    h, protos, p_ood = duplicated_prototypes_problem(c, dtype)
    for block in (None, 4):
        res = F.ncp_gradient(h, protos, p_ood, block_classes=block)
        assert res.pred.tolist() == [3] * h.shape[0]
        torch.testing.assert_close(res.min_dist, (h - protos[3]).norm(dim=1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("c", [10, 40, 5000])
def test_ncp_gradient_on_cuda_is_sync_free_and_picks_like_the_cpu(c):
    """Off the CPU the candidates come from minima, never read on the host: a warm call runs
    with CUDA sync debugging set to error, and predicts the lowest of many duplicates."""
    h, protos, p_ood = (t.cuda() for t in duplicated_prototypes_problem(c, torch.float32))
    F.ncp_gradient(h, protos, p_ood)  # warm: the prototypes' scale is read once, then kept
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        res = F.ncp_gradient(h, protos, p_ood)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert res.pred.tolist() == [3] * h.shape[0]
    cpu = F.ncp_gradient(h.cpu(), protos.cpu(), p_ood.cpu())
    torch.testing.assert_close(res.q_ood.cpu(), cpu.q_ood, rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("setup", ["torch.backends.cuda.matmul.fp32_precision = 'tf32'",
                                   "torch.backends.fp32_precision = 'tf32'",
                                   "torch.backends.cuda.matmul.allow_tf32 = True"])
def test_matmul_precision_decides_the_cuda_gemm_whatever_the_program_set(setup):
    """On the device, with the program's TF32 on (per-backend, generic or legacy API): inside
    grood's guard an ieee GEMM is fp32 and a tf32 one uses TF32, and the program's setting is
    back afterwards. In a fresh process (the flags are process-wide)."""
    import subprocess
    import sys
    import textwrap
    code = textwrap.dedent(f"""
        import warnings
        warnings.simplefilter("ignore")
        import torch
        from grood.functional import matmul_precision
        {setup}
        gen = torch.Generator(device="cuda").manual_seed(0)
        a = torch.randn(512, 2048, device="cuda", generator=gen)
        b = torch.randn(2048, 512, device="cuda", generator=gen)
        ref = a.double() @ b.double()
        err = lambda x: ((x.double() - ref).abs().max() / ref.abs().max()).item()
        before = torch.backends.cuda.matmul.fp32_precision
        with matmul_precision("ieee", a.device):
            ieee = a @ b
        with matmul_precision("tf32", a.device):
            tf32 = a @ b
        print(err(ieee), err(tf32), before, torch.backends.cuda.matmul.fp32_precision)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    ieee, tf32, before, after = res.stdout.split()
    assert float(ieee) < 5e-6 < 3e-5 < float(tf32), (ieee, tf32)
    assert before == after == "tf32"


@pytest.mark.parametrize("change", ["prototypes", "ood_prototype"])
def test_kept_prototype_operands_follow_in_place_changes(change):
    """The centred prototypes are kept per prototype set between calls; changing either
    tensor in place must not reuse them (a stale operand would be a silent wrong score)."""
    h, protos, p_ood = _problem(15, 6, 11, dtype=torch.float32, seed=9)
    protos, p_ood = protos.clone(), p_ood.clone()
    first = F.ncp_gradient(h, protos, p_ood)
    (protos if change == "prototypes" else p_ood).mul_(1.25)
    again = F.ncp_gradient(h, protos, p_ood)
    fresh = F.ncp_gradient(h, protos.clone(), p_ood.clone())
    assert not torch.equal(first.q_ood, again.q_ood)
    for a, b in zip(again, fresh, strict=True):
        assert torch.equal(a, b)


def test_kept_values_live_as_long_as_their_tensors_and_pinned_ones_longer():
    """A kept value of live prototypes is never evicted by other prototype sets (a CUDA graph
    captured with it reads its memory on every replay); it goes when a tensor is freed, and a
    pinned one stays with its holder after that and after an in-place change."""
    import gc
    import weakref

    from grood_kernels import _derived, contract

    made = []

    def make():
        made.append(torch.zeros(3))
        return made[-1]

    protos, p_ood = torch.ones(2, 3), torch.ones(3)
    with contract.pinning_kept_values() as pinned:
        first = contract.kept_per_prototypes(protos, p_ood, ("test",), make)
    assert pinned == [first]
    for _ in range(40):  # many other live prototype sets
        others = (torch.ones(2, 3), torch.ones(3))
        contract.kept_per_prototypes(*others, ("test",), make)
    assert contract.kept_per_prototypes(protos, p_ood, ("test",), make) is first
    held = weakref.ref(first)
    protos.mul_(2)  # in place: a new value replaces the kept one, the pinned one stays
    assert contract.kept_per_prototypes(protos, p_ood, ("test",), make) is not first
    del first, made[:]
    gc.collect()
    assert held() is pinned[0]
    keys = [k for k in _derived._kept if k[2:] == ("test",)]
    del protos, others
    gc.collect()
    assert len([k for k in _derived._kept if k[2:] == ("test",)]) < len(keys)


@pytest.mark.parametrize(("distance", "bound"), [(1e3, 2e-4), (1e4, 2e-3), (6e4, 1e-2)])
def test_float32_q_ood_of_far_rows_is_as_accurate_as_the_readme_says(distance, bound):
    """README (Numerics): a float32 row's q_ood carries a relative error of about 1e-7 times
    its distance from the prototypes, up to 0.6 % near 2**16 (past it the detector redoes the
    row in float64). Rows in random directions at that distance from the OOD prototype, on
    100 classes, against float64."""
    gen = torch.Generator().manual_seed(3)
    protos = torch.randn(100, 64, generator=gen) * 4
    p_ood = protos.mean(0)
    dirs = torch.randn(64, 64, generator=gen)
    h = p_ood + distance * dirs / dirs.norm(dim=1, keepdim=True)
    got = F.ncp_gradient(h, protos, p_ood)
    want = F.ncp_gradient(h.double(), protos.double(), p_ood.double())
    rel = ((got.q_ood.double() - want.q_ood) / want.q_ood).abs().max()
    assert float(rel) < bound
    assert torch.equal(got.pred, want.pred)


@pytest.mark.parametrize("target", ["pred", "random"])
def test_closed_form_gradient_equals_autograd(target):
    h, protos, p_ood = _problem(11, 6, 9, seed=5)
    res = F.ncp_gradient(h, protos, p_ood)
    gen = torch.Generator().manual_seed(0)
    labels = res.pred if target == "pred" else torch.randint(0, 6, (11,), generator=gen)
    for i in range(h.shape[0]):
        p_o = p_ood.clone().requires_grad_(True)
        s = -torch.cat([torch.linalg.norm(h[i] - protos, dim=1),
                        torch.linalg.norm(h[i] - p_o)[None]])
        loss = -torch.log_softmax(s, 0)[labels[i]]
        (auto,) = torch.autograd.grad(loss, p_o)
        torch.testing.assert_close(res.grad[i], auto, rtol=1e-10, atol=1e-12)


def test_gradient_is_zero_where_h_equals_ood_prototype():
    h, protos, p_ood = _problem(4, 3, 6)
    h = h.clone()
    h[2] = p_ood
    res = F.ncp_gradient(h, protos, p_ood)
    assert torch.equal(res.grad[2], torch.zeros(6, dtype=torch.float64))
    assert bool(torch.isfinite(res.grad).all())
    assert bool(torch.isfinite(res.q_ood).all())


@pytest.mark.parametrize("scale", [1e-30, 1e3, 1e6, 1e30], ids=["1e-30", "1e3", "1e6", "1e30"])
def test_extreme_magnitudes_do_not_overflow_or_underflow(scale):
    h, protos, p_ood = _problem(9, 4, 8, dtype=torch.float32, seed=6)
    res = F.ncp_gradient(h * scale, protos * scale, p_ood * scale)
    for t in (res.grad, res.q_ood, res.lse, res.min_dist):
        assert bool(torch.isfinite(t).all())
    grad, q, *_ = ncp_naive(h * scale, protos * scale, p_ood * scale)
    torch.testing.assert_close(res.q_ood.double(), q, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(res.grad.double(), grad, rtol=1e-4, atol=1e-6)


def test_the_scale_follows_the_prototypes_not_the_features():
    """Rows larger than the prototypes are computed in the prototypes' units: within float32's
    softmax resolution they are accurate, and one too large for float32 in those units comes
    out non-finite on its own (the detector redoes it in float64), leaving every other row as
    computed alone."""
    h, protos, p_ood = _problem(9, 4, 8, dtype=torch.float32, seed=6)
    big = h.clone()
    big[2] *= 1e3
    res = F.ncp_gradient(big, protos, p_ood)
    grad, q, *_ = ncp_naive(big, protos, p_ood)
    torch.testing.assert_close(res.grad.double(), grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(res.q_ood.double(), q, rtol=1e-3, atol=1e-30)
    huge = h.clone()
    huge[5] = 1e25  # its squared distances overflow float32 in the prototypes' units
    res = F.ncp_gradient(huge, protos, p_ood)
    assert not bool(torch.isfinite(res.min_dist[5]))
    alone = F.ncp_gradient(h[torch.arange(9) != 5], protos, p_ood)
    for got, want in zip(res, alone, strict=True):
        assert torch.equal(got[torch.arange(9) != 5], want)


@pytest.mark.parametrize("c", [4, 40], ids=["topk", "minima"])
def test_rows_beyond_float32_stay_alone_with_either_candidate_picker(c):
    """Rows whose distances overflow (or are NaN) come out non-finite on their own, whichever
    way candidates are picked; every other row is as computed without them."""
    h, protos, p_ood = _problem(9, c, 8, dtype=torch.float32, seed=10)
    bad = h.clone()
    bad[2], bad[5, 3], bad[7, 0] = 1e25, float("inf"), float("nan")
    res = F.ncp_gradient(bad, protos, p_ood)
    rows = torch.tensor([2, 5, 7])
    assert not bool(torch.isfinite(res.min_dist[rows]).any())
    assert not bool(torch.isfinite(res.q_ood[rows]).all())
    keep = torch.ones(9, dtype=torch.bool)
    keep[rows] = False
    alone = F.ncp_gradient(h[keep], protos, p_ood)
    assert torch.equal(res.pred[keep], alone.pred)
    for got, want in zip(res, alone, strict=True):
        torch.testing.assert_close(got[keep], want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("width", [10, 40, 400, 5000])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_candidate_picker_gives_distinct_columns_on_non_finite_rows(width, dtype):
    """The k candidates of a row are distinct columns even where the row is all inf or NaN
    (taking an entry by setting it to inf must not leave it to be taken again)."""
    d = torch.rand(4, width, dtype=dtype)
    d[1] = float("inf")
    d[2] = float("nan")
    d[3, : width - 2] = float("inf")  # two finite entries, then inf ones
    vals, cols = F._nearest(d, 4)
    assert all(len(set(row)) == 4 for row in cols.tolist())
    assert torch.equal(vals[0], torch.sort(d[0]).values[:4])
    assert set(cols[3, :2].tolist()) == {width - 2, width - 1}
    assert bool(torch.isinf(vals[3, 2:]).all())


@pytest.mark.parametrize(("width", "dtype"), [
    (17, torch.float32), (40, torch.float32), (384, torch.float32), (40, torch.float64),
], ids=["keys-narrowest", "keys", "keys-widest", "argmin-rounds"])
def test_candidate_picker_orders_ties_by_column(width, dtype):
    """The minima pickers take equal entries (zeros of both signs, repeated values, the
    largest finite value) lowest column first: a stable sort of the row. (``torch.topk``,
    used outside their widths, leaves the order of ties unspecified; the exact re-rank then
    orders the candidates it got.)"""
    gen = torch.Generator().manual_seed(width)
    d = torch.randint(0, 7, (6, width), generator=gen).to(dtype) / 8  # many exact ties
    d[0, ::3] = -0.0
    d[1, 1::2] = 0.0
    d[2] = torch.finfo(dtype).max
    d[3, -5:] = torch.finfo(dtype).tiny  # the smallest normal value, last columns
    vals, cols = F._nearest(d, 4)
    # -0.0 == 0.0: a stable sort on the magnitude gives the expected columns.
    want = torch.sort(d.abs(), dim=1, stable=True).indices[:, :4]
    assert torch.equal(cols, want)
    assert torch.equal(vals, d.gather(1, want))


@pytest.mark.parametrize(("width", "dtype"), [
    (6, torch.float32), (10, torch.float32), (16, torch.float64), (5000, torch.float32),
    (300, torch.float64),
])
def test_topk_picker_takes_lowest_columns_among_ties(width, dtype):
    """Where ``torch.topk`` picks (few classes, very many, float64 outside the argmin rounds'
    widths), rows with more equal entries than candidates still get the lowest columns, in
    ascending order of value (the running maximum of the softmax reads the first)."""
    d = torch.ones(5, width, dtype=dtype)
    d[1, width // 2:] = 0.5  # ties in the upper half only
    d[2, -1] = 0.25  # one smaller entry, last column, then ties
    d[3] = torch.arange(width, 0, -1, dtype=dtype) % 3  # repeated values, interleaved
    vals, cols = F._nearest(d, 4)
    want = torch.sort(d, dim=1, stable=True).indices[:, :4]
    assert torch.equal(cols.sort(1).values, want.sort(1).values)
    assert torch.equal(vals, d.gather(1, cols))
    assert bool((vals[:, 1:] >= vals[:, :-1]).all())


def _wide_tile(kind: str, rows: int, width: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A tile of distances wide enough to be narrowed by group minima, of one ``kind``."""
    gen = torch.Generator().manual_seed(seed)
    d = torch.rand(rows, width, generator=gen, dtype=dtype)
    if kind == "half-integers":  # exact ties everywhere, group minima equal at the edge
        d = torch.randint(0, 40, (rows, width), generator=gen).to(dtype) / 2
    elif kind == "repeated columns":  # a database with duplicate rows
        d = d[:, : width // 7 + 1].repeat(1, 7)[:, :width]
    elif kind == "nan columns":  # a database row with NaN poisons its group in every row
        d[:, torch.randint(0, width, (3,), generator=gen)] = float("nan")
    elif kind == "nan and inf rows":
        d[0], d[1, ::3], d[2] = float("nan"), float("inf"), float("inf")
    elif kind == "zeros of both signs":
        d[:, ::5], d[:, 2::5] = -0.0, 0.0
    elif kind == "ascending":  # every minimum in the last columns (the tail)
        d = torch.arange(width, 0, -1, dtype=dtype).repeat(rows, 1)
    return d


@pytest.mark.parametrize("kind", ["random", "half-integers", "repeated columns", "nan columns",
                                  "nan and inf rows", "zeros of both signs", "ascending"])
@pytest.mark.parametrize(("width", "n"), [(2048, 1), (4096, 5), (4099, 54), (6001, 14),
                                          (16390, 104), (8195, 204)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_wide_tiles_narrowed_by_group_minima_pick_what_whole_tiles_do(kind, width, n, dtype):
    """On the CPU topk_lowest_index narrows a wide tile to the groups of columns with the n
    smallest minima (and the columns past the last whole group) before torch.topk: the same
    n values, in ascending order, and the same columns as a topk over the whole tile with its
    ties resolved to the lowest columns, for ties at the groups' edge, NaN and Inf entries,
    signed zeros and minima in the tail."""
    d = _wide_tile(kind, 9, width, dtype, seed=width + n)
    assert F._group_size(d.shape, n)  # the narrowing applies to every case here
    kept = d.clone()
    vals, cols = F.topk_lowest_index(d, n)
    want_v, want_c = F._smallest_tie_lowest(d, n)
    same = partial(torch.testing.assert_close, equal_nan=True, rtol=0, atol=0)
    same(d, kept)
    same(vals, want_v)
    # Equal entries inside the n may come in either column order: compare in (value, column).
    assert torch.equal(F.lex_sort(vals, cols)[1], F.lex_sort(want_v, want_c)[1])
    same(d.gather(1, cols), vals)
    _same_entries(F._smallest(d, n, ordered=False), (want_v, want_c))


@pytest.mark.parametrize("kind", ["random", "half-integers", "repeated columns", "nan columns",
                                  "nan and inf rows", "zeros of both signs", "ascending"])
@pytest.mark.parametrize(("width", "n"), [(2048, 1), (4096, 5), (4099, 54), (6001, 14),
                                          (16390, 104), (8195, 204)])
def test_sync_free_narrowing_picks_what_the_whole_tiles_keys_do(monkeypatch, kind, width, n):
    """Off the CPU (DEVICE_NARROWED_PICK) a wide float32 tile is narrowed to the groups whose
    (minimum, lowest column at it) keys are smallest, with no host read and no row redone:
    the same n values and columns, in the same (value, column) order, as torch.topk over the
    whole tile's packed keys, for ties at the groups' edge, NaN and Inf entries, signed
    zeros and minima in the tail; the tile is left as it was."""
    d = _wide_tile(kind, 9, width, torch.float32, seed=width + n)
    per = F._group_size(d.shape, n)
    assert per  # the narrowing applies to every case here
    kept = d.clone()
    want_v, want_c = F._smallest_in_order(d, n)  # the flag off: the whole tile's keys
    monkeypatch.setattr(F, "DEVICE_NARROWED_PICK", True)
    got_v, got_c = F._smallest_in_order(d, n)
    assert torch.equal(got_c, want_c)
    torch.testing.assert_close(got_v, want_v, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(d, kept, equal_nan=True, rtol=0, atol=0)
    assert torch.equal(F._grouped_in_order(d, n, per)[1], want_c)


def _same_entries(got: tuple[torch.Tensor, torch.Tensor],
                  want: tuple[torch.Tensor, torch.Tensor]) -> None:
    """The same entries per row in any order: values (NaN equal to NaN) and, for every value
    that is not NaN, the same columns (which NaN entries a row of NaN gives is arbitrary)."""
    got_v, got_c = F.lex_sort(*got)
    want_v, want_c = F.lex_sort(*want)
    torch.testing.assert_close(got_v, want_v, equal_nan=True, rtol=0, atol=0)
    assert torch.equal(got_c[~want_v.isnan()], want_c[~want_v.isnan()])


@pytest.mark.parametrize("kind", ["random", "half-integers", "repeated columns", "nan columns",
                                  "nan and inf rows", "zeros of both signs", "ascending"])
@pytest.mark.parametrize(("width", "n"), [(7, 1), (9, 8), (300, 5), (1500, 60)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_unordered_pick_takes_the_ordered_picks_entries(kind, width, n, dtype):
    """The search's pick in no order (``torch.topk`` unsorted, the n-th smallest found as the
    largest of n + 1) takes the entries the ascending pick does, ties at the n-th to the
    lowest columns, on tiles too narrow to be narrowed by groups (the wide ones: above)."""
    d = _wide_tile(kind, 9, width, dtype, seed=width * n)
    kept = d.clone()
    got = F._smallest(d, n, ordered=False)
    want = F.topk_lowest_index(d, n)
    torch.testing.assert_close(d, kept, equal_nan=True, rtol=0, atol=0)
    _same_entries(got, want)
    torch.testing.assert_close(d.gather(1, got[1]), got[0], equal_nan=True, rtol=0, atol=0)


def test_tiles_too_narrow_or_n_too_large_are_not_narrowed():
    """Narrowing needs a tile of 2,048 columns or more and the chosen groups within a quarter
    of it (groups of 16 past 4,096 columns, of 8 where 16 would not fit); no rows, no
    narrowing."""
    assert F._group_size((4, 2047), 1) == 0
    assert F._group_size((4, 2048), 64) == 8 and F._group_size((4, 2048), 65) == 0
    assert F._group_size((4, 4097), 64) == 16 and F._group_size((4, 4097), 65) == 8
    assert F._group_size((4, 4097), 128) == 8 and F._group_size((4, 4097), 129) == 0
    assert F._group_size((0, 8192), 1) == 0


@pytest.mark.parametrize("d", [5, 513, 40000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_database_sq_norms_do_not_depend_on_blocks_or_layout(d, dtype):
    """Every row's squared norm is summed alone in one order: the same values for any
    block_size (a lone last row of 40,000 elements was split between threads before), and
    for the same rows stored column-major; equal to float64 sums to rounding."""
    gen = torch.Generator().manual_seed(d)
    x = (torch.randn(7, d, generator=gen) * 3).to(dtype)
    want = F.database_sq_norms_of(x)
    for block in (1, 2, 3, 6, 65536):
        assert torch.equal(F.database_sq_norms_of(x, block_size=block), want)
    column_major = x.T.contiguous().T
    assert torch.equal(F.database_sq_norms_of(column_major), want)
    exact = (x.double() ** 2).sum(1)
    torch.testing.assert_close(F.database_sq_norms_of(x, torch.float64), exact, rtol=1e-12,
                               atol=0)
    torch.testing.assert_close(want.double(), exact, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match=r"database must have 2 dimension\(s\), got shape"):
        F.database_sq_norms_of(x[0])
    with pytest.raises(TypeError, match="database must be floating point"):
        F.database_sq_norms_of(x.int())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize(("rows", "k", "d", "budget"),
                         [(1, 1, 1, 4), (37, 4, 13, 1 << 9), (37, 4, 13, 1 << 21),
                          (9, 3, 300, 1), (64, 4, 2048, 1 << 16)])
def test_rerank_chunks_hold_their_budget_and_give_each_rows_norm(monkeypatch, dtype, rows, k,
                                                                 d, budget):
    """The gradient step's CPU re-rank: its scratch holds as many rows' candidates as fit
    RERANK_CHUNK_BYTES (at least one row), and every distance is that row's norm of its own
    difference, bit for bit, however the chunks fall (a last chunk short, one row a chunk,
    one chunk for the tile)."""
    monkeypatch.setattr(F, "RERANK_CHUNK_BYTES", budget)
    gen = torch.Generator().manual_seed(rows * k + d)
    centred = torch.randn(11, d, generator=gen, dtype=dtype) * 5
    u = torch.randn(rows, d, generator=gen, dtype=dtype) * 5
    cand = torch.randint(0, 11, (rows, k), generator=gen)
    scratch = F._rerank_scratch(u.device, rows, k, d, dtype)
    per_row = k * d * scratch.element_size()
    assert scratch.shape[0] % k == 0 and scratch.shape[1] == d
    assert scratch.shape[0] // k == min(rows, max(1, budget // per_row))
    got = F._exact_candidate_distances(centred, cand, u, scratch)
    want = torch.stack([torch.linalg.vector_norm(centred[cand[:, j]] - u, dim=1)
                        for j in range(k)], 1)
    assert got.shape == (rows, k) and torch.equal(got, want)
    exact = ((centred.double()[cand] - u.double()[:, None]) ** 2).sum(2).sqrt()
    torch.testing.assert_close(got.double(), exact, rtol=1e-5 if dtype == torch.float32
                               else 1e-12, atol=0)


@pytest.mark.parametrize("budget", [1, 1 << 12, 1 << 21])
def test_ncp_gradient_does_not_depend_on_the_rerank_chunks(monkeypatch, budget):
    """The step's results are the same bit for bit whatever the re-rank's chunk budget."""
    gen = torch.Generator().manual_seed(3)
    h, protos = torch.randn(301, 40, generator=gen), torch.randn(13, 40, generator=gen)
    p_ood = protos.mean(0)
    want = F.ncp_gradient(h, protos, p_ood, block_rows=128)
    monkeypatch.setattr(F, "RERANK_CHUNK_BYTES", budget)
    got = F.ncp_gradient(h, protos, p_ood, block_rows=128)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize(("bq", "n", "d"), [(1, 1, 1), (29, 5, 31), (7, 204, 130)])
def test_search_rerank_chunked_or_by_slot_gives_the_same_distances(monkeypatch, dtype, bq, n,
                                                                   d):
    """knn's exact re-rank on the CPU by chunks of query rows (every candidate at once) or one
    candidate slot at a time (a row's candidates past RERANK_CHUNK_BYTES): the same squared
    distances bit for bit, each the sum of its own row's squared differences."""
    gen = torch.Generator().manual_seed(bq * n + d)
    db = torch.randn(300, d, generator=gen, dtype=dtype)
    q = torch.randn(bq, d, generator=gen, dtype=dtype)
    rows = torch.randint(0, 300, (bq, n), generator=gen)
    results = []
    for budget in (0, n * d * q.element_size(), 3 * n * d * q.element_size(), 1 << 30):
        monkeypatch.setattr(F, "RERANK_CHUNK_BYTES", budget)
        results.append(F._rerank_distances(q, db, rows))
    for got in results[1:]:
        assert torch.equal(got, results[0])
    want = ((db.double()[rows] - q.double()[:, None]) ** 2).sum(2)
    torch.testing.assert_close(results[0].double(), want,
                               rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)


@pytest.mark.parametrize("kind", ["random", "half-integers", "padding", "nan"])
@pytest.mark.parametrize(("k", "n_new"), [(1, 1), (5, 3), (54, 54), (200, 17), (30, 40)])
def test_unordered_merge_keeps_the_sorted_merges_candidates(kind, k, n_new):
    """The CPU search's merge (unsorted topk, tied rows sorted whole) keeps the candidates the
    sorting merge does: by distance, then the lower index, a missing one (-1, at inf) last."""
    gen = torch.Generator().manual_seed(k * 100 + n_new)
    rows = 12

    def dists(n: int) -> torch.Tensor:
        if kind == "random":
            return torch.rand(rows, n, generator=gen, dtype=torch.float64)
        return torch.randint(0, 6, (rows, n), generator=gen).double() / 2

    best_d, new_d = dists(k), dists(n_new)
    best_i = torch.stack([torch.randperm(1000, generator=gen)[:k] for _ in range(rows)])
    new_i = torch.stack([torch.randperm(1000, generator=gen)[:n_new] for _ in range(rows)])
    new_i += 1000
    if kind == "padding":  # slots not yet filled, and candidates at inf
        best_d[:, k // 2:], best_i[:, k // 2:] = float("inf"), -1
        new_d[:, :1] = float("inf")
    if kind == "nan":
        new_d[0], best_d[1, :1] = float("nan"), float("nan")
    got = F._merge_unordered(best_d, best_i, new_d, new_i, k)
    want = F._merge_topk(best_d, best_i, new_d, new_i, k)
    _same_entries(got, want)


def test_knn_on_wide_tiles_matches_whole_tile_picking(monkeypatch):
    """knn on the CPU with few queries (database tiles of all 5,000 rows) returns what it did
    picking from whole tiles, duplicate rows and exact ties included."""
    gen = torch.Generator().manual_seed(11)
    db = torch.randint(-2, 3, (5000, 6), generator=gen).float()  # many duplicates
    db[4000:] = torch.randn(1000, 6, generator=gen)
    queries = torch.cat([torch.randint(-2, 3, (6, 6), generator=gen).float(),
                         torch.randn(6, 6, generator=gen)])
    for k in (1, 7, 60):
        got = F.knn(queries, db, k)
        monkeypatch.setattr(F, "_GROUPED_WIDTH", 1 << 62)
        want = F.knn(queries, db, k)
        monkeypatch.undo()
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


def test_ncp_gradient_does_not_modify_inputs():
    h, protos, p_ood = _problem(10, 3, 5, dtype=torch.float32)
    copies = [t.clone() for t in (h, protos, p_ood)]
    F.ncp_gradient(h, protos, p_ood)
    for t, c in zip((h, protos, p_ood), copies, strict=True):
        assert torch.equal(t, c)


def test_ncp_gradient_strided_input():
    h, protos, p_ood = _problem(20, 4, 10)
    wide = torch.zeros(20, 30, dtype=torch.float64)
    wide[:, ::3] = h
    res = F.ncp_gradient(wide[:, ::3], protos, p_ood)
    torch.testing.assert_close(res.grad, F.ncp_gradient(h, protos, p_ood).grad)


@pytest.mark.parametrize(("h_shape", "p_shape", "o_shape", "match"), [
    ((4,), (3, 4), (4,), "h must have 2"),
    ((2, 4), (3, 5), (4,), "prototypes has dimension 5"),
    ((2, 4), (3, 4), (5,), "ood_prototype has dimension 5"),
    ((2, 4), (0, 4), (4,), "prototypes is empty"),
])
def test_ncp_gradient_shape_errors(h_shape, p_shape, o_shape, match):
    with pytest.raises(ValueError, match=match):
        F.ncp_gradient(torch.zeros(h_shape), torch.zeros(p_shape), torch.zeros(o_shape))


def test_functional_refusals_name_the_input():
    """The pure-torch ops refuse what they cannot compute on, naming the input: integer
    features, labels of another length, a running state of another shape, a re-rank database
    of another shape than the database."""
    x, y = clustered_features(12, 3, 4, seed=2)
    with pytest.raises(TypeError, match=r"h must be floating point, got torch\.int64"):
        F.ncp_gradient(x.long(), x[:3], x[0])
    with pytest.raises(ValueError, match=r"labels must have shape \[12\], got \(11,\)"):
        F.class_prototypes(x, y[:11], 3)
    state = F.class_prototypes(x, y, 3)
    with pytest.raises(ValueError, match=r"state holds sums of shape \(3, 4\), expected "
                                         r"\(4, 4\)"):
        F.class_prototypes(x, y, 4, state=state)
    with pytest.raises(ValueError, match=r"rerank_database has shape \(5, 4\), the database "
                                         r"\(12, 4\)"):
        F.knn(x[:2], x, 1, rerank_database=x[:5])


def test_class_prototypes_batchwise_equals_one_shot():
    x, y = clustered_features(101, 7, 12, seed=7)
    one = F.class_prototypes(x, y, 7)
    state = None
    for start in range(0, 101, 17):
        state = F.class_prototypes(x[start:start + 17], y[start:start + 17], 7, state=state)
    torch.testing.assert_close(state.sums, one.sums)
    assert torch.equal(state.counts, one.counts)
    torch.testing.assert_close(state.prototypes(torch.float64), prototypes_naive(x, y, 7))


def test_class_prototypes_state_is_not_modified():
    x, y = clustered_features(20, 2, 3)
    first = F.class_prototypes(x[:10], y[:10], 2)
    sums = first.sums.clone()
    F.class_prototypes(x[10:], y[10:], 2, state=first)
    assert torch.equal(first.sums, sums)


def test_empty_class_is_named():
    x = torch.rand(6, 3)
    y = torch.tensor([0, 0, 2, 2, 4, 4])
    state = F.class_prototypes(x, y, 5)
    with pytest.raises(ValueError, match=r"class\(es\) 1, 3 have no training samples"):
        state.prototypes()


def test_class_prototypes_label_range():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        F.class_prototypes(torch.rand(3, 2), torch.tensor([0, 1, 2]), 2)


def test_class_prototypes_in_pieces_and_in_place_give_the_same_sums(monkeypatch):
    """The CPU widens a batch to float64 a piece at a time (the same additions in the same
    order: bit-identical sums); ``in_place`` adds to the given state's tensors, while the
    default leaves them as they were."""
    x, y = clustered_features(103, 5, 7, seed=4, dtype=torch.float32)
    whole = torch.zeros(5, 7, dtype=torch.float64).index_add_(0, y, x.double())
    monkeypatch.setattr(F, "PROTOTYPE_CHUNK_ELEMENTS", 7 * 10)  # pieces of 10 rows
    state = F.class_prototypes(x, y, 5)
    assert torch.equal(state.sums, whole)
    before = state.sums.clone()
    copied = F.class_prototypes(x[:40], y[:40], 5, state=state)
    assert torch.equal(state.sums, before) and copied.sums is not state.sums
    added = F.class_prototypes(x[:40], y[:40], 5, state=state, in_place=True)
    assert added.sums is state.sums and torch.equal(added.sums, copied.sums)
    assert torch.equal(added.counts, copied.counts)


def test_class_prototypes_refuses_non_finite_rows_and_a_state_of_other_dtypes():
    """A NaN row made its class's prototype NaN, silently; float32 sums in a hand-made state
    failed inside index_add_."""
    x, y = torch.rand(4, 3), torch.tensor([0, 1, 0, 1])
    bad = x.clone()
    bad[2, 1] = float("inf")
    with pytest.raises(ValueError, match=r"features contains NaN or Inf in row\(s\) 2"):
        F.class_prototypes(bad, y, 2)
    state = F.class_prototypes(x, y, 2)
    for wrong in (F.PrototypeState(state.sums.float(), state.counts),
                  F.PrototypeState(state.sums, state.counts.int()),
                  F.PrototypeState(state.sums, state.counts[:1])):
        with pytest.raises(ValueError, match="state must hold float64 sums"):
            F.class_prototypes(x, y, 2, state=wrong)
    with pytest.raises(ValueError, match="state is on meta, the features on cpu"):
        F.class_prototypes(x, y, 2, state=F.PrototypeState(state.sums.to("meta"),
                                                           state.counts.to("meta")))


KNN_SHAPES = [(1, 1, 1, 1), (1, 5, 3, 3), (9, 37, 11, 1), (9, 37, 11, 4), (64, 65, 8, 16)]


@pytest.mark.parametrize(("q", "m", "d", "k"), KNN_SHAPES,
                         ids=[f"Q{q}-M{m}-D{d}-k{k}" for q, m, d, k in KNN_SHAPES])
@pytest.mark.parametrize("block", [None, 4], ids=["one-block", "block4"])
def test_knn_matches_brute_force(q, m, d, k, block):
    gen = torch.Generator().manual_seed(q * 1000 + m)
    db = torch.randn(m, d, generator=gen, dtype=torch.float64)
    queries = torch.randn(q, d, generator=gen, dtype=torch.float64)
    dist, idx = F.knn(queries, db, k, block_size=block)
    ref_d, ref_i = knn_naive(queries, db, k)
    torch.testing.assert_close(dist, ref_d, rtol=1e-12, atol=1e-12)
    assert torch.equal(idx, ref_i)


def test_knn_float32_distances_are_exact_after_rerank():
    # A common offset makes the expansion's small distances inaccurate (about 2e-4 absolute
    # here, on distances near 2e-3); the re-ranked distances are exact.
    gen = torch.Generator().manual_seed(1)
    db = (torch.randn(200, 16, generator=gen) * 0.1 + 10.0).float()
    queries = (db[:20] + torch.randn(20, 16, generator=gen) * 1e-2).float()
    dist, idx = F.knn(queries, db, 1)
    ref_d, ref_i = knn_naive(queries, db, 1)
    assert torch.equal(idx, ref_i)
    torch.testing.assert_close(dist.double(), ref_d, rtol=1e-5, atol=0)


def test_knn_accepts_precomputed_norms():
    gen = torch.Generator().manual_seed(2)
    db, queries = torch.randn(50, 6, generator=gen), torch.randn(7, 6, generator=gen)
    norms = F.database_sq_norms_of(db, block_size=8)
    torch.testing.assert_close(norms, (db * db).sum(1))
    assert all(torch.equal(a, b) for a, b in zip(F.knn(queries, db, 3, database_sq_norms=norms),
                                                  F.knn(queries, db, 3), strict=True))
    with pytest.raises(ValueError, match="database_sq_norms must have shape"):
        F.knn(queries, db, database_sq_norms=norms[:3])


def test_knn_ties_and_duplicates_prefer_lower_index():
    db = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0], [1.0, 0.0]])
    dist, idx = F.knn(torch.zeros(1, 2), db, 4, block_size=2)
    assert idx.tolist() == [[0, 1, 2, 3]]
    assert dist.tolist() == [[1.0, 1.0, 1.0, 1.0]]
    dist, idx = F.knn(torch.tensor([[1.0, 0.0]]), db, 3, block_size=2)
    assert idx.tolist() == [[0, 2, 4]]
    assert dist.tolist() == [[0.0, 0.0, 0.0]]


def test_knn_pads_like_faiss_when_database_is_smaller_than_k():
    dist, idx = F.knn(torch.zeros(2, 3), torch.ones(2, 3), 4)
    assert idx.tolist() == [[0, 1, -1, -1]] * 2
    assert dist[:, :2].tolist() == [[3.0, 3.0]] * 2
    assert bool(torch.isinf(dist[:, 2:]).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32-keys", "fp64-sort"])
def test_knn_many_candidates_over_many_blocks_in_lex_order(dtype):
    """k in the hundreds over many database blocks (float32: merged on the CPU as packed
    keys; float64: sorted): every row's k nearest in (distance, row) order, exactly as a
    brute-force scan sorts them, on small-integer data (exact GEMM distances, many ties,
    duplicate rows); a query with NaN finds nothing, a row with Inf is never found, and a
    database smaller than the candidates pads with -1 at inf."""
    gen = torch.Generator().manual_seed(5)
    db = torch.randint(-2, 3, (700, 5), generator=gen).to(dtype)
    db[::9] = db[1]
    db[4, 2] = float("inf")
    queries = torch.randint(-2, 3, (33, 5), generator=gen).to(dtype)
    queries[7, 0] = float("nan")
    for k, block in ((300, 37), (650, 64), (1, 5)):
        dist, idx = F.knn(queries, db, k, block_size=block)
        brute = ((queries[:, None] - db[None]) ** 2).sum(2)
        brute = torch.nan_to_num(brute, nan=float("inf"))
        order = torch.sort(brute, dim=1, stable=True)
        want_d, want_i = order.values[:, :k], order.indices[:, :k]
        ok = torch.ones(33, dtype=torch.bool)
        ok[7] = False
        assert torch.equal(idx[ok], want_i[ok]) and torch.equal(dist[ok], want_d[ok])
        assert (idx[7] == -1).all() and torch.isinf(dist[7]).all()
        assert not (idx == 4).any()
    dist, idx = F.knn(queries[:3], db[:6], 6, block_size=2)  # 10 candidates of 6 rows
    assert (idx[:, 5] == -1).all() and torch.isinf(dist[:, 5]).all()  # (row 4 is not found)
    assert torch.isfinite(dist[:, :5]).all() and not (idx == 4).any()


def test_packed_keys_decode_to_distances_and_rows():
    """``_column_keys`` with explicit rows and ``_from_keys``: finite values and rows come
    back exactly, non-finite distances as inf (row kept), an unfilled key (+inf) as row -1
    at inf; ordered by (value, row), -0.0 with 0.0."""
    d = torch.tensor([[3.5, 0.0, -0.0, float("inf"), float("nan"), 1e-30, 2.0]])
    rows = torch.tensor([[9, 2, 1, 7, 3, (1 << 29) - 1, 0]])
    keys = F._column_keys(d, rows)
    keys = torch.cat([keys, torch.full((1, 1), float("inf"), dtype=torch.float64)], 1)
    vals, got = F._from_keys(torch.sort(keys, dim=1).values)
    assert got.tolist() == [[1, 2, (1 << 29) - 1, 0, 9, 3, 7, -1]]
    tiny = float(torch.tensor(1e-30))  # (its float32 value)
    assert vals.tolist() == [[0.0, 0.0, tiny, 2.0, 3.5, float("inf"), float("inf"),
                              float("inf")]]


def test_re_ranked_candidates_sorted_by_keys_as_lex_sort_orders_them():
    """On the CPU knn sorts its re-ranked float32 candidates as packed (distance, row) keys:
    the order lex_sort gives (distance, then row; missing candidates, inf and -1, last), the
    distances back bit for bit, the largest finite float32 and 0 among them, the highest row
    a key holds."""
    from grood_kernels.contract import lex_sort

    gen = torch.Generator().manual_seed(3)
    dist = torch.randint(0, 6, (40, 57), generator=gen).float() / 4  # many ties
    rows = torch.randint(0, 1 << 29, (40, 57), generator=gen)
    dist[:, 5] = torch.finfo(torch.float32).max
    rows[:, 6] = (1 << 29) - 1
    found = torch.rand(40, 57, generator=gen) > 0.2
    found[3] = False  # a query with no candidate
    want_d, want_i = lex_sort(torch.where(found, dist, float("inf")),
                              torch.where(found, rows, -1))
    got_d, got_i = F._sorted_by_keys(dist, torch.where(found, rows, -1), found)
    assert torch.equal(got_i, want_i) and torch.equal(got_d, want_d)
    assert got_d.dtype == torch.float32 and (got_i[3] == -1).all()
    assert (got_d == torch.finfo(torch.float32).max).sum() == found[:, 5].sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32-keys", "fp64-sort"])
def test_off_cpu_picker_orders_ties_by_column(dtype):
    """The picker knn uses off the CPU reads nothing on the host and still takes equal
    entries lowest column first (a stable sort's first n), with inf and NaN last."""
    gen = torch.Generator().manual_seed(3)
    d = torch.randint(0, 5, (7, 300), generator=gen).to(dtype) / 4  # many exact ties
    d[0] = 1.0
    d[1, ::2] = -0.0
    d[2, :290] = float("inf")
    d[3, 5:] = float("nan")
    d[4] = torch.finfo(dtype).max
    for n in (1, 4, 9):
        vals, cols = F._smallest_in_order(d, n)
        want = torch.sort(torch.nan_to_num(d.abs(), nan=float("inf")), dim=1,
                          stable=True).indices[:, :n]
        assert torch.equal(cols, want)
        torch.testing.assert_close(vals, d.gather(1, want), equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize(("q", "m", "d", "k"), KNN_SHAPES,
                         ids=[f"Q{q}-M{m}-D{d}-k{k}" for q, m, d, k in KNN_SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_knn_with_the_off_cpu_picker_matches(monkeypatch, q, m, d, k, dtype):
    """knn with the sync-free picker and the sorting merge it uses off the CPU (forced here on
    the CPU) returns what the CPU's unordered pick and merge do, ties and padding included."""
    gen = torch.Generator().manual_seed(q + m)
    db = torch.randint(-2, 3, (m, d), generator=gen).to(dtype)  # duplicate rows, exact ties
    queries = torch.randint(-2, 3, (q, d), generator=gen).to(dtype)
    want = F.knn(queries, db, k, block_size=4)
    assert F._search_steps("cpu")[1] is F._merge_unordered
    monkeypatch.setattr(F, "_search_steps", lambda device_type: (F._smallest_in_order,
                                                                  F._merge_topk))
    got = F.knn(queries, db, k, block_size=4)
    assert torch.equal(got[1], want[1])
    assert torch.equal(got[0], want[0])


@pytest.mark.parametrize("k", [1, 7, 60])
def test_knn_with_the_sync_free_narrowing_matches(monkeypatch, k):
    """knn through the off-CPU picker with its tiles narrowed by group minima (forced here on
    the CPU; tiles of all 5,000 rows, duplicate rows and exact ties) returns what the CPU's
    pick and merge do."""
    gen = torch.Generator().manual_seed(12)
    db = torch.randint(-2, 3, (5000, 6), generator=gen).float()
    db[4000:] = torch.randn(1000, 6, generator=gen)
    db[17] = float("nan")
    queries = torch.cat([torch.randint(-2, 3, (6, 6), generator=gen).float(),
                         torch.randn(6, 6, generator=gen)])
    want = F.knn(queries, db, k)
    monkeypatch.setattr(F, "_search_steps", lambda device_type: (F._smallest_in_order,
                                                                  F._merge_topk))
    monkeypatch.setattr(F, "DEVICE_NARROWED_PICK", True)
    narrowed = []
    real = F._grouped_in_order
    monkeypatch.setattr(F, "_grouped_in_order", lambda *a: narrowed.append(1) or real(*a))
    got = F.knn(queries, db, k)
    assert narrowed  # the narrowing ran
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("narrowed", [False, True], ids=["whole tiles", "narrowed"])
def test_knn_on_cuda_is_sync_free_and_matches_the_cpu(monkeypatch, narrowed):
    """The torch knn on a CUDA device reads nothing on the host (CUDA sync debugging set to
    error) and returns the CPU's neighbours, duplicates and padding included; also with its
    tiles (all 3,000 rows) narrowed by group minima (DEVICE_NARROWED_PICK)."""
    monkeypatch.setattr(F, "DEVICE_NARROWED_PICK", narrowed)
    block = None if narrowed else 512
    gen = torch.Generator().manual_seed(5)
    db = torch.randint(-2, 3, (3000, 16), generator=gen).float()
    queries = torch.randint(-2, 3, (50, 16), generator=gen).float()
    q_dev, db_dev = queries.cuda(), db.cuda()  # the copies from host memory synchronise
    norms = F.database_sq_norms_of(db_dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = F.knn(q_dev, db_dev, 5, database_sq_norms=norms, block_size=block)
        pad = F.knn(q_dev, db_dev[:3], 5, database_sq_norms=norms[:3])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = F.knn(queries, db, 5, block_size=block)
    assert torch.equal(got[1].cpu(), want[1])
    assert torch.equal(got[0].cpu(), want[0])
    assert torch.equal(pad[1].cpu(), F.knn(queries, db[:3], 5)[1])


def test_knn_rejects_bad_k_and_dimension():
    for k in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            F.knn(torch.zeros(2, 3), torch.zeros(4, 3), k)
    with pytest.raises(ValueError, match="database has dimension 4, expected 3"):
        F.knn(torch.zeros(2, 3), torch.zeros(4, 4))


@pytest.mark.parametrize("size", [0, -3, 2.5])
def test_tile_sizes_must_be_positive_integers(size):
    """A negative tile size skipped every tile: knn found no neighbour (indices -1) and the
    gradient step failed inside torch.empty; 0 or a float were taken or failed elsewhere."""
    h, protos, p_ood = _problem(12, 3, 5, dtype=torch.float32)
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        F.knn(h, protos, 1, block_size=size)
    with pytest.raises(ValueError, match="block_rows must be a positive integer"):
        F.ncp_gradient(h, protos, p_ood, block_rows=size)
    with pytest.raises(ValueError, match="block_classes must be a positive integer"):
        F.ncp_gradient(h, protos, p_ood, block_classes=size)
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        F.database_sq_norms_of(protos, block_size=size)


def test_class_prototypes_refuses_labels_that_are_not_class_ids():
    """Float labels were cast to int64 (1.7 counted as class 1) and booleans read as 0/1."""
    x, y = clustered_features(20, 3, 4, seed=3)
    for labels in (y.double() + 0.7, y.float(), y > 0):
        with pytest.raises(TypeError, match="labels must hold integer class ids"):
            F.class_prototypes(x, labels, 3)
    for n in (0, 3.0, True):
        with pytest.raises(ValueError, match="num_classes must be a positive integer"):
            F.class_prototypes(x, y, n)
    assert F.class_prototypes(x, y.to(torch.uint8), 3).counts.sum() == 20



def test_add_rows_by_class_checks_what_it_is_given():
    """The public building block passed its arguments straight to index_add_ (index_put_ on
    a GPU): a class id out of range was torch's "index out of range in self" on the CPU and
    a device-side assert, which ends the process's CUDA context, on a GPU; rows of another
    dtype, "self (Double) and source (Float) must have the same scalar type". Nothing is
    added when it refuses."""
    x, y = clustered_features(20, 3, 4, seed=3)
    sums = torch.zeros(3, 4, dtype=torch.float64)
    F.add_rows_by_class(sums, y, x.double())
    want = torch.stack([x.double()[y == c].sum(0) for c in range(3)])
    torch.testing.assert_close(sums, want, rtol=0, atol=1e-12)
    F.add_rows_by_class(sums, y[:0], x.double()[:0])  # no rows: nothing added
    torch.testing.assert_close(sums, want, rtol=0, atol=1e-12)
    F.add_rows_by_class(sums, y.to(torch.uint8), x.double())  # any integer ids
    torch.testing.assert_close(sums, 2 * want, rtol=0, atol=1e-12)
    sums -= want
    before = sums.clone()
    cases = [
        (ValueError, r"^labels holds class id 3, out of range for 3 classes \(the rows of sums\)$",
         (sums, torch.tensor([0, 3]), x.double()[:2])),
        (ValueError, r"^labels must be >= 0, found -1 \(1 row\(s\) labelled -1, as pytorch-ood "
                     r"marks OOD samples: keep the others, e.g. features\[labels >= 0\] and "
                     r"labels\[labels >= 0\]\)$",
         (sums, torch.tensor([0, -1]), x.double()[:2])),
        (TypeError, r"^labels must hold integer class ids, got dtype float32",
         (sums, y.float(), x.double())),
        (ValueError, r"^labels has 2 entries but rows has 20$",
         (sums, y[:2], x.double())),
        (TypeError, r"^rows must have the dtype of sums \(torch.float64\), got torch.float32$",
         (sums, y, x.float())),
        (ValueError, r"^rows has dimension 3, expected 4 \(the dimension of sums\)$",
         (sums, y, x.double()[:, :3])),
        (TypeError, r"^sums must be floating point", (sums.long(), y, x.double())),
        (ValueError, r"^sums must have 2 dimension\(s\)", (sums[0], y, x.double())),
    ]
    for error, message, args in cases:
        with pytest.raises(error, match=message):
            F.add_rows_by_class(*args)
    assert torch.equal(sums, before)


@pytest.mark.parametrize(("n_q", "n_cand", "tile"),
                         [(10000, 5, (1024, 4096)), (10000, 128, (1024, 4096)),
                          (10000, 129, (512, 8192)), (10000, 204, (512, 8192)),
                          (10000, 504, (256, 16384)), (10000, 1004, (128, 32768)),
                          (10000, 5000, (128, 32768)), (300, 204, (300, 13981)),
                          (300, 304, (256, 16384)), (100, 1004, (100, 41943))])
def test_cpu_search_tiles_widen_for_many_candidates(n_q, n_cand, tile):
    """On the CPU a search for many neighbours takes tiles wide enough for the narrowing by
    group minima (at least 32 database rows per candidate, a power of two, at most
    WIDE_SEARCH_TILE), with as many fewer queries (at least MIN_SEARCH_QUERIES); few
    candidates, or tiles already wide, keep the default."""
    bq, bm = F.search_tile("cpu", n_q, n_cand)
    assert (bq, bm) == tile
    assert bq * bm <= max(F.TILE_ELEMENTS, F.MIN_SEARCH_QUERIES * F.WIDE_SEARCH_TILE)
    if n_cand <= 1024:
        assert F._group_size((bq, bm), n_cand)  # the wide tile is narrowed


@pytest.mark.parametrize(("k", "dtype"), [(1, torch.float32), (130, torch.float32),
                                          (300, torch.float32), (130, torch.float64)],
                         ids=["k1-fp32", "k130-fp32", "k300-fp32", "k130-fp64"])
def test_knn_with_wide_tiles_for_many_neighbours_matches(monkeypatch, k, dtype):
    """The CPU search's wider tiles for many neighbours give the neighbours and distances
    of the default tiles bit for bit (duplicate rows and exact ties included); a block_size
    given keeps the default number of queries a tile, and so does a database converted tile
    by tile (half-precision storage, bf16 rounding: its buffer would grow with the tile)."""
    gen = torch.Generator().manual_seed(k)
    db = torch.randint(-3, 4, (20000, 8), generator=gen).to(dtype)
    db[15000:] = torch.randn(5000, 8, generator=gen, dtype=dtype)
    queries = torch.cat([torch.randint(-3, 4, (600, 8), generator=gen).to(dtype),
                         torch.randn(500, 8, generator=gen, dtype=dtype)])
    tiles = []
    real = F.search_tile
    monkeypatch.setattr(F, "search_tile", lambda *a: tiles.append(real(*a)) or tiles[-1])
    got = F.knn(queries, db, k)
    assert tiles[-1] == {1: (1024, 4096), 130: (512, 8192), 300: (256, 16384)}[k]
    monkeypatch.setattr(F, "WIDE_SEARCH_TILE", 0)  # the default tiles at every k
    want = F.knn(queries, db, k)
    assert tiles[-1] == (1024, 4096)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    if k != 130:
        return
    monkeypatch.setattr(F, "WIDE_SEARCH_TILE", 1 << 15)
    F.knn(queries[:1024], db, k, block_size=5000)
    assert tiles[-1] == (1024, 4096)
    F.knn(queries[:1024], db.to(torch.bfloat16), k, rerank_database=db)
    assert tiles[-1] == (1024, 4096)
    F.knn(queries[:1024], db, k, precision="bf16")  # (float64 is computed in ieee: no rounding)
    assert tiles[-1] == ((1024, 4096) if dtype == torch.float32 else (512, 8192))


def test_tiles_are_cache_sized_on_the_cpu_and_large_elsewhere():
    """On the CPU the tiles keep their working set in cache (unchanged); on a GPU the torch
    path was host-bound with those tiles (an H200: 243 ms for 65,536 x 1,000 x 2,048 in ~114
    tiles of ~60 launches each), so there a tile holds up to DEVICE_TILE_ELEMENTS."""
    assert F.gradient_tile_rows("cpu", 1000, 2048) == 576
    assert F.gradient_tile_rows("cpu", 10, 512) == 3968
    assert F.gradient_tile_rows("cuda", 1000, 2048) == F.DEVICE_TILE_ELEMENTS // 2048 == 8192
    assert F.gradient_tile_rows("cuda", 16384, 1024) == 1024
    assert F.search_tile("cpu", 10000) == (1024, 4096)
    assert F.search_tile("cuda", 10000) == (4096, 4096)
    assert F.search_tile("cuda", 10000, 1004) == (4096, 4096)
    assert F.search_tile("cuda", 7) == (7, F.DEVICE_TILE_ELEMENTS // 7)
    for device_type in ("cpu", "cuda"):  # every tile at least one row, whatever the width
        assert F.gradient_tile_rows(device_type, 1 << 14, 1 << 26) == 1


def test_cpu_class_blocks_are_narrow_and_even(monkeypatch):
    """On the CPU a wide class set is cut into even blocks of at most CPU_CLASS_BLOCK (one
    block up to 16,384 classes kept the [rows, block] tile and its float64 softmax terms far
    past the caches: 32-36 % slower at C = 21,841, D = 1,024); elsewhere one block up to
    DEVICE_CLASS_BLOCK. The answers are those of one block, to rounding."""
    assert F.CPU_CLASS_BLOCK == 1024 and F.DEVICE_CLASS_BLOCK == 1 << 14
    for c, cpu, cuda in [(1, 1, 1), (1000, 1000, 1000), (1024, 1024, 1024),
                         (1025, 513, 1025), (1100, 550, 1100), (2049, 683, 2049),
                         (21841, 993, 16384), (40000, 1000, 16384)]:
        assert F.gradient_class_block("cpu", c) == cpu
        assert F.gradient_class_block("cuda", c) == cuda
    gen = torch.Generator().manual_seed(5)
    h, protos = torch.randn(37, 9, generator=gen), torch.randn(1100, 9, generator=gen)
    p_ood = protos.mean(0)
    widths = []
    nearest = F._nearest
    monkeypatch.setattr(F, "_nearest", lambda dist, k: (widths.append(dist.shape[1]),
                                                       nearest(dist, k))[1])
    res = F.ncp_gradient(h, protos, p_ood)
    assert widths == [550, 550]
    widths.clear()
    whole = F.ncp_gradient(h, protos, p_ood, block_classes=1100)
    assert widths == [1100]
    assert torch.equal(res.pred, whole.pred)
    for mine, theirs in zip(res, whole, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7)
