"""Read a PyTorch state dict saved in the legacy (pre-1.6, non-zip) format, without torch.

Why no torch: the pretrained backbone's weights ship as a ``.pth`` file, and torch is a
multi-gigabyte dependency that this project (Keras on TensorFlow) otherwise never needs. A
state dict is only named float arrays, so a small reader is enough.

The legacy format is a plain byte stream of consecutive pickles:

1. the magic number ``0x1950A86A20F9469CFC6C``;
2. the protocol version (1001);
3. system info (``{"little_endian": ..., "type_sizes": ...}``);
4. the saved object (here an ``OrderedDict`` name -> tensor). Each tensor is pickled as
   ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` where ``storage``
   is a *persistent id* ``("storage", torch.FloatStorage, key, location, numel, view)``;
5. the list of storage keys, in the order their data follows;
6. for each key: an 8-byte little-endian element count, then the raw little-endian bytes.

The unpickler is restricted: ``find_class`` only resolves the handful of names a state dict
needs, mapped to local stand-ins, so a malicious file cannot run code while being read.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import as_strided

__all__ = ["load_legacy_state_dict"]

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for ``torch.FloatStorage`` and friends: just the element dtype."""

    name: str
    dtype: np.dtype


_STORAGE_TYPES = {
    name: _StorageType(name, np.dtype(dtype).newbyteorder("<"))
    for name, dtype in {
        "DoubleStorage": np.float64,
        "FloatStorage": np.float32,
        "HalfStorage": np.float16,
        "LongStorage": np.int64,
        "IntStorage": np.int32,
        "ShortStorage": np.int16,
        "CharStorage": np.int8,
        "ByteStorage": np.uint8,
        "BoolStorage": np.bool_,
    }.items()
}


@dataclass
class _Storage:
    key: str
    type: _StorageType
    numel: int
    data: np.ndarray | None = None  # filled once the storage bytes have been read


@dataclass
class _TensorRef:
    """A tensor whose storage bytes come later in the stream; materialised at the end."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    extra: dict = field(default_factory=dict)

    def to_numpy(self) -> np.ndarray:
        data = self.storage.data
        if data is None:
            raise ValueError(f"storage {self.storage.key!r} has no data in the file")
        if not self.size:
            return np.array(data[self.offset], dtype=data.dtype.newbyteorder("="))
        needed = self.offset + 1 + sum((n - 1) * s for n, s in zip(self.size, self.stride, strict=True))
        if min(self.size) > 0 and needed > data.size:
            raise ValueError(f"tensor view exceeds storage {self.storage.key!r}")
        base = data[self.offset:]
        itemsize = data.dtype.itemsize
        view = as_strided(base, shape=self.size, strides=[s * itemsize for s in self.stride],
                          writeable=False)
        return np.array(view, dtype=data.dtype.newbyteorder("="))  # a writable copy


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor without a storage")
    return _TensorRef(storage, int(storage_offset), tuple(int(n) for n in size),
                      tuple(int(s) for s in stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): storage_type for name, storage_type in _STORAGE_TYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, storages: dict[str, _Storage]):
        super().__init__(file, encoding="latin1")
        self._storages = storages

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"{module}.{name} is not allowed in a PyTorch state dict") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid[:5]
        if len(pid) > 5 and pid[5] is not None:
            raise pickle.UnpicklingError("storage views are not supported")
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unknown storage type {storage_type!r}")
        storage = self._storages.get(key)
        if storage is None:
            storage = self._storages[key] = _Storage(str(key), storage_type, int(numel))
        return storage


class _PlainUnpickler(_RestrictedUnpickler):
    """For the header pickles and the key list: no classes or persistent ids at all."""

    def __init__(self, file):
        super().__init__(file, storages={})

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed here")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed here")


def _to_numpy(obj):
    if isinstance(obj, _TensorRef):
        return obj.to_numpy()
    if isinstance(obj, dict):
        return {key: _to_numpy(value) for key, value in obj.items()}
    return obj


def load_legacy_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a legacy-format PyTorch ``.pth`` state dict into ``{name: numpy array}``.

    Raises ValueError when the file is not a legacy PyTorch checkpoint (a zip-format
    checkpoint, random bytes, a truncated file, or a pickle that needs other classes).
    """
    path = Path(path)
    if zipfile.is_zipfile(path):
        raise ValueError(
            f"{path} is a zip-format PyTorch checkpoint (torch >= 1.6); only the legacy "
            "format is supported")
    raw = path.read_bytes()
    stream = io.BytesIO(raw)
    storages: dict[str, _Storage] = {}
    try:
        magic = _PlainUnpickler(stream).load()
        if magic != MAGIC_NUMBER:
            raise ValueError("bad magic number")
        protocol = _PlainUnpickler(stream).load()
        if protocol != PROTOCOL_VERSION:
            raise ValueError(f"unsupported protocol version {protocol!r}")
        sys_info = _PlainUnpickler(stream).load()
        if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
            raise ValueError("only little-endian checkpoints are supported")
        result = _RestrictedUnpickler(stream, storages).load()
        keys = _PlainUnpickler(stream).load()
        if not isinstance(keys, list):
            raise ValueError("storage key list missing")
        for key in keys:
            storage = storages.get(key)
            if storage is None:
                raise ValueError(f"storage {key!r} is not referenced by any tensor")
            header = stream.read(8)
            if len(header) != 8:
                raise ValueError("truncated file")
            numel = int.from_bytes(header, "little")
            if numel != storage.numel:
                raise ValueError(f"storage {key!r}: {numel} elements, expected {storage.numel}")
            nbytes = numel * storage.type.dtype.itemsize
            start = stream.tell()
            if start + nbytes > len(raw):
                raise ValueError("truncated file")
            storage.data = np.frombuffer(raw, dtype=storage.type.dtype, count=numel,
                                         offset=start)
            stream.seek(start + nbytes)
        state = _to_numpy(result)
    except ValueError as exc:
        raise ValueError(f"{path} is not a readable legacy PyTorch checkpoint: {exc}") from exc
    except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError,
            KeyError, OverflowError) as exc:
        raise ValueError(
            f"{path} is not a legacy PyTorch checkpoint: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or not all(
            isinstance(v, np.ndarray) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return {str(name): value for name, value in state.items()}
