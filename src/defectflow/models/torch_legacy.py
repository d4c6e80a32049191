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
needs, mapped to local stand-ins, so a malicious file cannot run code while being read. The
stand-ins refuse pickle's BUILD opcode (they are module-level objects: a file setting their
attributes would change how every later file is read). Every tensor view is checked against
its storage before an array is built from it (offset, sizes, strides, element count), so a
crafted file cannot make ``as_strided`` read outside the file's bytes or allocate more than
the file holds.
"""

from __future__ import annotations

import collections
import io
import math
import operator
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import as_strided

__all__ = ["CheckpointError", "load_legacy_state_dict"]

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
#: More dimensions than any weight has; numpy itself stops at 64.
MAX_DIMS = 32


class CheckpointError(ValueError):
    """The file is not a legacy PyTorch state dict this reader accepts (the message says why)."""


class _Unmodifiable:
    """Base of the module-level objects ``find_class`` hands to a pickle.

    Pickle's BUILD opcode sets attributes on whatever object is on its stack (bypassing even
    a frozen dataclass); on these shared objects the change would outlive the file.
    """

    __slots__ = ()

    def __setstate__(self, state):
        raise pickle.UnpicklingError(f"the pickle tries to modify {self!r}")


class _Function(_Unmodifiable):
    """An allowed function, wrapped so a pickle cannot set its ``__defaults__`` and the like."""

    __slots__ = ("_function",)

    def __init__(self, function):
        self._function = function

    def __call__(self, *args, **kwargs):
        return self._function(*args, **kwargs)

    def __repr__(self):
        return f"torch._utils.{self._function.__name__}"


@dataclass(frozen=True)
class _StorageType(_Unmodifiable):
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

    def check_view(self, name: str) -> None:
        """Raise CheckpointError unless the view lies inside its storage (Python ints: no overflow)."""
        numel, key = self.storage.numel, self.storage.key

        def bad(what: str) -> CheckpointError:
            return CheckpointError(f"tensor {name!r} (storage {key!r}, {numel} elements): {what}")

        if len(self.size) != len(self.stride):
            raise bad(f"size {self.size} and stride {self.stride} differ in length")
        if len(self.size) > MAX_DIMS:
            raise bad(f"{len(self.size)} dimensions (at most {MAX_DIMS})")
        if any(n < 0 for n in self.size):
            raise bad(f"negative size {self.size}")
        if any(s < 0 for s in self.stride):  # torch never writes one; numpy would read backwards
            raise bad(f"negative stride {self.stride}")
        if self.offset < 0:
            raise bad(f"negative storage offset {self.offset}")
        elements = math.prod(self.size)
        if elements == 0:
            if self.offset > numel:
                raise bad(f"storage offset {self.offset} past the end")
            return
        # A weight never has more elements than its storage; a zero stride (an expanded
        # tensor) could otherwise turn a few bytes of file into an allocation of any size.
        if elements > numel:
            raise bad(f"size {self.size} has {elements} elements, more than the storage")
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride, strict=True))
        if last >= numel:
            raise bad(
                f"offset {self.offset}, size {self.size}, stride {self.stride} reach "
                f"element {last}, past the end"
            )

    def to_numpy(self, name: str) -> np.ndarray:
        data = self.storage.data
        if data is None:
            raise CheckpointError(
                f"tensor {name!r}: storage {self.storage.key!r} has no data in the file"
            )
        self.check_view(name)
        native = data.dtype.newbyteorder("=")
        if math.prod(self.size) == 0:
            return np.zeros(self.size, dtype=native)
        itemsize = data.dtype.itemsize
        # The stride of a size-1 dimension is never followed; torch may write anything there.
        strides = [
            s * itemsize if n > 1 else 0 for n, s in zip(self.size, self.stride, strict=True)
        ]
        view = as_strided(data[self.offset :], shape=self.size, strides=strides, writeable=False)
        return np.array(view, dtype=native)  # a writable copy


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor without a storage")
    return _TensorRef(
        storage,
        operator.index(storage_offset),
        tuple(operator.index(n) for n in size),
        tuple(operator.index(s) for s in stride),
    )


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _Function(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_parameter"): _Function(_rebuild_parameter),
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
                f"{module}.{name} is not allowed in a PyTorch state dict"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid[:5]
        if len(pid) > 5 and pid[5] is not None:
            raise pickle.UnpicklingError("storage views are not supported")
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unknown storage type {storage_type!r}")
        if not isinstance(key, str):
            raise pickle.UnpicklingError(f"storage key {key!r} is not a string")
        numel = operator.index(numel)
        if numel < 0:
            raise pickle.UnpicklingError(f"storage {key!r}: negative element count {numel}")
        storage = self._storages.get(key)
        if storage is None:
            storage = self._storages[key] = _Storage(key, storage_type, numel)
        elif (storage.type, storage.numel) != (storage_type, numel):
            raise pickle.UnpicklingError(
                f"storage {key!r} is declared twice, as {storage.type.name} of {storage.numel} "
                f"and as {storage_type.name} of {numel} elements"
            )
        return storage


class _PlainUnpickler(_RestrictedUnpickler):
    """For the header pickles and the key list: no classes or persistent ids at all."""

    def __init__(self, file):
        super().__init__(file, storages={})

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed here")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed here")


def _to_numpy(obj, name: str = ""):
    if isinstance(obj, _TensorRef):
        return obj.to_numpy(name)
    if isinstance(obj, dict):
        return {
            key: _to_numpy(value, f"{name}.{key}" if name else str(key))
            for key, value in obj.items()
        }
    return obj


def load_legacy_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a legacy-format PyTorch ``.pth`` state dict into ``{name: numpy array}``.

    Raises CheckpointError (a ValueError) when the file is not a legacy PyTorch checkpoint (a
    zip-format checkpoint, random bytes, a truncated file, a pickle that needs other classes
    or tries to modify the reader's objects), or when a tensor's view does not fit in its
    storage; the message names the tensor and what is wrong. A rejected file leaves no trace:
    all state built while reading is local to the call.
    """
    path = Path(path)
    if zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is a zip-format PyTorch checkpoint (torch >= 1.6); only the legacy "
            "format is supported"
        )
    raw = path.read_bytes()
    stream = io.BytesIO(raw)
    storages: dict[str, _Storage] = {}
    try:
        magic = _PlainUnpickler(stream).load()
        if magic != MAGIC_NUMBER:
            raise CheckpointError("bad magic number")
        protocol = _PlainUnpickler(stream).load()
        if protocol != PROTOCOL_VERSION:
            raise CheckpointError(f"unsupported protocol version {protocol!r}")
        sys_info = _PlainUnpickler(stream).load()
        if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
            raise CheckpointError("only little-endian checkpoints are supported")
        result = _RestrictedUnpickler(stream, storages).load()
        keys = _PlainUnpickler(stream).load()
        if not isinstance(keys, list):
            raise CheckpointError("storage key list missing")
        if len(set(map(str, keys))) != len(keys):
            raise CheckpointError("a storage key is listed twice")
        for key in keys:
            storage = storages.get(key)
            if storage is None:
                raise CheckpointError(f"storage {key!r} is not referenced by any tensor")
            header = stream.read(8)
            if len(header) != 8:
                raise CheckpointError("truncated file")
            numel = int.from_bytes(header, "little")
            if numel != storage.numel:
                raise CheckpointError(
                    f"storage {key!r}: {numel} elements, expected {storage.numel}"
                )
            nbytes = numel * storage.type.dtype.itemsize
            start = stream.tell()
            if start + nbytes > len(raw):
                raise CheckpointError("truncated file")
            storage.data = np.frombuffer(raw, dtype=storage.type.dtype, count=numel, offset=start)
            stream.seek(start + nbytes)
        state = _to_numpy(result)
    except ValueError as exc:
        raise CheckpointError(f"{path} is not a readable legacy PyTorch checkpoint: {exc}") from exc
    except (
        pickle.UnpicklingError,
        EOFError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        OverflowError,
        RecursionError,
    ) as exc:
        raise CheckpointError(
            f"{path} is not a legacy PyTorch checkpoint: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return {str(name): value for name, value in state.items()}
