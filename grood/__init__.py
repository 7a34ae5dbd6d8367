"""grood: gradient-aware out-of-distribution detection (GROOD), fast and exact.

>>> from grood import GROOD
>>> detector = GROOD().fit(train_features, train_labels, logits=train_logits)
>>> scores = detector.score_samples(test_features)   # higher = more in-distribution

Works with plain PyTorch; Triton kernels (``grood[triton]``) and faiss indexes are optional.
"""

from grood._checks import NotFittedError
from grood.baselines import KNN, MSP, Energy, Mahalanobis
from grood.detector import GROOD
from grood.metrics import ood_metrics
from grood.ops import BackendUnavailableError
from grood.sources import Mixup, UniformNoise

__version__ = "0.1.0"

__all__ = [
    "GROOD",
    "KNN",
    "MSP",
    "BackendUnavailableError",
    "Energy",
    "Mahalanobis",
    "Mixup",
    "NotFittedError",
    "UniformNoise",
    "__version__",
    "ood_metrics",
]
