"""Saving and loading detectors: safetensors files, JSON metadata, SHA-256 digests.

A detector file is a ``.safetensors`` file: tensors (prototypes, counts, the OOD prototype and
the index's ``index.*`` tensors) and string metadata — the format name and version, the
constructor parameters and fitted state as JSON, and a SHA-256 digest over every tensor and
the metadata. Loading checks all of it (format, version, digest, the consistency of every
shape) before anything is used, and never unpickles or executes anything from a file.

A distributed detector is saved as one such file per rank plus a JSON manifest that lists
them with the SHA-256 of each file.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import numpy as np
import torch
from torch import Tensor

from grood import distributed as dist
from grood import ops
from grood._checks import (
    FLOAT_DTYPES,
    check_device,
    check_flag,
    check_positive_int,
    is_count,
    ordinary,
    path_hint,
)
from grood._fit import FittedState, check_search_again
from grood._version import __version__
from grood.calibration import check_calibration
from grood.errors import BackendUnavailableError, DetectorFileError
from grood.functional import check_precision
from grood.index import index_class, index_from_state, rounds_past_fp32
from grood.neighbours import SHUFFLED
from grood.prototypes import FINGERPRINT_DIMS, source_from_config

_D = TypeVar("_D", bound="Placement")

FILE_FORMAT = "grood.GROOD"
FILE_FORMAT_VERSION = 2
#: The version of a file whose exact index is held less a centre (``index.centre``: the fit's
#: check, README Numerics): version 2's layout plus that tensor, written only then, so that
#: a grood that reads no centre refuses the file rather than search its index unshifted.
CENTRED_FORMAT_VERSION = 3
#: Versions this grood reads: version 1 files hold no ``indexed_rows``.
READABLE_VERSIONS = (1, 2, 3)
#: Versions of the shard manifests this grood reads (shards held less a centre are files
#: of version 3, which a grood reading no centre refuses).
MANIFEST_VERSIONS = (1, 2)
SHARDED_FORMAT = "grood.GROOD.sharded"
#: What files and manifests record as their writer (files before format version 2's
#: ``written_by`` do not say).
WRITER = f"grood {__version__}"
#: The end of a refusal by format version.
READS = (f"this grood ({__version__}) reads versions "
         f"{', '.join(str(v) for v in READABLE_VERSIONS)}: read it with the grood that wrote "
         "it, or a newer one")
READS_MANIFESTS = (f"this grood ({__version__}) reads manifest versions "
                   f"{', '.join(str(v) for v in MANIFEST_VERSIONS)}: read it with the grood "
                   "that wrote it, or a newer one")
TENSOR_NAMES = ("class_prototypes", "class_counts", "ood_prototype")
#: Tensors a file may hold besides those and ``index.*``.
OPTIONAL_TENSORS = ("indexed_rows", "ood_fingerprints")


def _plain(value: Any) -> Any:
    """``value`` with numpy scalars and 0-d tensors as Python numbers (for the JSON header)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.generic, Tensor)) and np.ndim(value) == 0:
        return value.item()
    return value


def detector_state(det: Any, *, host: bool = True
                   ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Tensor]]:
    """``(params, state, tensors)`` of a fitted detector: everything :func:`restore` needs;
    the tensors contiguous, in host memory unless ``host`` is False (then where they are)."""
    params = {
        "ood_prototype": {"name": det.ood_source_.name, "params": det.ood_source_.params()},
        "k": check_positive_int(det.k, "k"),
        "index": det.index,
        "index_options": _plain(det.index_options),
        "backend": det.backend,
        "precision": det.precision,
        "batch_size": check_positive_int(det.batch_size, "batch_size"),
    }
    state = {
        "n_features_in": det.n_features_in_,
        "feature_names_in": (None if getattr(det, "feature_names_in_", None) is None
                             else [str(n) for n in det.feature_names_in_]),
        "n_classes": det.n_classes_,
        "n_train": det.n_train_,
        "train_accuracy": det.train_accuracy_,
        "dtype": str(det.dtype_).removeprefix("torch."),
        "index": det.index_.kind,
        # What the index was built with: params' index_options may have changed since fit
        # (they apply at the next fit), and loading must rebuild this index, not another.
        "index_options": _plain(det.index_.options()),
        "extractor": getattr(det, "extractor_", None),
        "shard_sizes": det.shard_sizes_,
        "calibration": getattr(det, "calibration_", None),
    }
    tensors = {
        "class_prototypes": det.class_prototypes_,
        "class_counts": det.class_counts_,
        "ood_prototype": det.ood_prototype_,
        **{f"index.{name}": t for name, t in det.index_.state_dict().items()},
    }
    if det.indexed_rows_ is not None:
        tensors["indexed_rows"] = det.indexed_rows_
    if getattr(det, "ood_fingerprints_", None) is not None:
        tensors["ood_fingerprints"] = det.ood_fingerprints_
    return params, state, {n: (t.detach().cpu() if host else t.detach()).contiguous()
                           for n, t in tensors.items()}


def digest(tensors: dict[str, Tensor], meta: dict[str, str]) -> str:
    """SHA-256 over the metadata (without the digest) and every tensor's name, type and bytes."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in meta.items() if k != "digest"},
                        sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)  # its memory, not a copy
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read 16 MiB at a time (a shard may be larger than free memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _writer(meta: dict[str, Any]) -> str:
    """`` (written by grood X)`` where a file or manifest records its writer."""
    writer = meta.get("written_by")
    return f" (written by {writer})" if isinstance(writer, str) and writer else ""


def _starts_with(path: Path, prefix: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(prefix)) == prefix


def save_target(path: str | os.PathLike, *,
                suffixes: tuple[str, ...] | None = (".safetensors",),
                what: str = "detector files", inputs: dict[str, Any] | None = None) -> Path:
    """The file a save to ``path`` writes: symlinks resolved, checked before any work.

    Refuses a name without one of ``suffixes`` (any case; None: any name), a missing or
    non-writable folder, an existing target that is not a regular file (a device node, a
    folder, a FIFO), and one that is the same file as any of ``inputs`` (name -> path; the
    command would overwrite what it reads).
    """
    path = Path(path)
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise ValueError(f"{what} are written as {' or '.join(suffixes)}; got "
                         f"{str(path)!r} (name it e.g. {path.stem}{suffixes[0]})")
    for name, source in (inputs or {}).items():
        if source is not None and _same_file(path, Path(source)):
            raise ValueError(f"{path} is the {name} this command reads: writing there would "
                             "overwrite it; choose another output name")
    target = Path(os.path.realpath(path))  # write through symlinks, to what they point at
    if target.exists() and not target.is_file():
        raise ValueError(f"refusing to replace {target}: it exists and is not a regular file")
    folder = target.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot save to {path}: the folder {folder} does not exist"
                                f"{path_hint(path)}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot save to {path}: the folder {folder} is not writable")
    return target


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file (through links; an ``a`` not yet made is not)."""
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _umask_mode() -> int:
    """0o666 less the process umask: the mode any newly created output file gets."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _replace_atomically(tmp: Path, target: Path) -> None:
    """Give ``tmp`` the mode of the file it replaces (a new file: the umask's), flush it to
    disk and rename it over ``target``. A file kept private (0600) stays private."""
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = _umask_mode()
    os.chmod(tmp, mode)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)


@contextmanager
def written_atomically(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside the file ``path`` names (through symlinks) for the block to
    write, renamed over that file (with the mode of the file it replaces, or the umask's,
    flushed to disk) when the block ends without error and removed otherwise: the file is
    never seen half written, and a failed or interrupted write leaves what was there before."""
    target = Path(os.path.realpath(path))  # write through symlinks, to what they point at
    if not target.parent.is_dir():  # (named here: the error would name the temporary file)
        raise FileNotFoundError(f"cannot write {path}: the folder {target.parent} does not "
                                "exist")
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        _replace_atomically(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def save_file(det: Any, path: Path, *, shard: tuple[int, int] | None = None) -> str:
    """Write one detector file, atomically (a temporary file beside the target, then a
    rename); through symlinks, with the umask's file mode. ``shard=(rank, world)`` marks the
    file as that rank's shard of a sharded detector. Returns the file's digest."""
    from safetensors.torch import save_file as write

    target = save_target(path)
    params, state, tensors = detector_state(det)
    if shard is not None:
        state["shard"] = {"rank": shard[0], "world": shard[1]}
    meta = {
        "format": FILE_FORMAT,
        "format_version": str(CENTRED_FORMAT_VERSION if "index.centre" in tensors
                              else FILE_FORMAT_VERSION),
        "written_by": WRITER,
        "params": json.dumps(params, sort_keys=True),
        "state": json.dumps(state, sort_keys=True),
    }
    meta["digest"] = digest(tensors, meta)
    with written_atomically(target) as tmp:
        write(tensors, str(tmp), metadata=meta)
    return meta["digest"]


def save(det: Any, path: Path) -> None:
    """Save ``det`` to ``path``; a distributed detector as shards plus a manifest."""
    if not det._sharded:
        save_file(det, path)
        return
    rank, world = dist.rank_and_world()
    # A rank that cannot write its shard (or rank 0 its manifest) stops every rank.
    with dist.together(True, "writing its shard of the detector"):
        path = save_target(path, suffixes=(".json", ".safetensors"))
        shard = path.with_name(f"{path.stem}.rank{rank}.safetensors")
        # The digest lets a load check the shard in the pass that reads it; the file's
        # SHA-256 is kept for manifests read by tools that know no digest.
        file_digest = save_file(det, shard, shard=(rank, world))
        sums = file_sha256(shard) + file_digest
    gathered = [bytes(s.tolist()).decode() for s in
                dist.all_gather_rows(torch.tensor(list(sums.encode()), dtype=torch.uint8))]
    # (its flag exchange also makes every rank return after the manifest exists)
    with dist.together(True, "writing the detector's manifest"):
        if rank == 0:
            manifest = {
                "format": SHARDED_FORMAT, "format_version": FILE_FORMAT_VERSION,
                "written_by": WRITER, "world_size": world,
                "shards": [{"file": path.with_name(f"{path.stem}.rank{r}.safetensors").name,
                            "sha256": s[:64], "digest": s[64:]}
                           for r, s in enumerate(gathered)],
            }
            with written_atomically(path) as tmp:
                tmp.write_text(json.dumps(manifest, indent=2))


def load(cls: Any, path: Path, *, device: Any, distributed: bool,
         backend: str | None = None) -> Any:
    """Load a detector file or a shard manifest (see ``GROOD.load``)."""
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; pass the detector file (.safetensors) "
                                "or a sharded detector's manifest (.json) in it")
    if path.is_file() and _starts_with(path, b"{"):  # a manifest (JSON)
        return _load_sharded(cls, path, device=device, distributed=distributed,
                             backend=backend)
    if distributed:
        raise DetectorFileError(f"{path} is a single-process detector; load it without "
                                "distributed=True")
    return load_file(cls, path, device=device, backend=backend)


def _load_sharded(cls: Any, path: Path, *, device: Any, distributed: bool,
                  backend: str | None) -> Any:
    if not distributed:
        return _join_shards(cls, path, _manifest_shards(path), device=device, backend=backend)
    rank, world = dist.rank_and_world()
    # A rank that cannot read its shard stops every rank (they would wait below).
    with dist.together(dist.is_initialized(), "loading its shard of the detector"):
        # Each rank checks the one shard it reads (every rank hashing every shard read the
        # whole index world_size times over).
        shards = _manifest_shards(path, rank=rank)
        if world != len(shards):
            raise DetectorFileError(f"{path} has {len(shards)} shards but the process group "
                                    f"has {world} ranks")
        det = load_file(cls, shards[rank].file, device=device, shard=(rank, world),
                        distributed=True, backend=backend, listed=(shards[rank].digest, path))
    gathered = dist.shard_sizes(det.index_.ntotal)
    if gathered != det.shard_sizes_:
        raise DetectorFileError(f"{path}: the shards do not belong to one detector (sizes "
                                f"{gathered}, shard {rank} expects {det.shard_sizes_})")
    return det


class _Shard(NamedTuple):
    """One entry of a shard manifest."""

    file: Path
    sha256: str  # of the whole file
    digest: str | None  # the file's own digest (manifests written before it was listed: None)


def _manifest_shards(path: Path, verify: bool = True, manifest: Any = None, *,
                     rank: int | None = None) -> list[_Shard]:
    """The shards a manifest lists (``manifest``: the file's JSON, where already read). Every
    listed file must exist. Where ``verify`` (only ``rank``'s shard, where given), a file the
    manifest lists without its digest is hashed whole here; one listed with it is checked by
    :func:`read_file` as it is read (pass ``listed``), so it is read once, not twice."""
    if manifest is None:
        manifest = _read_manifest(path)
    if not isinstance(manifest, dict) or manifest.get("format") != SHARDED_FORMAT:
        raise DetectorFileError(f"{path} is not a grood shard manifest")
    try:
        shards = [_Shard(path.with_name(Path(s["file"]).name), s["sha256"], s.get("digest"))
                  for s in manifest["shards"]]
        if not all(isinstance(s.digest, (str, type(None))) for s in shards):
            raise TypeError("a shard's digest is not a string")
    except (KeyError, TypeError, AttributeError) as exc:
        raise DetectorFileError(f"{path} is not a valid grood shard manifest: {exc}") from exc
    if manifest.get("format_version") not in MANIFEST_VERSIONS:
        raise DetectorFileError(f"{path} has manifest version {manifest.get('format_version')}"
                                f"{_writer(manifest)}; {READS_MANIFESTS}")
    world = manifest.get("world_size")
    if not shards:
        raise DetectorFileError(f"{path} lists no shards")
    if isinstance(world, bool) or not isinstance(world, int) or world != len(shards):
        raise DetectorFileError(f"{path} is inconsistent: world_size {world!r} but "
                                f"{len(shards)} shard(s) listed (one per rank is needed)")
    names = [shard.file.name for shard in shards]
    if len(set(names)) != len(names):
        raise DetectorFileError(f"{path} lists the same shard file more than once")
    if path.name in names:
        raise DetectorFileError(f"{path} lists itself as a shard")
    for r, (shard, sha, listed) in enumerate(shards):
        if not shard.is_file():
            raise FileNotFoundError(f"{path} lists {shard.name}, which is missing")
        if verify and rank in (None, r) and listed is None and file_sha256(shard) != sha:
            raise DetectorFileError(f"{shard} does not match the digest in {path}")
    return shards


def _read_manifest(path: Path) -> Any:
    """A shard manifest's JSON, or the error that says the file is not one."""
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise DetectorFileError(f"{path} is not a grood detector file: {exc}") from exc


def _join_shards(cls: Any, path: Path, listed: list[_Shard], *, device: Any,
                 backend: str | None) -> Any:
    """The shards of ``path`` joined into one single-process detector, read one at a time
    straight into the joined index (about one copy of the index in memory, not two)."""
    shards = [s.file for s in listed]
    params, state, tensors = read_file(shards[0], shard=(0, len(shards)),
                                       listed=(listed[0].digest, path))
    kind = state["index"]
    if not index_class(kind).joinable:
        raise DetectorFileError(f"the shards of {path} hold {kind!r} indexes, which cannot be "
                                "joined in one process")
    sizes = state["shard_sizes"]
    centre = tensors.get("index.centre")  # (a multi-rank fit holds every shard less one)
    if "index.vectors" not in tensors:
        raise DetectorFileError(f"{shards[0]} holds no index vectors to join "
                                f"(tensors {sorted(tensors)})")
    def wrong_rows(shard: Path, vectors: Tensor, n: int) -> DetectorFileError:
        return DetectorFileError(f"{path}: shard {shard.name} holds {vectors.dtype} vectors of "
                                 f"shape {tuple(vectors.shape)}, not the {n} rows of "
                                 f"{joined.dtype} the records list")

    first = tensors.pop("index.vectors")
    joined = torch.empty((sum(sizes), first.shape[1]), dtype=first.dtype)
    if first.shape[0] != sizes[0]:
        raise wrong_rows(shards[0], first, sizes[0])
    joined[:sizes[0]] = first
    del first
    offset, row_numbers = sizes[0], [tensors.pop("indexed_rows", None)]
    for r, shard in enumerate(shards[1:], start=1):
        rows = joined[offset:offset + sizes[r]]
        _, st, ts = read_file(shard, shard=(r, len(shards)), into={"index.vectors": rows},
                              listed=(listed[r].digest, path))
        if (st.get("shard_sizes") != sizes
                or not torch.equal(ts["class_prototypes"], tensors["class_prototypes"])
                or not torch.equal(ts["ood_prototype"], tensors["ood_prototype"])):
            raise DetectorFileError(f"{path}: shard {shard.name} comes from another "
                                    f"detector than {shards[0].name}")
        if st["index"] != kind:
            raise DetectorFileError(f"the shards of {path} hold {sorted({kind, st['index']})} "
                                    "indexes, which cannot be joined in one process")
        other = ts.get("index.centre")
        same = (other is None if centre is None
                else other is not None and torch.equal(other, centre))
        if not same:
            raise DetectorFileError(f"{path}: shard {shard.name} holds its index less another "
                                    f"centre than {shards[0].name}, so they cannot be joined")
        if ts["index.vectors"] is not rows:  # read elsewhere: not the rows of its record
            raise wrong_rows(shard, ts["index.vectors"], sizes[r])
        row_numbers.append(ts.get("indexed_rows"))
        offset += sizes[r]
    tensors["index.vectors"] = joined
    recorded = [r for r in row_numbers if r is not None]
    if len(recorded) == len(row_numbers):  # read_file checked each shard's alone
        tensors["indexed_rows"] = torch.cat(recorded)
        if (any(r.numel() != n for r, n in zip(recorded, sizes, strict=True))
                or not training_row_numbers(tensors["indexed_rows"], state["n_train"])):
            raise DetectorFileError(f"{path}: the shards' indexed_rows do not number "
                                    f"{sum(sizes)} training rows in rank order")
    return restore(cls, params, state, tensors, device, backend=backend, path=path)


@contextmanager
def _saved_settings(path: Path | None) -> Iterator[None]:
    """A saved setting that builds nothing this grood takes (an option or source parameter
    it does not know, a value its checks refuse) as the error of the file at ``path`` (None:
    the parts came from elsewhere, the error as it is)."""
    try:
        yield
    except DetectorFileError:
        raise
    except (TypeError, ValueError) as exc:
        if path is None:
            raise
        raise DetectorFileError(f"{path}: its saved settings build no detector in this grood "
                                f"({exc})") from exc


def restore(cls: Any, params: dict[str, Any], state: dict[str, Any],
            tensors: dict[str, Tensor], device: Any, *,
            shard_sizes: list[int] | None = None, distributed: bool = False,
            backend: str | None = None, path: Path | None = None) -> Any:
    """Build a fitted detector of class ``cls`` from checked, saved parts, in one step.

    ``backend``: run on this backend instead of the saved one. ``path``: the file the parts
    were read from, named where its settings build nothing.
    """
    source_cfg = params["ood_prototype"]
    with _saved_settings(path):
        source = source_from_config(source_cfg["name"], source_cfg["params"])
    det = cls(
        # A source with no parameters is given back by name, as it was most likely given.
        ood_prototype=source if source_cfg["params"] else source_cfg["name"],
        k=params["k"], index=params["index"], index_options=params["index_options"],
        backend=params["backend"] if backend is None else backend,
        precision=params["precision"], device=device,
        batch_size=params["batch_size"], distributed=distributed,
    )
    dev = torch.device(device) if device is not None else torch.device("cpu")
    # Files that predate state["index_options"] rebuild with the saved parameters' options
    # when those were meant for this kind of index.
    options = state.get("index_options", params["index_options"]
                        if params["index"] == state["index"] else None)
    hint = None if backend is not None else (  # None: the caller's own choice
        f"The detector was saved with backend={det.backend!r}; to run it here, load it with "
        "GROOD.load(path, backend='auto') (or 'torch')")
    with _saved_settings(path):
        install(det, {**state, "index_options": options}, tensors, dev, source=source,
                shard_sizes=shard_sizes, hint=hint)
    return det


def install(det: Any, state: dict[str, Any], tensors: dict[str, Tensor], dev: torch.device, *,
            source: Any, shard_sizes: list[int] | None = None, hint: str | None = None
            ) -> None:
    """Set the fitted state ``state`` / ``tensors`` (as :func:`detector_state` gives them) on
    ``det``, on ``dev``, in one step: everything is built there before the detector changes.
    ``hint``: what to do when ``det.backend`` cannot run on ``dev`` (None: the error as is)."""
    protos = ordinary(tensors["class_prototypes"].to(dev))
    p_ood = ordinary(tensors["ood_prototype"].to(dev))
    try:
        resolved = ops.resolve_backends(det.backend, dev, protos.dtype, det.precision)
    except BackendUnavailableError as exc:
        if hint is None:
            raise
        raise BackendUnavailableError(f"{exc}. {hint}") from exc
    kind = state["index"]
    index = index_from_state(kind, {n.removeprefix("index."): t for n, t in tensors.items()
                                    if n.startswith("index.")},
                             device=dev, backend=resolved["knn"], precision=det.precision,
                             options=state["index_options"])
    det._set_fitted(FittedState(
        protos, tensors["class_counts"].to(dev), p_ood, source, index, resolved, dev,
        n_train=state["n_train"], train_accuracy=state["train_accuracy"],
        shard_sizes=shard_sizes, extractor=state.get("extractor"),
        indexed_rows=tensors["indexed_rows"].to(dev) if "indexed_rows" in tensors else None,
        ood_fingerprints=(tensors["ood_fingerprints"].cpu() if "ood_fingerprints" in tensors
                          else None),
        feature_names=(None if state.get("feature_names_in") is None
                       else tuple(state["feature_names_in"]))))
    if state.get("calibration") is not None:
        det.calibration_ = state["calibration"]
    if rounds_past_fp32(det.precision, dev, det.dtype_):
        # (the file does not say where, or in which precision, the fit checked its search: a
        # CPU's tf32 computes in fp32, and a precision set after the fit is checked at the
        # first search, which a save may come before)
        check_search_again(det.index_, det.dtype_, det.precision, dev, det._sharded,
                           in_place=True)


class Placement:
    """``save``, ``load`` and ``to(device)`` of a fitted detector (a base of
    :class:`grood.GROOD`)."""

    if TYPE_CHECKING:  # what the detector class provides
        precision: str
        backend: str
        device_: torch.device
        _sharded: bool

        def _check_fitted(self) -> None: ...

        def _check_score_params(self) -> None: ...

    def save(self, path: str | os.PathLike) -> None:
        """Write the fitted detector to a ``.safetensors`` file, atomically: tensors, JSON
        metadata and a SHA-256 digest, no pickle. A distributed detector: one shard file per
        rank and a JSON manifest at ``path`` (see :mod:`grood.persistence`). The parameters it
        scores with are checked first, as a score checks them (``k`` within the index, a known
        ``precision``): a file that could not be scored with is not written. A precision set
        since the fit is saved as set, and the load checks its search (see ``load``)."""
        self._check_fitted()
        with dist.together(self._sharded, "checking the parameters it is saved with"):
            self._check_score_params()
        save(self, Path(path))

    @classmethod
    def load(cls: type[_D], path: str | os.PathLike, *,
             device: str | torch.device | None = None, distributed: bool = False,
             backend: str | None = None) -> _D:
        """Read a detector written by :meth:`save` onto ``device`` (default: CPU), everything
        checked before use and nothing in the file executed. A manifest loads with
        ``distributed=True`` on as many ranks as saved it, or whole into one process (indexes
        joined in rank order). ``backend`` replaces the saved one (``"auto"`` or ``"torch"`` to
        score on a CPU a detector fitted with ``backend="triton"`` on a GPU). Where the search
        on ``device`` rounds past the features' own arithmetic (``bf16`` anywhere, ``tf32`` on
        a GPU), the fit's check of it is run again (the file says neither where nor in which
        precision the fit ran it): the index is held less the gradients' mean where that
        resolves it, as a fit there would hold it. Raises
        :class:`grood.errors.DetectorFileError` for a bad file."""
        return load(cls, Path(path), device=check_device(device),
                    distributed=check_flag(distributed, "distributed"), backend=backend)

    def to(self: _D, device: str | torch.device) -> _D:
        """Move the fitted detector to ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a
        ``torch.device``), in place, and return it (as ``nn.Module.to`` does).

        Prototypes, counts and the index move there (a faiss index is rebuilt there: on the
        GPU where faiss has GPU support), the backend is resolved again for that device, and
        the threshold, feature settings and parameters are kept; the scores are then computed
        there. Everything is built on the new device before the detector changes: when the
        move fails (no such device, too little memory, ``backend="triton"`` where Triton cannot
        run — set ``backend="auto"`` first) the detector is as it was. A distributed detector
        is refused (each rank holds its own shard on its own device; load its manifest with
        ``device=``). The ``device`` parameter (where the next fit runs) is not changed.
        """
        self._check_fitted()
        if device is None:
            raise ValueError("to() needs a device ('cpu', 'cuda', 'cuda:1' or a torch.device)")
        dev = check_device(device)
        if dev.type == "cpu":  # one host memory: "cpu:1" is "cpu"
            dev = torch.device("cpu")
        if self._sharded:
            raise ValueError("to(): this detector is sharded across ranks, each shard on its "
                             "rank's device; load its manifest with GROOD.load(path, "
                             "device=..., distributed=True) to place the shards, or without "
                             "distributed=True for the whole index in one process")
        # What the move resolves and builds with, when changed since fit.
        check_precision(self.precision)
        ops.check_backend_name(self.backend)
        if dev != self.device_:
            move(self, dev)
        return self


def move(det: Any, dev: torch.device) -> None:
    """Rebuild the fitted, unsharded ``det`` on ``dev`` from its own state (see
    :meth:`Placement.to`)."""
    _, state, tensors = detector_state(det, host=False)
    install(det, state, tensors, dev, source=det.ood_source_,
            hint=f"The detector's backend is {det.backend!r}; to move it to {dev}, set "
                 "det.backend = 'auto' (or 'torch') first")


def read_file(path: Path, *, shard: tuple[int, int] | None = None,
              into: dict[str, Tensor] | None = None,
              listed: tuple[str | None, Path] | None = None
              ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Tensor]]:
    """Read and check one detector file: ``(params, state, tensors)``, nothing built yet.

    ``shard=(rank, world)`` when the file is read as that rank's shard of a manifest; a shard
    file on its own is refused (it holds part of the index). ``into``: tensors by name to read
    into (and return) where the file's tensor has the same shape and dtype; the others are
    read into new memory. ``listed=(digest, manifest)``: the digest a manifest lists for the
    file, which its contents must have (None: the manifest lists none).
    """
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"no detector file at {path}{path_hint(path)}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            names = set(f.keys())
            # Copied out of the file's memory map: a detector must not change (or crash
            # with SIGBUS) when its file is overwritten in place after loading, and the
            # digest below then checks exactly the bytes that are used.
            tensors = {}
            for name in names:
                mapped, dest = f.get_tensor(name), (into or {}).get(name)
                if dest is not None and dest.shape == mapped.shape and dest.dtype == mapped.dtype:
                    tensors[name] = dest.copy_(mapped)
                else:
                    tensors[name] = mapped.clone()
    except Exception as exc:  # safetensors raises several types for damaged files
        raise _unreadable(path, exc) from exc
    version = _format_version(path, meta)
    optional = OPTIONAL_TENSORS if version >= 2 else ()
    if not names >= set(TENSOR_NAMES) or any(
            n not in TENSOR_NAMES + optional and not n.startswith("index.") for n in names):
        raise DetectorFileError(f"{path} holds tensors {sorted(names)}, expected "
                                f"{sorted(TENSOR_NAMES)}, index.* and (optionally) "
                                f"{', '.join(optional) or 'nothing else'}")
    stored, computed = meta.pop("digest", None), digest(tensors, meta)
    if listed is not None and listed[0] is not None and listed[0] != computed:
        raise DetectorFileError(f"{path} does not match the digest in {listed[1]}")
    if stored != computed:
        raise DetectorFileError(f"{path} is corrupt: its checksum does not match its contents")
    if ("index.centre" in names) != (version >= CENTRED_FORMAT_VERSION):
        raise DetectorFileError(
            f"{path} is inconsistent: format version {version} "
            + ("holds no index.centre (a version 3 file's index is held less one)"
               if version >= CENTRED_FORMAT_VERSION else
               f"holds an index.centre (only version {CENTRED_FORMAT_VERSION} files do)"))
    params, state = _parsed_metadata(path, meta)

    c, d = state["n_classes"], state["n_features_in"]
    vectors = tensors.get("index.vectors")
    if (tuple(tensors["class_prototypes"].shape) != (c, d)
            or tuple(tensors["class_counts"].shape) != (c,)
            or tuple(tensors["ood_prototype"].shape) != (d,)
            or (vectors is not None and (vectors.ndim != 2 or vectors.shape[1] != d))):
        raise DetectorFileError(f"{path} is inconsistent: tensor shapes do not match "
                                f"{c} classes of dimension {d}")
    prints = tensors.get("ood_fingerprints")
    if prints is not None and (prints.dtype != torch.float64 or prints.ndim != 2
                               or prints.shape[1] != FINGERPRINT_DIMS or not prints.shape[0]
                               or not bool(torch.isfinite(prints).all())):
        raise DetectorFileError(f"{path} is inconsistent: its ood_fingerprints are not finite "
                                f"float64 rows of {FINGERPRINT_DIMS} columns ({prints.dtype} "
                                f"{list(prints.shape)})")
    rows = tensors.get("indexed_rows")
    if rows is not None and not training_row_numbers(rows, state["n_train"]):
        raise DetectorFileError(f"{path} is inconsistent: its indexed_rows are not increasing "
                                f"training-row numbers below n_train={state['n_train']}")
    # Every rank's index size (one entry for a single-process detector); files without it
    # hold a whole index.
    shard_sizes = state.get("shard_sizes")
    if shard_sizes is not None and (
            not isinstance(shard_sizes, list) or not shard_sizes
            or not all(isinstance(v, int) and v >= 0 for v in shard_sizes)):
        raise DetectorFileError(f"{path} is inconsistent: invalid shard_sizes {shard_sizes!r}")
    n_ranks = len(shard_sizes) if shard_sizes is not None else 1
    record = state.get("shard")
    if shard is None and (n_ranks > 1
                          or (isinstance(record, dict) and record.get("world", 1) > 1)):
        raise DetectorFileError(f"{path} is one shard of a detector saved by {n_ranks} "
                                "ranks and holds only part of its index; load the JSON manifest "
                                "saved beside it")
    if shard is not None and record is not None and record != {"rank": shard[0],
                                                               "world": shard[1]}:
        raise DetectorFileError(f"{path} is not rank {shard[0]}'s shard of a {shard[1]}-rank "
                                f"detector (it says {record})")
    if shard is not None and record is None and shard[1] == 1:
        # Files written before shards were marked come from multi-rank saves only.
        raise DetectorFileError(f"{path} is a single-process detector file, not a shard")
    if shard is not None and n_ranks != shard[1]:
        raise DetectorFileError(f"{path} belongs to a detector of {n_ranks} rank(s), not "
                                f"{shard[1]} as its manifest says")
    check_calibration(path, state.get("calibration"))
    if shard_sizes is not None and sum(shard_sizes) < params["k"]:
        raise DetectorFileError(f"{path} is inconsistent: k={params['k']} but its index "
                                f"holds {sum(shard_sizes)} vectors in all")
    return params, state, tensors


# Files often passed where a detector belongs, by their first bytes (none of these can open
# a safetensors file: read as its header length they give tens of MB or more).
_OTHER_FILES = ((b"PK\x03\x04", "a zip archive, as NumPy writes .npz files and torch.save .pt "
                                  "files (feature files, model checkpoints)"),
                (b"\x93NUMPY", "a NumPy .npy array"),
                (b"\x80\x02\x8a\x0a", "a pickle from torch.save's legacy format"))
_DETECTOR_IS = "a detector is the .safetensors file GROOD.save and 'grood fit' write"


def _unreadable(path: Path, exc: Exception) -> DetectorFileError:
    """The error for a file safetensors cannot read: what it is where its first bytes say."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        head = b""
    for magic, what in _OTHER_FILES:
        if head.startswith(magic):
            return DetectorFileError(f"{path} is not a grood detector file: it is {what}; "
                                     f"{_DETECTOR_IS}")
    return DetectorFileError(f"{path} is not a readable grood detector file (damaged, truncated "
                             f"or not safetensors): {exc}")


def _format_version(path: Path, meta: dict[str, str]) -> int:
    """The format version of a detector file's metadata, refused unless this grood reads it."""
    if meta.get("format") != FILE_FORMAT:
        if "format" not in meta:
            raise DetectorFileError(f"{path} is not a grood detector file: it is a safetensors "
                                    "file grood did not write (a feature file or model "
                                    f"weights?); {_DETECTOR_IS}")
        raise DetectorFileError(f"{path} is not a grood detector file "
                                f"(format {meta['format']!r}, expected {FILE_FORMAT!r})")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise DetectorFileError(f"{path}: invalid format_version "
                                f"{meta.get('format_version')!r}") from None
    if version not in READABLE_VERSIONS:
        raise DetectorFileError(f"{path} has detector format version {version}{_writer(meta)}; "
                                f"{READS}")
    return version


def describe(path: str | os.PathLike, *, check: bool = False) -> dict[str, Any]:
    """What a detector file or shard manifest holds (``grood info``), as JSON values: from the
    headers alone (no tensor read, digests not checked), or with ``check`` after reading and
    checking every tensor and digest as loading does (one shard at a time; no index built)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no detector file at {path}{path_hint(path)}")
    sharded = _starts_with(path, b"{")
    manifest = _read_manifest(path) if sharded else None
    listed = (_manifest_shards(path, verify=check, manifest=manifest) if sharded
              else [_Shard(path, "", None)])
    files = [s.file for s in listed]
    heads = [read_header(f) for f in files]
    if check:  # everything loading checks, shard by shard
        for r, s in enumerate(listed):
            read_file(s.file, shard=(r, len(files)) if sharded else None,
                      listed=(s.digest, path) if sharded else None)
    params, state, header_meta, shapes = heads[0]
    # The version and writer: a sharded detector's manifest's own.
    meta: dict[str, Any] = manifest if manifest is not None else header_meta
    # Every rank's index size; files saved before it was recorded hold one whole index.
    sizes = state.get("shard_sizes") or (
        [shapes["index.vectors"][0]] if "index.vectors" in shapes else None)
    if sharded:
        if sizes is None or len(sizes) != len(files):
            raise DetectorFileError(f"{path} lists {len(files)} shard(s) but {files[0].name} "
                                    f"records {'no' if sizes is None else len(sizes)} shard "
                                    "size(s): the files are not one detector's")
    elif sizes is not None and len(sizes) > 1:
        raise DetectorFileError(f"{path} is one shard of a detector saved by {len(sizes)} "
                                "ranks and holds only part of its index; describe the JSON "
                                "manifest saved beside it")
    return {
        "file": str(path), "sharded": sharded, "checked": check,
        "format_version": int(meta["format_version"]), "written_by": meta.get("written_by"),
        "bytes": sum(f.stat().st_size for f in files),
        # The SHA-256 a file records over its tensors and settings (equal for equal
        # detectors saved by one grood; verified only with check): a sharded detector's
        # under each shard.
        "digest": None if sharded else header_meta.get("digest"),
        "shards": ([{"file": f.name, "gradients": n, "digest": head[2].get("digest")}
                    for f, n, head in zip(files, sizes, heads, strict=True)]
                   if sharded and sizes is not None else None),
        **{key: state.get(key) for key in ("n_train", "n_classes", "n_features_in", "dtype",
                                           "train_accuracy", "index", "index_options",
                                           "extractor", "calibration", "feature_names_in")},
        "indexed": sum(sizes) if sizes else None,
        "rows_recorded": all("indexed_rows" in shapes for *_, shapes in heads),
        # the exact index held less its gradients' mean (the fit's check: README, Numerics)
        "index_centred": any("index.centre" in shapes for *_, shapes in heads),
        # rows the OOD prototype was averaged from, fingerprinted (None: none recorded)
        "ood_fingerprints": shapes.get("ood_fingerprints", [None])[0],
        **{key: params.get(key) for key in ("k", "precision", "backend", "batch_size",
                                            "ood_prototype")},
    }


def read_header(path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, str],
                                      dict[str, list[int]]]:
    """``(params, state, metadata, tensor shapes by name)`` of one detector file from its
    header alone: no tensor is read and the digest is not checked (:func:`read_file` does
    both)."""
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"no detector file at {path}{path_hint(path)}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as exc:  # safetensors raises several types for damaged files
        raise _unreadable(path, exc) from exc
    _format_version(path, meta)
    params, state = _parsed_metadata(path, meta)
    return params, state, meta, shapes


def _parsed_metadata(path: Path, meta: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A detector file's ``params`` and ``state``, parsed and checked field by field: what
    loading and ``grood info`` read from them is there, of its type (a header that parses but
    lacks a field was reported from deep inside, e.g. as a formatting error)."""
    try:
        params, state = json.loads(meta["params"]), json.loads(meta["state"])
    except (KeyError, ValueError) as exc:
        raise DetectorFileError(f"{path} is corrupt: unreadable metadata ({exc})") from None
    if not isinstance(params, dict) or not isinstance(state, dict):
        raise DetectorFileError(f"{path} is corrupt: unreadable metadata")

    def text(v: Any) -> bool:
        return isinstance(v, str)

    def fraction(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1

    def source(v: Any) -> bool:
        return isinstance(v, dict) and text(v.get("name")) and isinstance(v.get("params"), dict)

    def options(v: Any) -> bool:
        return v is None or isinstance(v, dict)

    def dtype(v: Any) -> bool:  # the training features' (scores of float64 are float64)
        return v in {str(t).removeprefix("torch.") for t in FLOAT_DTYPES}

    def names(v: Any) -> bool:  # a table's column names, one per feature (None: an array's)
        return v is None or (isinstance(v, list) and all(map(text, v))
                             and len(v) == state.get("n_features_in"))

    def extractor(v: Any) -> bool:  # fit_model's layer, and whether its loader shuffled
        return v is None or (isinstance(v, dict) and set(v) <= {"features", *SHUFFLED}
                             and (v.get("features") is None or text(v["features"]))
                             and v.get("row_order") in (None, *SHUFFLED.values()))

    fields = {"params": (params, {"k": is_count, "batch_size": is_count, "precision": text,
                                  "backend": text, "index": text, "ood_prototype": source,
                                  "index_options": options}),
              "state": (state, {"n_train": is_count, "n_classes": is_count,
                                "n_features_in": is_count, "train_accuracy": fraction,
                                "index": text, "dtype": dtype, "extractor": extractor,
                                "index_options": options, "feature_names_in": names})}
    bad = [f"{where}.{key}={values[key]!r}" if key in values else f"{where}.{key} missing"
           for where, (values, checks) in fields.items()
           for key, ok in checks.items() if not ok(values.get(key))]
    if bad:
        raise DetectorFileError(f"{path} is corrupt: invalid metadata {', '.join(bad)}")
    return params, state


def training_row_numbers(rows: Tensor, n_train: Any) -> bool:
    """Whether ``rows`` can be a detector's ``indexed_rows``: int64 [n], strictly increasing,
    in ``0 .. n_train - 1``."""
    if rows.dtype != torch.int64 or rows.ndim != 1 or not isinstance(n_train, int):
        return False
    return not rows.numel() or bool(rows[0] >= 0 and rows[-1] < n_train
                                    and (rows[1:] > rows[:-1]).all())


def load_file(cls: Any, path: Path, *, device: Any, shard: tuple[int, int] | None = None,
              distributed: bool = False, backend: str | None = None,
              listed: tuple[str | None, Path] | None = None) -> Any:
    """Read, check and build one detector file (see :func:`read_file`)."""
    params, state, tensors = read_file(path, shard=shard, listed=listed)
    shard_sizes = state.get("shard_sizes")
    det = restore(cls, params, state, tensors, device,
                  shard_sizes=shard_sizes if shard is not None else None,
                  distributed=distributed, backend=backend, path=path)
    sizes = shard_sizes if shard_sizes is not None else [det.index_.ntotal]
    own = sizes[shard[0] if shard is not None else 0]
    rows = det.indexed_rows_
    if det.index_.dim != state["n_features_in"] or sum(sizes) < params["k"] or (
            det.index_.ntotal != own) or (rows is not None and rows.numel() != own):
        raise DetectorFileError(f"{path} is inconsistent: its index holds {det.index_.ntotal} "
                                f"vectors of dimension {det.index_.dim}"
                                + ("" if rows is None else f" with {rows.numel()} row numbers")
                                + (f" where rank {shard[0]}'s shard should hold {own}"
                                   if shard is not None else ""))
    return det
