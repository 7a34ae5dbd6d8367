"""grood: gradient-aware out-of-distribution detection (GROOD), fast and exact.

>>> from grood import GROOD
>>> detector = GROOD().fit(train_features, train_labels, logits=train_logits)
>>> scores = detector.score_samples(test_features)   # higher = more in-distribution
>>> print(evaluate(detector, test_features, {"svhn": svhn_features}).table())

Works with plain PyTorch; Triton kernels (``grood[triton]``) and faiss indexes are optional.

Extension points: OOD-prototype sources (:class:`OODPrototypeSource`, :func:`register_source`)
and gradient indexes (:class:`GradientIndex`, :func:`register_index`).
"""

from grood import library  # noqa: F401  (registers the torch.ops.grood custom ops)
from grood._version import __version__
from grood.baselines import (
    ASH,
    DICE,
    FDBD,
    GEN,
    KLM,
    KNN,
    MSP,
    RMD,
    SCALE,
    SHE,
    Energy,
    GradNorm,
    Mahalanobis,
    MaxLogit,
    NNGuide,
    ReAct,
    TempScale,
    ViM,
)
from grood.detector import GROOD
from grood.environment import show_versions
from grood.errors import (
    BackendUnavailableError,
    DetectorFileError,
    MissingExtraError,
    NotFittedError,
    RankFailedError,
    RowsRefusedError,
)
from grood.evaluation import Evaluation, evaluate
from grood.index import GradientIndex, register_index
from grood.metrics import ood_metrics, threshold_acceptance, threshold_at_tpr
from grood.model import evaluate_model
from grood.model_baselines import ODIN, RankFeat
from grood.portable import export_onnx
from grood.prototypes import OODPrototypeSource, PrototypeContext, register_source
from grood.sources import Mixup, UniformNoise
from grood.tuning import Tuning, tune

__all__ = [
    "ASH",
    "DICE",
    "FDBD",
    "GEN",
    "GROOD",
    "KLM",
    "KNN",
    "MSP",
    "ODIN",
    "RMD",
    "SCALE",
    "SHE",
    "BackendUnavailableError",
    "DetectorFileError",
    "Energy",
    "Evaluation",
    "GradNorm",
    "GradientIndex",
    "Mahalanobis",
    "MaxLogit",
    "MissingExtraError",
    "Mixup",
    "NNGuide",
    "NotFittedError",
    "OODPrototypeSource",
    "PrototypeContext",
    "RankFailedError",
    "RankFeat",
    "ReAct",
    "RowsRefusedError",
    "TempScale",
    "Tuning",
    "UniformNoise",
    "ViM",
    "__version__",
    "evaluate",
    "evaluate_model",
    "export_onnx",
    "ood_metrics",
    "register_index",
    "register_source",
    "show_versions",
    "threshold_acceptance",
    "threshold_at_tpr",
    "tune",
]
