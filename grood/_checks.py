"""Input validation and array conversion shared by the public API.

Every public entry point turns user input into a torch tensor *view* (no copy where the input is
already a tensor or a numpy array of a supported dtype), validates it here, and remembers the
input's kind so results can be handed back as the same type. Nothing here writes into the
caller's memory.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any, Literal, TypeVar, overload

import numpy as np
import torch
from torch import Tensor

from grood.errors import RowsRefusedError
from grood_kernels.contract import check_dense, check_positive_int, integer_value

#: What the public API takes and gives back for arrays: a torch tensor or a numpy array (the
#: result has the input's type: numpy in, numpy out; tensor in, tensor on the input's device).
ArrayLike = Tensor | np.ndarray
#: The same, where the result's type follows the input's (for type checkers: a tensor in, a
#: tensor out; a numpy array in, a numpy array out; either in, either out).
ArrayT = TypeVar("ArrayT", bound=Tensor | np.ndarray)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


@dataclass(frozen=True)
class ArrayKind:
    """Where an input came from, so an output can be returned as the same type."""

    is_numpy: bool
    device: torch.device

    def wrap(self, x: Tensor) -> Any:
        """Return ``x`` as a numpy array or as a tensor on the input's device."""
        if self.is_numpy:
            return x.detach().cpu().numpy()
        return x.to(self.device)


def as_tensor(x: Any, name: str) -> tuple[Tensor, ArrayKind]:
    """View ``x`` (tensor, numpy array or nested sequence) as a tensor without copying."""
    if isinstance(x, Tensor):
        check_dense(**{name: x})
        if x.is_meta:
            raise ValueError(f"{name} is on the meta device and holds no values")
        if x.requires_grad:
            x = x.detach()
        return x, ArrayKind(False, x.device)
    if hasattr(x, "toarray") and hasattr(x, "nnz"):  # a scipy.sparse matrix or array
        raise TypeError(f"{name} is a sparse {type(x).__name__}; pass a dense array "
                        "(x.toarray())")
    if isinstance(x, np.ma.MaskedArray):
        masked = int(np.ma.count_masked(x))
        if masked:
            raise ValueError(f"{name} is a masked array with {masked} masked entries, whose "
                             "values would be used as they are: fill them "
                             "(numpy.ma.filled) or drop those rows first")
        x = x.data
    if isinstance(x, np.ndarray) or hasattr(x, "__array__") or isinstance(x, (list, tuple)):
        try:
            arr = np.asarray(x)
        except ValueError as exc:  # ragged nested lists
            raise ValueError(f"{name} is not a rectangular array (rows of different lengths?)"
                             f": {exc}") from None
        if arr.dtype == object:
            raise TypeError(f"{name} must be a numeric array, got an array of Python objects")
        if arr.dtype.names:  # a structured (record) array: one element per row
            fields = ", ".join(repr(f) for f in arr.dtype.names[:6])
            raise TypeError(f"{name} is a structured array (fields {fields}"
                            f"{', ...' if len(arr.dtype.names) > 6 else ''}): pass its fields "
                            "as the columns of one array, numpy.lib.recfunctions."
                            f"structured_to_unstructured({name})")
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("="))
        with warnings.catch_warnings():
            # Read-only arrays (memory maps, np.load(..., mmap_mode="r")) are only ever read.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            if any(st < 0 for st in arr.strides):
                arr = np.ascontiguousarray(arr)  # torch cannot view negative strides
            try:
                t = torch.from_numpy(arr)
            except TypeError as exc:
                raise TypeError(f"{name} has unsupported dtype {arr.dtype}"
                                f"{_numpy_dtype_hint(arr.dtype)}") from exc
        return t, ArrayKind(True, torch.device("cpu"))
    # A loader or generator: its batches go to the streaming methods.
    hint = ("; batches from a loader go to the streaming methods: fit_batches / score_batches "
            "(feature batches), fit_model / score_model / evaluate_model (a model's inputs)"
            if hasattr(x, "__iter__") and not isinstance(x, (str, bytes, Mapping)) else "")
    raise TypeError(f"{name} must be a torch.Tensor or a numpy array, got "
                    f"{type(x).__name__}{hint}")


def _numpy_dtype_hint(dtype: np.dtype) -> str:
    """How to convert features of a numpy dtype torch does not take."""
    if dtype.kind == "f":  # longdouble (float96 / float128)
        return "; convert them: x.astype(np.float64)"
    if dtype.kind in "US":
        return ("; it holds text (a file read as strings?): parse the numbers, "
                "x.astype(np.float32)")
    return ""


def check_matrix(x: Tensor, name: str, *, n_cols: int | None = None,
                 allow_empty: bool = False,
                 cols_from: str = "the detector was fitted on {} features") -> None:
    """Check that ``x`` is a floating-point matrix ``[N, D]``, non-empty unless allowed, with
    ``n_cols`` columns when given (``cols_from`` says where that number comes from)."""
    if x.ndim != 2:
        dims = "[N, C]" if name == "logits" else "[N, D]"  # a row of C class scores
        raise ValueError(f"{name} must be a 2-D array {dims}, got shape {tuple(x.shape)}"
                         f"{shape_hint(tuple(x.shape), name, n_cols)}")
    if x.dtype not in FLOAT_DTYPES:
        convert = ("; convert them: x.astype(np.float32) (numpy), x.float() (torch)"
                   if x.dtype in INT_DTYPES + WIDE_UNSIGNED or x.dtype == torch.bool else "")
        raise TypeError(f"{name} must be floating point (float16, bfloat16, float32 or float64), "
                        f"got {str(x.dtype).removeprefix('torch.')}{convert}")
    if x.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} is empty: it has no rows")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has zero columns")
    if n_cols is not None and x.shape[1] != n_cols:
        raise ValueError(f"{name} has {x.shape[1]} columns but {cols_from.format(n_cols)}"
                         f"{shape_hint(tuple(x.shape), name, n_cols)}")


def shape_hint(shape: tuple[int, ...], name: str, n_cols: int | None) -> str:
    """The way out for an array ``name`` of ``shape`` where [N, ``n_cols``] was wanted (the
    columns unknown: None), as a clause to append to the error ("" where none is known): a
    pooled map [N, D, 1, ...] flattened, a map or tokens pooled, one sample made a row, a
    matrix of samples as columns transposed."""
    if len(shape) > 2 and all(size == 1 for size in shape[2:]):
        # a pooled feature map, e.g. a hook on a ResNet's avgpool
        return ("; a pooled feature map [N, D, 1, ...]: flatten it to [N, D] (torch: "
                "x.flatten(1); numpy: x.reshape(len(x), -1))")
    if len(shape) > 2 and name in ("features", "ood_features"):
        return ("; GROOD reads one vector per sample: pool the other axes (a CNN's feature "
                "map [N, C, H, W]: x.mean((2, 3)), as its average pool does; a ViT's "
                "tokens [N, T, D]: the class token, x[:, 0])")
    if len(shape) == 1 and n_cols is not None and shape[0] == n_cols:
        return f"; one sample of {n_cols} {name} is a row: pass {name}.reshape(1, -1)"
    if len(shape) == 2 and n_cols is not None and shape[1] != n_cols and shape[0] == n_cols:
        # [D, N] where [N, D] was meant: a matrix of samples as columns (MATLAB, R)
        return f"; it has {n_cols} rows: are its samples its columns? Pass {name}.T"
    return ""


def check_finite_rows(x: Tensor, name: str, *, row_offset: int = 0) -> None:
    """Raise naming the rows of ``x`` (its entries along dimension 0: a vector's elements, a
    matrix's rows, a batch's samples [B, ...]) that hold NaN or Inf.

    A row with a NaN or an Inf has a non-finite sum (no addition leads back from them), so
    the rows' sums are checked first: one read of ``x`` and no [N, D] temporary (``isfinite``
    of the whole matrix costs ~60x more on the CPU). Only rows whose sum is not finite, which
    includes finite rows whose sum overflows, are then checked element by element."""
    if x.ndim > 2:
        x = x.reshape(x.shape[0], -1)
    if x.ndim == 2 and x.is_floating_point():
        suspect = (~torch.isfinite(x.sum(dim=1))).nonzero().flatten()
        if suspect.numel() == 0:
            return
        finite = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        finite[suspect] = torch.isfinite(x[suspect]).all(dim=1)
    else:
        finite = torch.isfinite(x)
        if x.ndim == 2:
            finite = finite.all(dim=1)
    if bool(finite.all()):
        return
    bad = (~finite).nonzero().flatten()
    count = bad.numel()

    def text(rows: list[int]) -> str:
        more = f" (first 5 of {count})" if count > 5 else ""
        return f"{name} contains NaN or Inf in row(s) {', '.join(map(str, rows))}{more}"

    raise RowsRefusedError([int(i) + row_offset for i in bad[:5]], text)


@contextmanager
def rows_from(offset: int) -> Iterator[None]:
    """Rows refused inside (:class:`grood.errors.RowsRefusedError`), numbered from 0 in a
    batch, renumbered from ``offset``, the batch's first row in the whole input."""
    try:
        yield
    except RowsRefusedError as err:
        raise err.renumbered(offset) from None


#: Unsigned label dtypes wider than uint8, which many torch operations do not take: labels in
#: them are read as int64 (a copy) by :func:`as_labels`.
WIDE_UNSIGNED = tuple(getattr(torch, n) for n in ("uint16", "uint32", "uint64")
                      if hasattr(torch, n))


def did_you_mean(names: Any, choices: Any) -> str:
    """`` (did you mean 'nprobe'?)`` for each of ``names`` (one, or several) close to one of
    ``choices`` (a misspelling), or "" where none is."""
    import difflib

    names = [names] if isinstance(names, str) else list(names)
    pairs = [(name, difflib.get_close_matches(str(name), [str(c) for c in choices], n=1,
                                              cutoff=0.7)) for name in names]
    close = [f"{match[0]!r} for {name!r}" if len(names) > 1 else repr(match[0])
             for name, match in pairs if match]
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _literal_tilde(path: str | os.PathLike) -> str | None:
    """``path`` as text where it starts with a ``~`` folder that does not exist (a home
    folder written for the shell, which Python does not expand); None otherwise."""
    text = os.fspath(path)
    text = text.decode(errors="replace") if isinstance(text, bytes) else text
    head = text.split(os.sep, 1)[0]
    return text if head.startswith("~") and not os.path.exists(head) else None


def path_hint(path: str | os.PathLike) -> str:
    """Why a path given for a file may not name one: a leading ``~`` is not expanded (as
    numpy, torch and safetensors do not expand it either), or it names a folder."""
    text = _literal_tilde(path)
    if text is not None:
        return (f" ('~' is not expanded: pass os.path.expanduser({text!r}); on a command line "
                "leave it unquoted, and not after an '=')")
    if os.path.isdir(path):
        return " (that is a folder: name the file in it)"
    return ""


def check_new_folder(folder: str | os.PathLike, what: str) -> None:
    """Refuse to make a folder under a leading ``~`` that does not exist: it would be made
    in the working directory as a folder named ``~``, not in the home folder."""
    if _literal_tilde(folder) is not None:
        raise ValueError(f"{what}: {os.fspath(folder)!s} would be made in the working "
                         f"directory, in a folder named '~'{path_hint(folder)}")


def as_labels(labels: Any, name: str = "labels") -> Tensor:
    """Class ids as a tensor (a view, as :func:`as_tensor`); unsigned ids wider than uint8
    (numpy's uint16/32/64) as an int64 copy, refusing values int64 cannot hold; class names
    (strings) are refused with how to number them."""
    if labels is None:
        raise TypeError(f"{name} is None: the fit needs each training row's integer class "
                        "id (it makes a prototype of every class from them)")
    if isinstance(labels, (list, tuple)) or (  # numpy arrays and array-likes (pandas)
            hasattr(labels, "__array__") and not isinstance(labels, Tensor)):
        _check_not_names(labels, name)
    y, _ = as_tensor(labels, name)
    if y.dtype == getattr(torch, "uint64", None):  # torch reduces no uint64: read the bits
        y = y.view(torch.int64).clone()
        if y.numel() and int(y.min()) < 0:
            raise ValueError(f"{name} holds a class id of 2**63 or more")
    elif y.dtype in WIDE_UNSIGNED:
        y = y.to(torch.int64)
    return y


def text_values(values: Any, width: int) -> tuple[np.ndarray, str] | None:
    """``values`` (an array or sequence) as an array, and its first distinct values shown in
    at most ``width`` characters, where they are text (strings or bytes); None otherwise
    (numbers, or a ragged nesting)."""
    try:
        arr = np.asarray(values)
    except ValueError:  # (ragged)
        return None
    flat = arr.reshape(-1)
    if not (arr.dtype.kind in "US" or (arr.dtype == object and flat.size and all(
            isinstance(v, (str, bytes)) for v in flat[:50]))):
        return None
    shown = ", ".join(repr(v) for v in dict.fromkeys(flat[:50].tolist()))
    return arr, shown if len(shown) <= width else shown[:width - 3] + "..."


def _check_not_names(labels: Any, name: str) -> None:
    """Refuse class names (strings, as scikit-learn's estimators take them) where class ids
    0..C-1 belong, saying how to number them."""
    text = text_values(labels, 80)
    if text is None:
        return
    arr, shown = text
    # Ids written as text (a CSV column): np.unique would number '10' before '2'.
    flat = arr.reshape(-1)
    if (bool(np.char.isdigit(arr).all()) if arr.dtype != object  # (a pandas column: objects)
            else all(isinstance(v, str) and v.isdigit() for v in flat)):
        raise TypeError(f"{name} holds class ids as text ({shown}): read them as numbers, "
                        f"{name}.astype(int)")
    raise TypeError(f"{name} holds class names ({shown}), not integer class ids 0..C-1: "
                    f"number them, e.g. names, ids = np.unique({name}, return_inverse="
                    "True) (class i is names[i]), and pass ids")


def check_labels(y: Tensor, name: str, n_rows: int, *, n_classes: int | None = None,
                 n_classes_from: str = "", allow_empty: bool = False,
                 rows_of: str = "features") -> None:
    """Check that ``y`` is a vector of ``n_rows`` non-negative integer class ids (none, for
    an empty batch, when allowed); ``n_classes_from`` says where ``n_classes`` came from,
    ``rows_of`` what has the ``n_rows`` rows."""
    if y.dtype == torch.bool or y.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must hold integer class ids, got dtype "
                        f"{str(y.dtype).removeprefix('torch.')}{labels_hint(y, name)}")
    if y.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {tuple(y.shape)}"
                         f"{labels_hint(y, name)}")
    if y.shape[0] != n_rows:
        raise ValueError(f"{name} has {y.shape[0]} entries but {rows_of} have {n_rows} rows")
    if n_rows == 0:
        if allow_empty:
            return
        raise ValueError(f"{name} is empty")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0:
        marked = int((y == -1).sum()) if lo == -1 else 0  # pytorch-ood's mark of OOD rows
        raise ValueError(f"{name} must be >= 0, found {lo}" + (
            f" ({marked} row(s) labelled -1, as pytorch-ood marks OOD samples: keep the "
            f"others, e.g. features[{name} >= 0] and {name}[{name} >= 0])" if marked else ""))
    if n_classes is not None and hi >= n_classes:
        raise ValueError(f"{name} holds class id {hi}, out of range for {n_classes} classes"
                         + (f" ({n_classes_from})" if n_classes_from else ""))


def labels_hint(y: Tensor, name: str) -> str:
    """How to make class ids of 2-D labels (a column of ids, or one-hot / soft targets [N, C]
    of a mixup loader), or of whole numbers stored as floats (a CSV column, a pandas frame)."""
    if y.ndim == 1 and y.is_floating_point() and y.numel():
        whole = bool(torch.isfinite(y).all()) and bool((y == y.round()).all())
        if whole and int(y.min()) >= 0:
            return (f"; its values are whole numbers: pass them as integers, "
                    f"{name}.astype(np.int64) (numpy) or {name}.long() (torch)")
        return ""
    if y.ndim != 2:
        return ""
    if y.shape[1] == 1:
        return f"; pass a column of class ids as {name}.reshape(-1)"
    return f"; for one-hot or soft-target labels [N, C] pass their class ids, {name}.argmax(1)"


def check_float64_device(dev: torch.device) -> torch.device:
    """``dev``, where grood can compute: every step computes in float64 in part (the class
    prototypes' sums, each row's softmax), which Apple's MPS does not support — refused by
    name here, not by torch's cast error midway through a fit."""
    if dev.type == "mps":
        raise ValueError(f"device {str(dev)!r} (Apple's GPU): grood computes parts of every "
                         "step in float64 (the class prototypes' sums, each row's softmax), "
                         "which MPS does not support; compute on the CPU: GROOD(device='cpu') "
                         "takes features from any device")
    return dev


def compute_device(device: Any, features: torch.device) -> torch.device:
    """Where a fit computes: the detector's ``device`` (checked by :func:`check_device`), else
    the features' (the first batch's, a model's), checked by :func:`check_float64_device`."""
    return check_float64_device(torch.device(device) if device is not None else features)


@overload
def check_device(device: None, *, model: bool = False) -> None: ...
@overload
def check_device(device: str | int | torch.device, *, model: bool = False) -> torch.device: ...
def check_device(device: Any, *, model: bool = False) -> torch.device | None:
    """``device`` as a ``torch.device`` (None stays None), or a one-line error naming why it
    cannot be used here: for GROOD's computation, or with ``model`` for running a model (which
    may be Apple's MPS, :func:`check_float64_device`)."""
    if device is None:
        return None
    if (isinstance(device, int) and not isinstance(device, bool) and device >= 0
            and not torch.accelerator.is_available()):
        raise ValueError(f"device {device} is an accelerator index ('cuda:{device}' where "
                         f"torch sees CUDA), but this torch ({torch.__version__}) sees no "
                         "accelerator")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        if isinstance(device, str) and device.split(":")[0].lower() == "gpu":
            raise ValueError(f"device {device!r} is not a device name: torch calls a GPU "
                             f"{device.lower().replace('gpu', 'cuda')!r}") from None
        if isinstance(device, str) and device.strip().isdigit():
            raise ValueError(f"device {device!r} is not a device name: a GPU by its index is "
                             f"'cuda:{device.strip()}'") from None
        if isinstance(device, str) and device.strip().lower() == "auto":
            raise ValueError("device 'auto' is the command line's choice; in Python leave "
                             "device=None (the default), which follows the device of the "
                             "features given, or name one ('cuda', 'cpu')") from None
        raise ValueError(f"device {device!r} is not a device name (e.g. 'cpu', 'cuda', "
                         f"'cuda:1'): {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} needs CUDA, but this torch "
                             f"({torch.__version__}) sees no usable CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA "
                             "device(s) are visible")
    elif dev.type == "meta":
        raise ValueError(f"device {str(device)!r} holds no values (shapes only); grood "
                         "computes on 'cpu' or 'cuda'")
    elif dev.type == "mps" and not model:
        check_float64_device(dev)
    elif dev.type != "cpu":  # mps, xpu, ...: torch says whether this build can use it
        try:
            torch.empty(0, device=dev)
        except Exception as exc:  # torch raises several types (a missing backend module too)
            raise ValueError(f"device {str(device)!r} cannot be used by this torch "
                             f"({torch.__version__}): {exc}") from None
    return dev


@overload
def check_flag(value: Any, name: str, *, allow_none: Literal[False] = False) -> bool: ...
@overload
def check_flag(value: Any, name: str, *, allow_none: bool) -> bool | None: ...
def check_flag(value: Any, name: str, *, allow_none: bool = False) -> bool | None:
    """``value`` as a Python bool (numpy bools too; None when allowed), else a clear error: a
    string such as "no" would otherwise count as true."""
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    allowed = "True, False or None" if allow_none else "True or False"
    raise ValueError(f"{name} must be {allowed}, got {value!r}")


def check_integer(value: Any, name: str) -> int:
    """``value`` as a Python int (see :func:`integer_value`), else a clear error."""
    number = integer_value(value)
    if number is None:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return number


def check_real(value: Any, name: str) -> float:
    """``value`` as a finite Python float (numpy and 0-d torch numbers too; not a bool or a
    string), else a clear error."""
    try:
        number = None if isinstance(value, (bool, np.bool_, str, bytes)) else float(value)
    except (TypeError, ValueError):
        number = None
    if number is None:
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return number


def check_fraction(value: Any, name: str) -> float:
    """``value`` as a Python float in (0, 1], else a clear error (95, a percentage, is one)."""
    number = check_real(value, name)
    if not 0 < number <= 1:
        raise ValueError(f"{name} is a fraction in (0, 1], got {value!r}"
                         + _percentage_hint(number))
    return number


def _percentage_hint(value: Any) -> str:
    """What to pass instead of a percentage (1 < value <= 100) given as a fraction."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return ""
    return f" (for {number:g} %, pass {number / 100:g})" if 1 < number <= 100 else ""


def check_positive_real(value: Any, name: str) -> float:
    """``value`` as a Python float if it is a finite real number > 0, else a clear error."""
    try:
        number = check_real(value, name)
    except ValueError:
        number = 0.0
    if number <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return number


def check_class_count(max_label: int, n_samples: int, name: str = "labels") -> None:
    """Every class id in 0..max_label needs a sample: refuse more classes than samples before
    anything is allocated for them (a stray huge label would otherwise ask for terabytes)."""
    if max_label + 1 > n_samples:
        raise ValueError(f"{name} holds class id {max_label}, but there are only {n_samples} "
                         f"samples: class ids must run 0..C-1 with every class present, so C "
                         f"cannot exceed the number of samples")


def check_not_tracked(op: str, *tensors: Tensor) -> None:
    """Refuse inputs that autograd is tracking: grood's operations are not differentiable (the
    closed-form gradient is a score, not a training signal), and silently dropping the graph
    would leave a caller's backward pass without the score's part."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise ValueError(f"{op} is not differentiable, but an input requires grad: call it "
                         "under torch.no_grad() (or torch.inference_mode()), or pass "
                         "tensor.detach()")


def ordinary(t: Tensor) -> Tensor:
    """``t``, or an ordinary copy of it if it is an inference tensor (made under
    ``torch.inference_mode``): a fitted detector's prototypes must have a version counter, so
    the values derived from them can be kept between calls (and CUDA-graph captures need no
    host read to remake them)."""
    if not t.is_inference():
        return t
    with torch.inference_mode(False):
        return t.clone()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def batches(n: int, batch_size: int) -> Iterator[tuple[int, int]]:
    """Yield ``(start, stop)`` pairs covering ``range(n)``."""
    for start in range(0, n, batch_size):
        yield start, min(start + batch_size, n)


def is_count(value: Any) -> bool:
    """Whether ``value`` is a Python int >= 1 and not a bool: a count as a saved file's JSON
    metadata holds it (read back, not converted)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def positive_int_arg(text: str) -> int:
    """An argparse type: a positive integer, or a usage error that says so."""
    try:
        return check_positive_int(int(text), "value")
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None


def positive_real_arg(text: str) -> float:
    """An argparse type: a finite number > 0, or a usage error that says so."""
    try:
        return check_positive_real(float(text), "value")
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None


def fraction_arg(text: str) -> float:
    """An argparse type: a fraction in (0, 1], or a usage error that says so (95, a
    percentage, is one)."""
    try:
        return check_fraction(float(text), "value")
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {text!r}"
                                         + _percentage_hint(text)) from None


def bench_device_arg(text: str) -> str:
    """An argparse type for the benchmarks' ``--device`` (with ``choices=["cuda", "cpu"]``):
    "cuda" is a usage error where no CUDA device is available, before anything runs."""
    if text == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("no CUDA device is available here")
    return text


#: Where the frames a warning skips on its way to the line that called into grood lie:
#: grood and its kernels, and torch and contextlib (hooks and ``with`` blocks grood runs
#: code through).
_GROOD_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_INTERNAL = (os.path.join(_GROOD_ROOT, "grood") + os.sep,
             os.path.join(_GROOD_ROOT, "grood_kernels") + os.sep,
             os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
             os.path.abspath(contextlib.__file__))


def user_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` in the function calling this one that points
    at the first frame outside grood (and outside torch and contextlib, which grood runs code
    through): the user's line, whichever path (``fit``, ``fit_model``, an adapter) led there."""
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level


@contextmanager
def prefixed_errors(prefix: str, only: tuple[str, ...] | None = None) -> Iterator[None]:
    """Prefix the message of a ValueError / TypeError (or ``RowsRefusedError``, its type and
    rows kept) raised inside with ``prefix`` (which file, which batch); other subclasses
    (``DetectorFileError``, ...) and messages that already start with it pass unchanged.
    ``only``: the names of the arrays ``prefix`` holds, where other inputs are checked in the
    same block: only messages about one of them (starting with its name) are prefixed."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        text = str(exc)
        if type(exc) not in (ValueError, TypeError, RowsRefusedError) or \
                text.startswith(prefix) or (only is not None and not text.startswith(
                    tuple(f"{n} " for n in only))):
            raise
        if isinstance(exc, RowsRefusedError):  # (its type and rows kept)
            raise exc.prefixed(prefix) from exc
        raise type(exc)(f"{prefix}: {exc}") from exc
