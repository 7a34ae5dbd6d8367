"""The layout holds: import layering, no cycles, benchmarks kept out, optional dependencies
optional, scikit-learn's estimator contract, the index registry, the file-format error."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import clustered_features

import grood
from grood import GROOD, KNN, MSP, Mahalanobis, Mixup, OODPrototypeSource, UniformNoise
from grood.cli import main
from grood.index import (
    INDEXES,
    GradientIndex,
    index_kinds,
    make_index,
    register_index,
)

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Modules ``path`` imports, at any depth (function bodies included), outside
    ``if TYPE_CHECKING:`` blocks; ``from pkg import name`` counts as ``pkg.name`` when that is
    a module of ours, else as ``pkg``."""
    tree = ast.parse(path.read_text())
    own = {_module_name(p) for pkg in ("grood", "grood_kernels")
           for p in (ROOT / pkg).rglob("*.py")}
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in own else node.module)
    return found


def _graph() -> dict[str, set[str]]:
    files = [p for pkg in ("grood", "grood_kernels") for p in (ROOT / pkg).rglob("*.py")]
    names = {_module_name(p): p for p in files}
    return {name: {m for m in _imports(path) if m in names and m != name}
            for name, path in names.items()}


def test_grood_kernels_never_imports_grood():
    for name, deps in _graph().items():
        if name.startswith("grood_kernels"):
            assert not [d for d in deps if d == "grood" or d.startswith("grood.")], name


def test_contract_imports_neither_triton_nor_grood():
    deps = _imports(ROOT / "grood_kernels" / "contract.py")
    assert not [d for d in deps if d.split(".")[0] in ("triton", "grood")], deps


def test_no_import_cycle():
    graph = _graph()
    # The package __init__ re-exports submodules: an edge *into* "grood" from a submodule
    # (``from grood import __version__``) is followed, so a real cycle would still show.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = [*stack[stack.index(dep):], dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_nothing_imports_the_benchmarks():
    for name, deps in _graph().items():
        if name.startswith("grood._bench"):
            continue
        bench = [d for d in deps if d.startswith("grood._bench")]
        # The one entry point: 'grood bench' hands its arguments to the report.
        assert bench == [] or (name == "grood.cli" and bench == ["grood._bench.report"]), name
    assert not (ROOT / "grood" / "bench.py").exists()


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


def test_import_and_help_load_no_benchmark_and_no_optional_dependency():
    out = _run("""
        import sys
        import grood
        from grood.cli import build_parser
        build_parser().format_help()
        loaded = [m for m in sys.modules if m.startswith("grood._bench")
                  or m.split(".")[0] in ("sklearn", "matplotlib", "PIL", "faiss", "onnx",
                                         "onnxscript", "onnxruntime")]
        print("LOADED", loaded)
    """)
    assert out.returncode == 0, out.stderr
    assert "LOADED []" in out.stdout


def test_scores_without_scikit_learn_matplotlib_or_pillow(tmp_path):
    out = _run(f"""
        import sys
        for name in ("sklearn", "matplotlib", "PIL"):
            sys.modules[name] = None   # any import of them now fails
        import torch
        from grood import GROOD, MissingExtraError
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(60, 5, generator=gen) + torch.arange(3).repeat(20)[:, None]
        y = torch.arange(3).repeat(20)
        det = GROOD().fit(x, y)
        det.save({str(tmp_path / 'd.safetensors')!r})
        again = GROOD.load({str(tmp_path / 'd.safetensors')!r})
        assert torch.equal(again.score_samples(x), det.score_samples(x))
        from grood.report import plot_roc
        for call, extra in ((lambda: plot_roc({{}}, "id", ["ood"], "x.png"), "plots"),):
            try:
                call()
            except MissingExtraError as exc:
                assert f"grood[{{extra}}]" in str(exc), exc
            else:
                raise AssertionError("no error")
        from grood.demo import DemoConfig, run_demo
        try:
            run_demo(DemoConfig(out={str(tmp_path)!r}))
        except MissingExtraError as exc:
            assert "grood[demo]" in str(exc), exc
        print("OK")
    """)
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout


def test_cli_demo_without_scikit_learn_names_the_extra(tmp_path):
    out = _run(f"""
        import sys
        sys.modules["sklearn"] = None
        from grood.cli import main
        sys.exit(main(["demo", "--out", {str(tmp_path)!r}, "--quiet"]))
    """)
    assert out.returncode == 2
    assert "pip install 'grood[demo]'" in out.stderr


def test_scikit_learn_clone_and_params():
    pytest.importorskip("sklearn")
    from sklearn.base import clone

    det = GROOD(k=3, index_options={"storage": "bf16"})
    copy = clone(det)
    assert copy is not det and copy.get_params() == det.get_params()
    assert copy.index_options is not det.index_options  # cloned, not shared
    assert clone(KNN(k=5)).k == 5 and clone(Mahalanobis(rcond=1e-6)).rcond == 1e-6
    from grood import ASH, GEN, MaxLogit, ViM

    assert clone(ViM(dim=5)).dim == 5 and clone(ASH(variant="b")).variant == "b"
    assert clone(GEN(M=3)).get_params() == {"gamma": 0.1, "M": 3} and repr(MaxLogit()) == (
        "MaxLogit()")
    assert det.set_params(k=7, batch_size=11) is det and (det.k, det.batch_size) == (7, 11)
    with pytest.raises(ValueError, match="has no parameter 'kk'"):
        det.set_params(kk=1)
    assert "k=7" in repr(det)
    # Parameters are stored as given and checked at fit.
    with pytest.raises(ValueError, match="k must be"):
        GROOD(k=0).fit(*clustered_features(30, 3, 4, seed=1, dtype=torch.float32))


def test_estimators_are_steps_of_a_scikit_learn_pipeline():
    """scikit-learn 1.6+ asks a pipeline's last step for its tags before score_samples and
    predict; without them, a fitted pipeline ending in GROOD failed with AttributeError."""
    pytest.importorskip("sklearn", minversion="1.6")
    from sklearn.exceptions import NotFittedError as SkNotFitted
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.utils import get_tags
    from sklearn.utils.validation import check_is_fitted

    x, y = clustered_features(90, 3, 5, seed=2, dtype=torch.float32)
    x, y = x.numpy() * 4 + 1, y.numpy()
    with pytest.raises(SkNotFitted):
        check_is_fitted(GROOD())
    pipe = make_pipeline(StandardScaler(), GROOD()).fit(x, y)
    z = StandardScaler().fit_transform(x)
    alone = GROOD().fit(z, y)
    np.testing.assert_array_equal(pipe.score_samples(x[:20]), alone.score_samples(z[:20]))
    np.testing.assert_array_equal(pipe.predict(x[:20]), alone.predict(z[:20]))
    # Labels are required where fit's second argument has no default.
    from grood import ASH, KLM, SHE, ViM

    assert [get_tags(c()).target_tags.required
            for c in (GROOD, Mahalanobis, KNN, MSP, ViM, ASH, SHE, KLM)] == [
        True, True, False, False, False, False, True, False]
    knn = make_pipeline(StandardScaler(), KNN(k=2)).fit(x)
    assert knn.score_samples(x[:5]).shape == (5,)


def test_a_misspelt_parameter_is_matched_to_the_one_meant():
    """set_params named a misspelt parameter and listed every valid one; the one it is close
    to is named first (and nothing where none is close)."""
    with pytest.raises(ValueError, match=r"^GROOD has no parameter 'precison' \(did you mean "
                                         r"'precision'\?\); valid: ood_prototype, k,"):
        GROOD().set_params(precison="tf32")
    with pytest.raises(ValueError, match=r"Mixup has no parameter 'lamb' \(did you mean "
                                         r"'lam'\?\); valid: layer, lam"):
        GROOD(ood_prototype=Mixup(layer="layer2")).set_params(ood_prototype__lamb=0.2)
    with pytest.raises(ValueError, match=r"^GROOD has no parameter 'xyz'; valid:"):
        GROOD().set_params(xyz=1)


def test_ood_sources_take_part_in_scikit_learn_parameters():
    """A source's arguments are ``ood_prototype__<name>`` parameters: listed, set (checked as
    the constructor checks them) and cloned. Before, ``set_params(ood_prototype__lam=...)``
    and a grid search over it failed with AttributeError, and cloning a UniformNoise source
    was refused by scikit-learn (its constructor normalises its ranges)."""
    pytest.importorskip("sklearn")
    from sklearn.base import clone
    from sklearn.model_selection import ParameterGrid

    det = GROOD(ood_prototype=Mixup(layer="layer2", lam=0.3))
    assert det.get_params()["ood_prototype__lam"] == 0.3
    for params in ParameterGrid({"ood_prototype__lam": [0.2, 0.8], "k": [1, 2]}):
        assert clone(det).set_params(**params).ood_prototype.lam == params["ood_prototype__lam"]
    assert det.ood_prototype.lam == 0.3  # clones carry their own source
    with pytest.raises(ValueError, match=r"lam must lie in \[0, 1\]"):
        det.set_params(ood_prototype__lam=2)
    with pytest.raises(ValueError, match="Mixup has no parameter 'alpha'"):
        det.set_params(ood_prototype__alpha=2)
    with pytest.raises(ValueError, match="ood_prototype is 'mean', which has no parameters"):
        GROOD().set_params(ood_prototype__lam=0.5)
    noise = clone(GROOD(ood_prototype=UniformNoise(n_samples=10, sigma_range=(1, 2))))
    assert noise.ood_prototype.sigma_range == (1.0, 2.0)

    class Hidden(OODPrototypeSource):  # keeps its argument under another name
        name = "test-hidden"

        def __init__(self, shift: float = 0.0):
            self._shift = shift

        def build(self, ctx):
            return ctx.class_prototypes.mean(0) + self._shift

    hidden = GROOD(ood_prototype=Hidden(0.5))
    assert clone(hidden).ood_prototype._shift == 0.5  # copied, not rebuilt with defaults
    with pytest.raises(TypeError, match="cannot be rebuilt with new arguments"):
        hidden.set_params(ood_prototype__shift=1.0)


def test_extension_points_are_exported():
    for name in ("OODPrototypeSource", "PrototypeContext", "register_source",
                 "NotFittedError", "BackendUnavailableError", "DetectorFileError",
                 "MissingExtraError", "RankFailedError"):
        assert name in grood.__all__ and hasattr(grood, name)
    assert (ROOT / "grood" / "py.typed").exists()


class _ScanIndex(GradientIndex):
    """A test index: a plain float64 scan, registered under a new kind."""

    kind = "test-scan"
    option_names = ("scale",)

    def __init__(self, dim: int, scale: float = 1.0) -> None:
        self.dim, self.scale, self.rows = dim, scale, torch.empty(0, dim, dtype=torch.float64)

    @classmethod
    def create(cls, dim, *, options, **_):
        return cls(dim, **options)

    @classmethod
    def from_state_dict(cls, state, *, options=None, **_):
        index = cls(state["rows"].shape[1], **(options or {}))
        index.rows = state["rows"]
        return index

    @property
    def ntotal(self) -> int:
        return self.rows.shape[0]

    def add(self, x):
        self._check_rows(x)
        self.rows = torch.cat([self.rows, x.double().cpu()])

    def search(self, queries, k=1):
        d = torch.cdist(queries.double().cpu(), self.rows).square() * self.scale
        dist, idx = torch.topk(d, k, dim=1, largest=False)
        return dist.to(queries.dtype), idx

    def state_dict(self):
        return {"rows": self.rows}


def test_an_index_registered_by_a_user_fits_scores_saves_and_loads(tmp_path):
    register_index(_ScanIndex)
    try:
        assert "test-scan" in index_kinds()
        x, y = clustered_features(90, 3, 6, seed=2, dtype=torch.float32)
        det = GROOD(index="test-scan").fit(x, y)
        ref = GROOD().fit(x, y)
        torch.testing.assert_close(det.score_samples(x), ref.score_samples(x),
                                   rtol=1e-5, atol=1e-7)
        det.save(tmp_path / "d.safetensors")
        again = GROOD.load(tmp_path / "d.safetensors")
        assert isinstance(again.index_, _ScanIndex)
        assert torch.equal(again.score_samples(x), det.score_samples(x))
        with pytest.raises(ValueError, match="takes index_options scale, not"):
            GROOD(index="test-scan", index_options={"nprobe": 2}).fit(x, y)
        # A search that returns another shape than [Q, k] is named, not indexed into.
        det.k = 2
        det.index_.search = lambda q, k=1: _ScanIndex.search(det.index_, q, 1)
        with pytest.raises(ValueError, match=r"test-scan index returned distances of shape "
                                             r"\(90, 1\).*for 90 queries and k=2"):
            det.score_samples(x)
        # ... as are ids narrower than the distances (kneighbors would broadcast them into
        # every column) and ids that are not integers.
        det.index_.search = lambda q, k=1: (lambda d, i: (d, i[:, :1]))(
            *_ScanIndex.search(det.index_, q, k))
        with pytest.raises(ValueError, match=r"ids of shape \(90, 1\) \(torch.int64\)"):
            det.kneighbors(x)
        det.index_.search = lambda q, k=1: (lambda d, i: (d, i.double()))(
            *_ScanIndex.search(det.index_, q, k))
        with pytest.raises(ValueError, match=r"\(90, 2\) \(torch.float64\) for 90 queries"):
            det.score_samples(x)
        assert _ScanIndex.kind in [a for a in _cli_index_choices()]
    finally:
        INDEXES.pop("test-scan", None)
    with pytest.raises(ValueError, match="index must be one of"):
        GROOD(index="test-scan").fit(x, y)


def _cli_index_choices() -> list[str]:
    from grood.cli import build_parser

    fit = build_parser()._subparsers._group_actions[0].choices["fit"]
    return next(a.choices for a in fit._actions if a.dest == "index")


def test_register_index_refuses_what_is_not_an_index():
    with pytest.raises(TypeError, match="GradientIndex subclass"):
        register_index(dict)  # type: ignore[arg-type]

    class Clash(_ScanIndex):
        kind = "exact"

    with pytest.raises(ValueError, match="already registered"):
        register_index(Clash)
    with pytest.raises(ValueError, match="takes no index_options"):
        make_index("faiss-flat", 4, dtype=torch.float32, device=torch.device("cpu"),
                   backend="torch", options={"nlist": 3})


def test_register_source_refuses_what_is_not_a_source():
    """register_source read ``cls.name`` of anything (AttributeError for a class without
    one) and registered a name of None."""
    from grood import register_source

    with pytest.raises(TypeError, match="OODPrototypeSource subclass"):
        register_source(dict)  # type: ignore[arg-type]

    class Nameless(OODPrototypeSource):
        def build(self, ctx):
            return ctx.class_prototypes.mean(0)

    with pytest.raises(TypeError, match="Nameless needs a non-empty string 'name'"):
        register_source(Nameless)


def test_a_damaged_detector_file_is_a_detector_file_error(tmp_path, capsys):
    x, y = clustered_features(30, 3, 4, seed=3, dtype=torch.float32)
    path = tmp_path / "d.safetensors"
    GROOD().fit(x, y).save(path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(grood.DetectorFileError, match="corrupt"):
        GROOD.load(path)
    np.save(tmp_path / "x.npy", x.numpy())
    rc = main(["score", str(path), str(tmp_path / "x.npy"), "-o", str(tmp_path / "s.npy")])
    assert rc == 3
    assert "unusable detector file" in capsys.readouterr().err


def test_the_largest_class_stays_small():
    sizes = {}
    for path in (ROOT / "grood").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                sizes[f"{path.name}:{node.name}"] = node.end_lineno - node.lineno + 1
    name, lines = max(sizes.items(), key=lambda kv: kv[1])
    assert lines <= 320, f"{name} has {lines} lines; split it by responsibility"


def test_the_readme_module_map_covers_every_module_and_names_real_tests():
    text = (ROOT / "README.md").read_text()
    block = text[text.index("## Layout"):]
    block = block[block.index("```") + 3:]
    block = block[:block.index("```")]
    for test in {w for w in block.split() if w.startswith("tests/test_")}:
        assert list(ROOT.glob(test)), f"the module map names {test}, which does not exist"
    for path in (ROOT / "grood").glob("*.py"):
        if path.name != "__init__.py" and path.name != "__main__.py":
            assert path.name in block, f"grood/{path.name} is missing from the README's map"
    for path in (ROOT / "grood_kernels").glob("*.py"):
        if path.name != "__init__.py":
            assert path.name in block, f"grood_kernels/{path.name} is missing from the map"
