"""The torch-free reader of legacy ``.pth`` state dicts, fed files crafted opcode by opcode.

The pickles are written by hand (protocol 2 opcodes) rather than with ``pickle.dump`` so that
they name ``torch`` globals without a fake ``torch`` module, and so that they can say things
``torch.save`` never would (negative offsets, strides, absurd sizes).
"""

import pickle

import numpy as np
import pytest

from defectflow.models import torch_legacy
from defectflow.models.torch_legacy import (
    MAGIC_NUMBER,
    PROTOCOL_VERSION,
    CheckpointError,
    load_legacy_state_dict,
)

# --- a minimal protocol-2 pickle writer ---------------------------------------------------------


def _int(n: int) -> bytes:
    return b"I" + str(n).encode() + b"\n"  # INT: text, so any size and sign


def _str(text: str) -> bytes:
    data = text.encode()
    return b"X" + len(data).to_bytes(4, "little") + data  # BINUNICODE


def _tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"  # MARK ... TUPLE


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()  # GLOBAL: what find_class sees


def _pickle(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."  # PROTO 2 ... STOP


def _tensor(key: str, numel: int, offset: int, size, stride) -> bytes:
    """``_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`` as torch writes it."""
    storage = (
        _tuple(
            _str("storage"),
            _global("torch", "FloatStorage"),
            _str(key),
            _str("cpu"),
            _int(numel),
            b"N",
        )
        + b"Q"
    )  # BINPERSID: the storage comes later in the file
    args = _tuple(
        storage,
        _int(offset),
        _tuple(*map(_int, size)),
        _tuple(*map(_int, stride)),
        b"\x89",
        _global("collections", "OrderedDict") + b")R",
    )
    return _global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def _checkpoint(state_body: bytes, storages: dict[str, np.ndarray]) -> bytes:
    """The legacy layout: magic, protocol, system info, the state dict, storage keys, data."""
    out = [
        pickle.dumps(header, protocol=2)
        for header in (MAGIC_NUMBER, PROTOCOL_VERSION, {"little_endian": True})
    ]
    out.append(_pickle(state_body))
    out.append(pickle.dumps(list(storages), protocol=2))
    for data in storages.values():
        out.append(data.size.to_bytes(8, "little") + data.astype("<f4").tobytes())
    return b"".join(out)


def _state_dict(tensors: dict[str, bytes]) -> bytes:
    """An ``OrderedDict`` of name -> pickled tensor."""
    items = b"".join(_str(name) + tensor for name, tensor in tensors.items())
    return _global("collections", "OrderedDict") + b")R(" + items + b"u"  # SETITEMS


STORAGE = np.arange(24, dtype=np.float32)


def _write(tmp_path, name: str, tensors: dict[str, tuple]) -> object:
    """A checkpoint of one 24-float storage ``s0``; ``tensors``: name -> (offset, size, stride)."""
    path = tmp_path / f"{name}.pth"
    body = _state_dict(
        {tensor: _tensor("s0", STORAGE.size, *view) for tensor, view in tensors.items()}
    )
    path.write_bytes(_checkpoint(body, {"s0": STORAGE}))
    return path


# --- tests --------------------------------------------------------------------------------------


def test_a_valid_crafted_file_loads_to_the_right_values(tmp_path):
    path = _write(
        tmp_path,
        "valid",
        {
            "conv.weight": (0, (4, 6), (6, 1)),
            "conv.weight_t": (0, (6, 4), (1, 6)),
            "tail": (18, (6,), (1,)),  # ends exactly at the last element
            "slice": (7, (2, 3), (6, 2)),
            "bias": (23, (1,), (99999,)),  # a size-1 dimension's stride is never followed
            "scalar": (5, (), ()),
            "empty": (24, (0, 3), (3, 1)),
        },
    )
    state = load_legacy_state_dict(path)
    full = STORAGE.reshape(4, 6)
    np.testing.assert_array_equal(state["conv.weight"], full)
    np.testing.assert_array_equal(state["conv.weight_t"], full.T)
    np.testing.assert_array_equal(state["tail"], STORAGE[18:])
    np.testing.assert_array_equal(state["slice"], full[1:3, 1::2])
    np.testing.assert_array_equal(state["bias"], [23.0])
    assert state["scalar"].shape == () and float(state["scalar"]) == 5.0
    assert state["empty"].shape == (0, 3)
    assert all(array.dtype == np.float32 and array.flags.writeable for array in state.values())


@pytest.mark.parametrize(
    ("view", "complaint"),
    [
        ((-1, (4,), (1,)), r"negative storage offset -1"),
        ((-24, (), ()), r"negative storage offset -24"),  # would index from the end
        ((23, (4,), (-1,)), r"negative stride \(-1,\)"),  # would read backwards
        ((0, (2, -3), (1, 1)), r"negative size"),
        ((0, (5, 6), (6, 1)), r"30 elements, more than the storage"),
        ((20, (2, 3), (6, 1)), r"reach element 28, past the end"),
        ((0, (2,), (24,)), r"reach element 24, past the end"),  # one stride too far
        ((24, (), ()), r"reach element 24, past the end"),
        ((0, (10**6,), (0,)), r"more than the storage"),  # a zero stride as an allocation bomb
        ((0, (2**40, 2**40), (1, 1)), r"more than the storage"),  # overflows int64 in numpy
        ((2**70, (1,), (1,)), r"reach element"),
        ((0, (4, 6), (6,)), r"differ in length"),
        ((0, (1,) * 40, (1,) * 40), r"40 dimensions"),
    ],
)
def test_a_view_outside_its_storage_is_rejected_naming_the_tensor(tmp_path, view, complaint):
    path = _write(tmp_path, "bad", {"fine": (0, (24,), (1,)), "layer.weight": view})
    with pytest.raises(CheckpointError, match=complaint) as caught:
        load_legacy_state_dict(path)
    message = str(caught.value)
    assert "tensor 'layer.weight'" in message and "storage 's0'" in message
    assert str(path) in message


def test_the_checkpoint_error_is_a_value_error(tmp_path):
    # Callers (build_lite0, the CLI) catch ValueError for any unreadable weights file.
    path = _write(tmp_path, "bad", {"w": (-1, (1,), (1,))})
    with pytest.raises(ValueError, match="negative storage offset"):
        load_legacy_state_dict(path)


def test_a_storage_declared_twice_with_different_lengths_is_rejected(tmp_path):
    body = _state_dict(
        {"a": _tensor("s0", 24, 0, (24,), (1,)), "b": _tensor("s0", 10**9, 0, (10**9,), (1,))}
    )
    path = tmp_path / "twice.pth"
    path.write_bytes(_checkpoint(body, {"s0": STORAGE}))
    with pytest.raises(CheckpointError, match="'s0' is declared twice"):
        load_legacy_state_dict(path)


def test_a_storage_listed_twice_is_rejected(tmp_path):
    body = _state_dict({"a": _tensor("s0", 24, 0, (24,), (1,))})
    raw = _checkpoint(body, {"s0": STORAGE})
    keys = pickle.dumps(["s0"], protocol=2)
    raw = raw.replace(keys, pickle.dumps(["s0", "s0"], protocol=2), 1)
    path = tmp_path / "listed_twice.pth"
    path.write_bytes(raw + raw[-(8 + STORAGE.nbytes) :])
    with pytest.raises(CheckpointError, match="listed twice"):
        load_legacy_state_dict(path)


def _build(target: bytes, state: bytes) -> bytes:
    """BUILD: ``target.__dict__.update(state)``, or ``setattr`` for a (None, dict) state."""
    return target + state + b"b"


@pytest.mark.parametrize(
    "tampering",
    [
        # Turn every later FloatStorage into uint64 (a frozen dataclass does not stop BUILD).
        _build(_global("torch", "FloatStorage"), b"}" + _str("dtype") + _str("<u8") + b"s"),
        # Give the module-level rebuild function new defaults.
        _build(
            _global("torch._utils", "_rebuild_tensor_v2"),
            b"N}" + _str("__defaults__") + _tuple(_int(1), _int(2), _int(3)) + b"s\x86",
        ),
        _build(
            _global("torch._utils", "_rebuild_parameter"),
            b"}" + _str("_function") + _global("collections", "OrderedDict") + b"s",
        ),
    ],
    ids=["storage-dtype", "function-defaults", "function-wrapper"],
)
def test_a_rejected_file_changes_no_module_level_state(tmp_path, tampering):
    storage_types = {name: (t.name, t.dtype) for name, t in torch_legacy._STORAGE_TYPES.items()}
    allowed = dict(torch_legacy._ALLOWED)
    defaults = torch_legacy._rebuild_tensor_v2.__defaults__

    path = tmp_path / "tampering.pth"
    body = _state_dict({"w": _tensor("s0", 24, 0, (24,), (1,)), "x": tampering})
    path.write_bytes(_checkpoint(body, {"s0": STORAGE}))
    with pytest.raises(CheckpointError, match="tries to modify"):
        load_legacy_state_dict(path)

    assert {
        name: (t.name, t.dtype) for name, t in torch_legacy._STORAGE_TYPES.items()
    } == storage_types
    assert allowed == torch_legacy._ALLOWED
    assert torch_legacy._rebuild_tensor_v2.__defaults__ == defaults
    # ... and the next file is read exactly as before.
    state = load_legacy_state_dict(_write(tmp_path, "after", {"w": (0, (4, 6), (6, 1))}))
    assert state["w"].dtype == np.float32
    np.testing.assert_array_equal(state["w"], STORAGE.reshape(4, 6))


def test_a_pickle_calling_anything_else_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    body = _state_dict(
        {"w": _global("builtins", "eval") + _tuple(_str(f"open({str(marker)!r}, 'w')")) + b"R"}
    )
    path = tmp_path / "evil.pth"
    path.write_bytes(_checkpoint(body, {}))
    with pytest.raises(CheckpointError, match="builtins.eval is not allowed"):
        load_legacy_state_dict(path)
    assert not marker.exists()
