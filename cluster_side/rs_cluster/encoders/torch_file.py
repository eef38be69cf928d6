"""Read the tensors of a PyTorch ``.pth`` state dict with numpy alone.

Why not torch: the cluster's runtime and the analyst's machine must not need torch (hundreds of MB
of wheels) just to read 19 MB of ImageNet weights once. Why not plain :mod:`pickle`: a ``.pth``
file is a pickle, and unpickling runs whatever callables the file names. This reader allows only
the handful of globals a state dict of plain tensors needs (the tensor rebuild helpers, the typed
storage classes and ``collections.OrderedDict``) and refuses the file, before calling anything,
when it names any other.

Both layouts torch has written are read:

* the legacy layout (torch < 1.6, and ``_use_new_zipfile_serialization=False``): five pickles in a
  row (magic number, protocol version, system info, the object, the storage keys), then each
  storage's raw bytes, prefixed by its element count as an 8-byte integer;
* the zip layout (torch >= 1.6): ``<name>/data.pkl`` plus one ``<name>/data/<key>`` entry per
  storage.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np

from rs_cluster.errors import RsClusterError


class WeightsFileError(RsClusterError, ValueError):
    """A weights file is unreadable: truncated, not a PyTorch file, or an unsupported variant."""


class UnsafeWeightsError(WeightsFileError):
    """A weights file's pickle names a global outside the state-dict allow-list; nothing was run."""


# torch.serialization's MAGIC_NUMBER and PROTOCOL_VERSION for the legacy layout.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# The typed storage classes a state dict's pickle names, and the numpy dtype of their elements.
# bfloat16 has no numpy dtype: its 16 bits are the top half of a float32 and are widened on read.
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


@dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return _STORAGE_DTYPES[self.name]


@dataclass
class _Storage:
    """One storage named by the pickle; its bytes arrive after the pickle (legacy) or from the
    zip entry ``data/<key>``."""

    key: str
    storage_type: _StorageType
    numel: int
    data: np.ndarray | None = None


@dataclass
class _StorageView:
    """A legacy view into part of a root storage (``view_metadata`` in the persistent id)."""

    root: _Storage
    offset: int
    numel: int


@dataclass
class _PendingTensor:
    storage: _Storage | _StorageView
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    source: str = field(default="")


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, *_rest: Any
                       ) -> _PendingTensor:
    # Stands in for torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
    # backward_hooks[, metadata]); the data are filled in once every storage has been read.
    if not isinstance(storage, _Storage | _StorageView):
        raise UnsafeWeightsError("a tensor in the pickle is not built on a storage")
    if not (isinstance(storage_offset, int) and isinstance(size, tuple)
            and isinstance(stride, tuple) and len(size) == len(stride)
            and all(isinstance(v, int) for v in size + stride)):
        raise WeightsFileError("a tensor in the pickle has a malformed offset, size or stride")
    return _PendingTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data: Any, *_rest: Any) -> Any:
    # torch._utils._rebuild_parameter(data, requires_grad, backward_hooks): a Parameter is its data.
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _StateDictUnpickler(pickle.Unpickler):
    """An unpickler that resolves only allow-listed globals, to stand-ins defined here."""

    def __init__(self, file: BinaryIO, source: str, storages: dict[str, _Storage]) -> None:
        super().__init__(file)
        self._source = source
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeWeightsError(
                f"{self._source}: refusing to load: its pickle names {module}.{name}, which a "
                "state dict of tensors never needs (the file may be malicious or not a plain "
                "state dict)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and pid and pid[0] in ("storage", b"storage")):
            raise UnsafeWeightsError(f"{self._source}: unexpected persistent id {pid!r:.80}")
        # Legacy: (tag, storage_type, key, location, numel, view_metadata); zip: no view_metadata.
        if len(pid) not in (5, 6):
            raise WeightsFileError(f"{self._source}: malformed storage reference {pid!r:.80}")
        storage_type, key, _location, numel = pid[1:5]
        view_metadata = pid[5] if len(pid) == 6 else None
        if not isinstance(storage_type, _StorageType):
            raise UnsafeWeightsError(f"{self._source}: storage reference without a storage type")
        if isinstance(key, bytes):
            key = key.decode("ascii")
        if not (isinstance(key, str) and isinstance(numel, int) and numel >= 0):
            raise WeightsFileError(f"{self._source}: malformed storage reference {pid!r:.80}")
        storage = self._storages.setdefault(key, _Storage(key, storage_type, numel))
        if view_metadata is None:
            return storage
        _view_key, view_offset, view_numel = view_metadata
        return _StorageView(storage, view_offset, view_numel)


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The tensors of the PyTorch state dict at ``path``, by key, as numpy arrays (C order, own
    memory). Raises :class:`UnsafeWeightsError` for a pickle that names a disallowed global and
    :class:`WeightsFileError` for anything else unreadable; torch is never imported."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise WeightsFileError(f"{source}: cannot read the weights file: {exc.strerror or exc}"
                               ) from exc
    if zipfile.is_zipfile(io.BytesIO(raw)):
        obj = _load_zip(raw, source)
    else:
        obj = _load_legacy(raw, source)
    return _as_state_dict(obj, source)


def _load_legacy(raw: bytes, source: str) -> Any:
    f = io.BytesIO(raw)
    storages: dict[str, _Storage] = {}
    try:
        # The header pickles hold plain ints and a dict; they still go through the restricted
        # unpickler, so a crafted header cannot run anything either.
        magic = _StateDictUnpickler(f, source, storages).load()
        if magic != _LEGACY_MAGIC:
            raise WeightsFileError(f"{source}: not a PyTorch weights file (neither a zip nor the "
                                   "legacy pickle layout)")
        protocol = _StateDictUnpickler(f, source, storages).load()
        if protocol != _LEGACY_PROTOCOL:
            raise WeightsFileError(f"{source}: legacy PyTorch file of protocol {protocol!r}; only "
                                   f"{_LEGACY_PROTOCOL} is known")
        sys_info = _StateDictUnpickler(f, source, storages).load()
        obj = _StateDictUnpickler(f, source, storages).load()
        keys = _StateDictUnpickler(f, source, storages).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError) as exc:
        if isinstance(exc, WeightsFileError):
            raise
        raise WeightsFileError(f"{source}: corrupt or truncated PyTorch pickle: {exc}") from exc
    if not (isinstance(sys_info, dict) and sys_info.get("little_endian", True)):
        raise WeightsFileError(f"{source}: written on a big-endian machine, which is not supported")
    if not (isinstance(keys, list) and all(isinstance(k, str | bytes) for k in keys)):
        raise WeightsFileError(f"{source}: malformed storage key list")
    pos = f.tell()
    for key in keys:
        key = key.decode("ascii") if isinstance(key, bytes) else key
        if key not in storages:
            raise WeightsFileError(f"{source}: storage {key} is listed but never referenced")
        storage = storages[key]
        if pos + 8 > len(raw):
            raise WeightsFileError(f"{source}: truncated before storage {key}")
        numel = int.from_bytes(raw[pos:pos + 8], "little")
        pos += 8
        if numel != storage.numel:
            raise WeightsFileError(f"{source}: storage {key} holds {numel} elements, its tensors "
                                   f"expect {storage.numel}")
        nbytes = numel * storage.storage_type.dtype.itemsize
        if pos + nbytes > len(raw):
            raise WeightsFileError(f"{source}: truncated inside storage {key}")
        storage.data = np.frombuffer(raw, storage.storage_type.dtype, numel, pos)
        pos += nbytes
    return obj


def _load_zip(raw: bytes, source: str) -> Any:
    storages: dict[str, _Storage] = {}
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            names = zf.namelist()
            pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise WeightsFileError(f"{source}: a zip, but not a PyTorch file (no single "
                                       "<name>/data.pkl inside)")
            prefix = pickles[0][: -len("data.pkl")]
            order = zf.read(prefix + "byteorder").decode() if prefix + "byteorder" in names \
                else "little"
            if order != "little":
                raise WeightsFileError(f"{source}: written big-endian, which is not supported")
            with zf.open(pickles[0]) as pkl:
                obj = _StateDictUnpickler(io.BytesIO(pkl.read()), source, storages).load()
            for key, storage in storages.items():
                entry = f"{prefix}data/{key}"
                if entry not in names:
                    raise WeightsFileError(f"{source}: storage {entry} is missing")
                data = zf.read(entry)
                nbytes = storage.numel * storage.storage_type.dtype.itemsize
                if len(data) < nbytes:
                    raise WeightsFileError(f"{source}: storage {entry} is truncated")
                storage.data = np.frombuffer(data, storage.storage_type.dtype, storage.numel)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, zipfile.BadZipFile) as exc:
        if isinstance(exc, WeightsFileError):
            raise
        raise WeightsFileError(f"{source}: corrupt or truncated PyTorch file: {exc}") from exc
    return obj


def _materialise(t: _PendingTensor, name: str, source: str) -> np.ndarray:
    if isinstance(t.storage, _StorageView):
        base, view_off, avail = t.storage.root, t.storage.offset, t.storage.numel
    else:
        base, view_off, avail = t.storage, 0, t.storage.numel
    if base.data is None:
        raise WeightsFileError(f"{source}: tensor {name}'s storage {base.key} has no data")
    flat = base.data[view_off:view_off + avail]
    # The highest element the strides reach must lie inside the storage, or as_strided would read
    # past it.
    if any(s < 0 for s in t.size + t.stride) or t.offset < 0:
        raise WeightsFileError(f"{source}: tensor {name} has a negative size, stride or offset")
    if 0 in t.size:
        arr = np.zeros(t.size, flat.dtype)
    else:
        last = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride, strict=True))
        if last >= len(flat):
            raise WeightsFileError(f"{source}: tensor {name} reaches past the end of its storage")
        itemsize = flat.dtype.itemsize
        arr = np.lib.stride_tricks.as_strided(
            flat[t.offset:], shape=t.size, strides=tuple(s * itemsize for s in t.stride),
            writeable=False)
    if base.storage_type.name == "BFloat16Storage":
        return (np.ascontiguousarray(arr).astype("<u4") << 16).view("<f4")
    return np.array(arr, order="C")


def _as_state_dict(obj: Any, source: str) -> dict[str, np.ndarray]:
    # Checkpoints made by training scripts often wrap the weights: {"state_dict": {...}}.
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise WeightsFileError(f"{source}: holds a {type(obj).__name__}, not a state dict")
    out: dict[str, np.ndarray] = {}
    for name, value in obj.items():
        if not isinstance(name, str):
            raise WeightsFileError(f"{source}: state dict key {name!r:.40} is not a string")
        if isinstance(value, _PendingTensor):
            out[name] = _materialise(value, name, source)
        elif isinstance(value, _Storage | _StorageView):
            raise WeightsFileError(f"{source}: {name} is a bare storage, not a tensor")
        # Anything else (a step counter, nested metadata) carries no weights and is dropped.
    return out
