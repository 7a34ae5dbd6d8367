"""The Triton knn kernel against float64 brute force (interpreter on the CPU, or a GPU)."""

import itertools
import os

import numpy as np
import pytest
import torch
from conftest import NEEDS_BF16, clustered_features
from reference import knn_naive

pytest.importorskip("triton")

import triton
import triton.language as tl

from grood import GROOD, functional
from grood_kernels import _knn_configs, _launch, contract
from grood_kernels import knn as kernel_module
from grood_kernels._topk import clamp_sq
from grood_kernels.knn import knn

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEVICE = "cuda" if ON_GPU else "cpu"

# (Q, M, D, k): single query / row, primes, one past a 64-row block, k up to 16, M < k.
CASES = [(1, 1, 1, 1), (1, 5, 3, 3), (9, 37, 11, 1), (9, 37, 11, 4), (65, 130, 20, 16),
         (3, 2, 4, 5), (17, 257, 33, 2)]


def _data(q, m, d, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    db = torch.randn(m, d, generator=gen)
    queries = torch.randn(q, d, generator=gen)
    return queries.to(DEVICE, dtype), db.to(DEVICE, dtype)


@pytest.mark.parametrize(("q", "m", "d", "k"), CASES,
                         ids=[f"Q{q}-M{m}-D{d}-k{k}" for q, m, d, k in CASES])
def test_matches_float64_brute_force(q, m, d, k, monkeypatch):
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):  # every buffer the launcher allocates starts poisoned
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -7)

    monkeypatch.setattr(kernel_module.torch, "empty", nan_empty)
    queries, db = _data(q, m, d, seed=q * 1000 + m)
    dist, idx = knn(queries, db, k)
    ref_d, ref_i = knn_naive(queries.cpu(), db.cpu(), k)
    assert torch.equal(idx.cpu(), ref_i)
    torch.testing.assert_close(dist.double().cpu(), ref_d, rtol=1e-5, atol=1e-6)


def test_ties_and_duplicate_rows_prefer_the_lower_index():
    db = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0], [1.0, 0.0]],
                      device=DEVICE)
    dist, idx = knn(torch.tensor([[1.0, 0.0]], device=DEVICE), db, 3)
    assert idx.tolist() == [[0, 2, 4]] and dist.tolist() == [[0.0, 0.0, 0.0]]
    dist, idx = knn(torch.zeros(1, 2, device=DEVICE), db, 4)
    assert idx.tolist() == [[0, 1, 2, 3]]


def test_pads_like_faiss_when_database_is_smaller_than_k():
    dist, idx = knn(torch.zeros(2, 3, device=DEVICE), torch.ones(2, 3, device=DEVICE), 4)
    assert idx.tolist() == [[0, 1, -1, -1]] * 2
    assert bool(torch.isinf(dist[:, 2:]).all()) and dist[:, :2].tolist() == [[3.0, 3.0]] * 2


# NaN and Inf inputs: the interpreter's numpy warns on the arithmetic they meet (expected here).
@pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.*")
def test_queries_and_rows_with_nan_or_inf_agree_on_both_backends():
    """A query with a NaN or an Inf, or a squared norm beyond float32, has no neighbour
    (inf, -1) and a database row with one is never found, on both backends (the torch twin
    returned the rows an Inf query's GEMM put at inf, with inf distances, and found rows
    for a query whose squared norm overflowed, where the kernel returned none)."""
    queries, db = _data(6, 40, 9, seed=5)
    queries[1, 2], queries[3] = float("inf"), -float("inf")
    queries[4, 0] = float("nan")
    queries[5, 7] = 3e19  # finite, but its squared norm overflows float32 (as row 33's)
    # More bad rows than the 3 + 4 candidates kept per query: compiled, a NaN distance
    # clamped by a plain maximum became 0 and such rows filled every slot.
    bad_rows = [2, 7, 11, 20, 21, 25, 30, 33, 39]
    for i, row in enumerate(bad_rows):
        db[row, i % 9] = (float("nan"), float("inf"), -float("inf"), 3e19)[i % 4]
    db[20] = float("nan")
    finite_rows = torch.tensor([i for i in range(40) if i not in bad_rows])
    ref_d, ref_i = knn_naive(queries[[0, 2]].cpu(), db[finite_rows].cpu(), 3)
    for dist, idx in (knn(queries, db, 3), functional.knn(queries, db, 3)):
        assert idx[[1, 3, 4, 5]].tolist() == [[-1] * 3] * 4
        assert bool(torch.isinf(dist[[1, 3, 4, 5]]).all())
        assert torch.equal(idx[[0, 2]].cpu(), finite_rows[ref_i])
        torch.testing.assert_close(dist[[0, 2]].double().cpu(), ref_d, rtol=1e-5,
                                   atol=1e-6)
    # Squared norms beyond float32 though the distances fit: no match on either backend (the
    # twin found these two queries' neighbours in a batch of two, and none for one alone).
    q_huge = torch.tensor([[9.05e19], [3.31e19]], device=DEVICE)
    db_huge = torch.tensor([[7.77e19], [9.33e19], [3.84e19]], device=DEVICE)
    for dist, idx in (knn(q_huge, db_huge, 2), functional.knn(q_huge, db_huge, 2)):
        assert idx.tolist() == [[-1, -1]] * 2 and bool(torch.isinf(dist).all())
    few = db[[7, 20, 3]]  # one finite row: the other two places stay empty
    for dist, idx in (knn(queries[:1], few, 3), functional.knn(queries[:1], few, 3)):
        assert idx.tolist() == [[2, -1, -1]] and bool(torch.isinf(dist[0, 1:]).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_storage(dtype):
    queries, db = _data(12, 90, 24, seed=3, dtype=dtype)
    dist, idx = knn(queries, db, 2)
    ref_d, ref_i = knn_naive(queries.cpu(), db.cpu(), 2)
    assert torch.equal(idx.cpu(), ref_i)
    torch.testing.assert_close(dist.double().cpu(), ref_d, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("precision", ["ieee", "tf32x3", "tf32",
                                       pytest.param("bf16", marks=NEEDS_BF16)])
def test_precision_modes_return_exact_fp32_results(precision, request):
    """Every mode picks its candidates by its own GEMM (on the CPU with TF32 rounded as
    tensor cores round it, ``tensor_core_tf32``) and returns float64's neighbours with exact
    fp32 distances."""
    if precision.startswith("tf32") and not ON_GPU:
        request.getfixturevalue("tensor_core_tf32")
    queries, db = _data(20, 150, 40, seed=4)
    dist, idx = knn(queries, db, 3, precision=precision)
    ref_d, ref_i = functional.knn(queries.double(), db.double(), 3)
    assert torch.equal(idx, ref_i)
    torch.testing.assert_close(dist.double(), ref_d, rtol=1e-5, atol=1e-6)


def test_strided_inputs_and_given_norms():
    queries, db = _data(10, 70, 16, seed=5)
    wide = torch.zeros(70, 48, device=DEVICE)
    wide[:, ::3] = db
    want = knn(queries, db, 2)
    got = knn(queries.T.contiguous().T, wide[:, ::3], 2,
              database_sq_norms=(db * db).sum(1))
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0])


def test_launcher_checks():
    queries, db = _data(3, 5, 4, seed=6)
    for k in (0, -1, 2.0, True, "2"):  # 2.0 failed inside torch.full, True ran as k = 1
        with pytest.raises(ValueError, match="k must be a positive integer"):
            knn(queries, db, k)
    assert torch.equal(knn(queries, db, np.int64(2))[1], knn(queries, db, 2)[1])
    with pytest.raises(TypeError, match="float64"):
        knn(queries.double(), db.double())
    with pytest.raises(ValueError, match="database_sq_norms must have shape"):
        knn(queries, db, database_sq_norms=torch.ones(2, device=DEVICE))
    assert kernel_module.RERANK_EXTRA is contract.RERANK_EXTRA is functional.RERANK_EXTRA
    from grood_kernels import _knn_merge  # the torch merge for host rows and large k

    assert _knn_merge.lex_order is contract.lex_order
    assert _knn_merge.RERANK_EXTRA is contract.RERANK_EXTRA


def test_recall_on_real_grood_gradients():
    x, y = clustered_features(400, 6, 24, seed=7, spread=0.5, dtype=torch.float32)
    test, _ = clustered_features(40, 6, 24, seed=8, spread=0.7, dtype=torch.float32)
    det = GROOD(backend="torch").fit(x, y)
    grads = det._grads(test).grad.to(DEVICE)
    db = det.index_.vectors.to(DEVICE)
    _, idx = knn(grads, db, 1)
    _, ref = knn_naive(grads.cpu(), db.cpu(), 1)
    assert torch.equal(idx.cpu(), ref)


def _tied_problem():
    """Integer-valued queries and database in {-2..2} (exact in every precision mode), with a
    block of 50 database rows duplicated further on: many exact ties, across tiles and splits."""
    gen = torch.Generator().manual_seed(7)
    db = torch.randint(-2, 3, (900, 24), generator=gen).float()
    db[600:650] = db[100:150]
    db[300:400] = db[0]  # 100 copies of one row: more ties than any candidate list holds
    queries = torch.randint(-2, 3, (20, 24), generator=gen).float()
    queries[:10] = db[110:120] + (torch.rand(10, 24, generator=gen) < 0.1).float()
    queries[10] = db[0]
    return queries.to(DEVICE), db.to(DEVICE)


def lexicographic_knn(queries, db, k):
    """Float64 brute force, ordered by (distance, index)."""
    d = ((queries.double().cpu()[:, None] - db.double().cpu()[None]) ** 2).sum(2)
    idx = torch.arange(db.shape[0]).expand_as(d).clone()
    d, idx = functional.lex_sort(d, idx)
    return d[:, :k], idx[:, :k]


def _small_tiles(monkeypatch, group_q=2):
    """Force small tiles, several query groups (the last one partial) and database splits."""
    real = _knn_configs.launch_config

    def small(n_q, n_db, d, precision, **kw):
        cfg = real(n_q, n_db, d, precision, **kw)
        return cfg._replace(block_rows=16, block_cols=16, block_d=16, num_warps=4,
                            group_rows=group_q, n_split=max(1, min(7, n_db // 64)))

    monkeypatch.setattr(_knn_configs, "launch_config", small)


PRECISIONS = ["ieee", "tf32", "tf32x3", pytest.param("bf16", marks=NEEDS_BF16)]


@pytest.mark.parametrize("k", [1, 4, 9])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_exact_ties_follow_the_lower_index_rule(k, precision, monkeypatch):
    _small_tiles(monkeypatch)
    queries, db = _tied_problem()
    dist, idx = knn(queries, db, k, precision=precision)
    ref_d, ref_i = lexicographic_knn(queries, db, k)
    assert torch.equal(idx.cpu(), ref_i)
    assert torch.equal(dist.cpu().double(), ref_d)
    _, twin_i = functional.knn(queries, db, k, block_size=64)
    assert torch.equal(twin_i.cpu(), ref_i)


def test_grouped_order_and_splits_cover_every_row(monkeypatch):
    _small_tiles(monkeypatch, group_q=3)
    queries, db = _data(83, 700, 19, seed=5)
    dist, idx = knn(queries, db, 3)
    ref_d, ref_i = knn_naive(queries.cpu(), db.cpu(), 3)
    assert torch.equal(idx.cpu(), ref_i)
    torch.testing.assert_close(dist.double().cpu(), ref_d, rtol=1e-5, atol=1e-6)


def test_gated_insertion_runs_fewer_rounds(monkeypatch):
    _small_tiles(monkeypatch)
    x, _ = clustered_features(1200, 8, 16, seed=2, dtype=torch.float32)
    queries, db = x[:40].to(DEVICE), x[40:].to(DEVICE)
    rounds = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    _, idx = knn(queries, db, 1, insert_rounds=rounds)
    _, ref_i = knn_naive(queries.cpu(), db.cpu(), 1)
    assert torch.equal(idx.cpu(), ref_i)
    cfg = _knn_configs.launch_config(40, 1160, 16, "ieee")
    tiles = -(-1160 // (cfg.n_split * 16)) * cfg.n_split
    ungated = -(-40 // 16) * tiles * 8  # every tile of every program runs N_CAND = 8 rounds
    assert 0 < int(rounds) < ungated / 2


def test_bf16_storage_with_an_exact_copy_for_the_rerank():
    queries, db = _data(30, 300, 40, seed=9)
    dist, idx = knn(queries, db.to(torch.bfloat16), 2, rerank_database=db.cpu())
    ref_d, ref_i = knn_naive(queries.cpu(), db.cpu(), 2)
    assert torch.equal(idx.cpu(), ref_i)
    torch.testing.assert_close(dist.double().cpu(), ref_d, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 6, 32])
def test_fused_merge_equals_the_torch_merge(k):
    """The fused merge-and-re-rank kernel against the same computation in torch, on candidate
    lists shaped as the search leaves them (disjoint ascending id ranges per split, empty
    slots, exact ties across splits), wider than one merge chunk."""
    from grood_kernels._knn_merge import merge_and_rerank, merge_and_rerank_torch

    gen = torch.Generator().manual_seed(k)
    db = torch.randint(-2, 3, (600, 12), generator=gen).float()
    db[300:400] = db[:100]  # exact ties across splits
    queries = torch.randint(-2, 3, (37, 12), generator=gen).float()
    n_split, n_cand = 12, triton_next_pow2(k + 4)
    rows = 600 // n_split
    cand_d = torch.full((37, n_split, n_cand), float("inf"))
    cand_i = torch.full((37, n_split, n_cand), -1, dtype=torch.int32)
    for s in range(n_split):
        ids = torch.arange(s * rows, (s + 1) * rows)
        d = ((queries[:, None, :] - db[ids][None]) ** 2).sum(2)
        keep = min(n_cand - (s % 3), rows)  # some splits leave empty slots
        order = torch.sort(d, dim=1, stable=True).indices[:, :keep]
        cand_d[:, s, :keep] = d.gather(1, order)
        cand_i[:, s, :keep] = ids[order].int()
    queries, db = queries.to(DEVICE), db.to(DEVICE)
    cand_d, cand_i = cand_d.view(37, -1).to(DEVICE), cand_i.view(37, -1).to(DEVICE)
    out_d = torch.full((37, k), float("nan"), device=DEVICE)
    out_i = torch.full((37, k), -7, dtype=torch.int64, device=DEVICE)
    merge_and_rerank(queries, db, cand_d, cand_i, k, k + 4, out_d, out_i)
    ref_d, ref_i = merge_and_rerank_torch(queries, db, cand_d, cand_i.long(), k,
                                           torch.empty_like(out_d), torch.empty_like(out_i))
    assert torch.equal(out_i, ref_i)
    assert torch.equal(out_d, ref_d)  # integer data: every order of summation is exact
    assert torch.equal(out_i.cpu(), lexicographic_knn(queries, db, k)[1])


def test_large_k_merges_in_torch():
    queries, db = _data(9, 300, 10, seed=4)
    dist, idx = knn(queries, db, 40)  # k + 4 > MAX_FUSED_KEEP
    ref_d, ref_i = knn_naive(queries.cpu(), db.cpu(), 40)
    assert torch.equal(idx.cpu(), ref_i)
    torch.testing.assert_close(dist.double().cpu(), ref_d, rtol=1e-5, atol=1e-6)


def triton_next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def test_a_nearer_row_evicts_the_highest_id_among_tied_worst_candidates(monkeypatch):
    """Ten rows tie at the worst kept distance when three nearer rows arrive in a later tile:
    the three evicted must be the highest ids of the tie (7, 6, 5), so the 4th nearest is 0."""
    _small_tiles(monkeypatch)
    db = torch.zeros(32, 4)
    db[:, 0] = 10.0
    db[:10] = torch.tensor([2.0, 1.0, 0.0, 0.0])  # squared distance 5, ids 0..9
    db[16:19] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # squared distance 1, in the second tile
    queries = torch.zeros(3, 4)
    dist, idx = knn(queries.to(DEVICE), db.to(DEVICE), 4)
    assert idx.cpu().tolist() == [[16, 17, 18, 0]] * 3
    assert dist.cpu().tolist() == [[1.0, 1.0, 1.0, 5.0]] * 3


@triton.jit
def _clamp_kernel(x_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, clamp_sq(tl.load(x_ptr + offs)))


def test_clamped_squared_distances_make_nan_inf():
    """The kernels' clamp of ``||a||^2 + ||b||^2 - 2 a.b``: negatives to 0, NaN to +inf (never
    a candidate), whatever ``maximum`` does with NaN on the device."""
    x = torch.tensor([2.5, -1e-3, 0.0, float("nan"), float("inf"), -float("inf"), -0.0, 7.0],
                     device=DEVICE)
    out = torch.full_like(x, -5.0)
    _clamp_kernel[(1,)](x, out, N=8)
    assert out.tolist() == [2.5, 0.0, 0.0, float("inf"), float("inf"), 0.0, 0.0, 7.0]


def test_the_flat_top_k_gate_gives_the_same_results(monkeypatch):
    """On sm_100 and later the launcher reshapes the top-k gate's flags before reducing them
    (``FLAT_GATE``, a workaround for triton 3.6's TMEM layout pass): the same neighbours and
    distances, bit for bit, over many database tiles."""
    queries, db = _data(21, 700, 24, seed=8)
    want = knn(queries, db, 5)
    monkeypatch.setattr(_launch, "target_major", lambda device: 10)  # as on sm_100
    got = knn(queries, db, 5)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_blackwell_takes_smaller_tiles_under_older_triton(monkeypatch):
    """Under triton before 3.9 the search's Hopper tiles spill on Blackwell (tcgen05): the
    launcher takes BLACKWELL_SMALL_TILES there, for every tensor-core mode, and only there
    (not on Hopper, not in ieee, not under triton 3.9); the results are the same, bit for bit
    (neighbours and exact distances), with the flat gate on as on sm_100."""
    def cfg(precision, major, x_bytes=4):
        c = _knn_configs.launch_config(4096, 1 << 20, 512, precision, x_bytes=x_bytes,
                                       major=major)
        return (c.block_rows, c.block_cols, c.block_d, c.num_warps, c.num_stages)

    hopper = {p: cfg(p, 9) for p in ("ieee", "tf32", "tf32x3", "bf16")}
    monkeypatch.setattr(_launch, "triton_version", lambda: (3, 6))
    small = _knn_configs.BLACKWELL_SMALL_TILES
    for precision in ("tf32", "tf32x3", "bf16"):
        assert cfg(precision, 10) == small[precision][:5] != hopper[precision]
        assert cfg(precision, 9) == hopper[precision]
    assert cfg("bf16", 10, x_bytes=2) == small["bf16-storage"][:5]
    assert cfg("ieee", 10) == hopper["ieee"]
    monkeypatch.setattr(_launch, "triton_version", lambda: (3, 9))
    assert cfg("tf32", 10) == hopper["tf32"]

    queries, db = _data(37, 900, 24, seed=9)
    want = knn(queries, db, 5, precision="tf32")
    monkeypatch.setattr(_launch, "triton_version", lambda: (3, 6))
    monkeypatch.setattr(kernel_module, "target_major", lambda device: 10)
    monkeypatch.setattr(_launch, "target_major", lambda device: 10)
    got = knn(queries, db, 5, precision="tf32")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def _poison_empty(monkeypatch):
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):  # every buffer the launcher allocates starts poisoned
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -7)

    monkeypatch.setattr(kernel_module.torch, "empty", nan_empty)


@pytest.mark.parametrize("k", [1, 3, 40])
@pytest.mark.parametrize("precision", ["ieee", pytest.param("bf16", marks=NEEDS_BF16)])
def test_a_database_copied_to_bf16_in_chunks_searches_as_bf16_storage(k, precision,
                                                                       monkeypatch):
    """The per-call bf16 copy, cast and searched chunk by chunk (4 chunks, the last shorter;
    the copy's buffer reused): the same neighbours and exact distances (bit for bit under the
    interpreter, to ulps compiled) as the same rows stored in bf16 with the fp32 rows for the
    re-rank, and float64's; ties across
    chunks go to the lower index; the caller's database is untouched. In bf16 mode (the
    launcher copies there) and in ``ieee`` with the copy made to happen (its GEMM then exact
    on the bf16 rows); k = 40 merges in torch."""
    _poison_empty(monkeypatch)
    monkeypatch.setattr(kernel_module, "casts_database",
                        lambda n_q, precision, x_dtype: x_dtype != torch.bfloat16)
    monkeypatch.setattr(_knn_configs, "CAST_CHUNK_BYTES", 100 * 40 * 2)
    assert _knn_configs.cast_chunks(301, 40) == [(0, 76), (76, 152), (152, 228), (228, 301)]
    queries, db = _data(30, 301, 40, seed=12)
    db[150] = db[299] = db[17]  # one row three times, in three chunks
    queries[3] = db[17]
    before = db.clone()
    dist, idx = knn(queries, db, k, precision=precision)
    want_d, want_i = knn(queries, db.to(torch.bfloat16), k, precision=precision,
                         rerank_database=db)
    assert torch.equal(idx, want_i)
    # Bit for bit under the interpreter; compiled, a chunk's tiles (fitted to its 76 rows) lay
    # the exact re-rank's row sums out otherwise than the whole database's (ulps, H200).
    tol = {"rtol": 1e-6, "atol": 0} if ON_GPU else {"rtol": 0, "atol": 0}
    torch.testing.assert_close(dist, want_d, **tol)
    ref_d, ref_i = knn_naive(queries.cpu(), db.cpu(), k)
    assert torch.equal(idx.cpu(), ref_i)
    torch.testing.assert_close(dist.double().cpu(), ref_d, rtol=1e-5, atol=1e-6)
    assert idx[3, :3].tolist() == [17, 150, 299][:k]
    assert torch.equal(db, before)


def test_when_bf16_mode_copies_the_database():
    """The rule: bf16 mode, a database not stored in bf16, CAST_MIN_QUERIES queries or more;
    the chunks cover the rows in order within CAST_CHUNK_BYTES; the compile report's launches
    follow it (two chunks of bf16 rows at ImageNet-1k's 1.28 M x 2,048, one fp32 launch with
    fewer queries); ``cast_database=True`` is refused where there is nothing to copy."""
    rule = _knn_configs.casts_database
    many = _knn_configs.CAST_MIN_QUERIES
    assert rule(many, "bf16", torch.float32) and rule(many, "bf16", torch.float16)
    assert not rule(many - 1, "bf16", torch.float32)
    assert not rule(many, "bf16", torch.bfloat16)
    assert not any(rule(many, p, torch.float32) for p in ("ieee", "tf32", "tf32x3"))
    for n_db, d in ((1281167, 2048), (50000, 512), (1, 1)):
        chunks = _knn_configs.cast_chunks(n_db, d)
        assert chunks[0][0] == 0 and chunks[-1][1] == n_db
        assert all(a[1] == b[0] for a, b in itertools.pairwise(chunks))
        assert all((r1 - r0) * d * 2 <= _knn_configs.CAST_CHUNK_BYTES for r0, r1 in chunks)
    assert len(_knn_configs.cast_chunks(1281167, 2048)) == 2

    searches = kernel_module.compile_launches(10000, 1281167, 2048, "bf16")[:-1]
    assert [s.args[1].dtype for s in searches] == [torch.bfloat16] * 2
    assert sum(s.args[1].shape[0] for s in searches) == 1281167
    merge = kernel_module.compile_launches(10000, 1281167, 2048, "bf16")[-1]
    assert merge.args[2].shape[1] == sum(s.args[4].shape[1] * s.args[4].shape[2]
                                         for s in searches)
    few = kernel_module.compile_launches(1000, 1281167, 2048, "bf16")
    assert len(few) == 2 and few[0].args[1].dtype == torch.float32
    assert kernel_module.compile_launches(10000, 50000, 512, "bf16",
                                          storage=torch.bfloat16)[0].args[1].shape[0] == 50000

    from grood._bench.search import _search_variants  # the GPU report times both

    assert list(_search_variants(["torch", "triton"], "bf16", torch.float32, many, "cuda")) == [
        ("torch", {}), ("triton", {}), ("triton", {"cast_database": False})]
    # The torch search narrowed by group minima beside it, off the CPU (the CPU's search
    # narrows its own way) in ieee (auto's search there) and tf32 on an fp32 database.
    assert list(_search_variants(["torch"], "ieee", torch.float32, many, "cuda")) == [
        ("torch", {}), ("torch", {"narrowed_pick": True})]
    assert list(_search_variants(["torch"], "tf32", torch.float32, 8, "cuda"))[1] == (
        "torch", {"narrowed_pick": True})
    assert len(list(_search_variants(["torch"], "ieee", torch.float32, many, "cpu"))) == 1
    assert len(list(_search_variants(["torch"], "bf16", torch.bfloat16, many, "cuda"))) == 1
    assert len(list(_search_variants(["triton"], "bf16", torch.float32, many - 1, "cuda"))) == 1
    assert len(list(_search_variants(["triton"], "bf16", torch.bfloat16, many, "cuda"))) == 1

    queries, db = _data(3, 5, 4, seed=6)
    for precision, rows in (("tf32", db), ("bf16", db.to(torch.bfloat16))):
        with pytest.raises(ValueError, match="cast_database=True"):
            knn(queries, rows, precision=precision, cast_database=True)


@NEEDS_BF16
def test_bf16_mode_on_an_fp32_database_copied_or_cast_per_tile():
    """bf16 mode's per-call copy and its per-tile cast both find float64's neighbours, with
    exact fp32 distances (smaller under the interpreter)."""
    queries, db = _data(300, 5000, 96, seed=13) if ON_GPU else _data(40, 300, 40, seed=13)
    ref_d, ref_i = knn_naive(queries.cpu(), db.cpu(), 4)
    for cast in (True, False):
        dist, idx = knn(queries, db, 4, precision="bf16", cast_database=cast)
        assert torch.equal(idx.cpu(), ref_i)
        torch.testing.assert_close(dist.double().cpu(), ref_d, rtol=1e-5, atol=1e-6)


def test_without_memory_for_the_bf16_copy_the_search_casts_in_the_kernel(monkeypatch):
    """The per-call bf16 copy is a speed-up: where the device cannot hold it, the search
    casts each tile in the K-loop instead, with a warning naming the copy's size, and returns
    what ``cast_database=False`` returns; asked for with ``cast_database=True``, the
    out-of-memory error is raised. (Taken in ``ieee``, as the chunked-copy test above.)"""
    monkeypatch.setattr(kernel_module, "casts_database",
                        lambda n_q, precision, x_dtype: x_dtype != torch.bfloat16)
    queries, db = _data(20, 150, 24, seed=13)
    want = knn(queries, db, 3, cast_database=False)

    def no_memory(rows, d, device):
        raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {rows * d * 2} B")

    monkeypatch.setattr(kernel_module, "_bf16_copy", no_memory)
    with pytest.warns(RuntimeWarning, match=r"no device memory for the bf16 copy .*0\.00 GiB"):
        got = knn(queries, db, 3)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(torch.OutOfMemoryError):
        knn(queries, db, 3, precision="bf16", cast_database=True)


def _expansion_error_bound(queries, db, precision):
    """A bound on |expansion's squared distance - exact| for each query against any row
    (float64 [Q]): the gradient step's (``bench/candidates.py``'s ``gemm_error_bound``, the
    kernels' ``gemm_error_sq``) with the search's operands, in tf32 as loaded, truncated."""
    from test_kernel_ncp_gradient import _candidates

    mode = "tf32-truncated" if precision == "tf32" else precision
    return _candidates().gemm_error_bound(queries, db, mode).amax(1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16"])
@pytest.mark.parametrize(("d", "spread"), [(1, 1e-5), (8, 1e-5), (8, 3e-3)])
def test_a_shared_offset_costs_at_most_twice_the_expansions_error_bound(backend, precision,
                                                                        d, spread, request):
    """Rows that lie close together next to their norms (every coordinate +-0.11 plus noise
    of ``spread``): at 1e-5 (squared distances 1e-10 against norms of 1e-2, below what
    float32 resolves) the expansion that picks the candidates cannot order the rows and the
    k-th neighbour found is mostly not the nearest; at 3e-3 the bound is below the distances.
    What the search guarantees either way: the k-th distance it returns is the exact one to
    the row it returns, never below the true k-th distance, and at most twice the
    expansion's error bound above it (each of the k + 4 candidates that beat a missed row
    lies within the bound of it). The README states this bound."""
    if backend == "triton" and precision == "bf16" and not ON_GPU:
        pytest.skip("the interpreter computes bf16 dots wrongly")
    if backend == "triton" and precision == "tf32" and not ON_GPU:
        request.getfixturevalue("tensor_core_tf32")
    gen = torch.Generator().manual_seed(d)

    def near_offset(n):
        sign = torch.where(torch.rand(n, 1, generator=gen) < 0.5, -1.0, 1.0)
        return (sign * 0.11 + torch.randn(n, d, generator=gen) * spread).to(DEVICE)

    db, queries = near_offset(600), near_offset(48)
    search = knn if backend == "triton" else functional.knn
    true = torch.cdist(queries.double(), db.double()).square().sort(1).values.cpu()
    bound = _expansion_error_bound(queries, db, precision).cpu()
    for k in (1, 3):
        dist, idx = search(queries, db, k, precision=precision)
        found = dist[:, k - 1].double().cpu()
        torch.testing.assert_close(
            found, (queries.double() - db.double()[idx[:, k - 1]]).square().sum(1).cpu(),
            rtol=1e-5, atol=1e-18)
        assert (found >= true[:, k - 1] * (1 - 1e-5)).all()
        assert (found - true[:, k - 1] <= 2 * bound).all(), (found - true[:, k - 1]).max()
