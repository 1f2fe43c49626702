"""Reading `torch.save` zip checkpoints (`pytorch_model.bin`) without torch and without running code.

The pickle inside names a handful of torch globals; a restricted Unpickler maps exactly those to
numpy stand-ins (a storage becomes a flat array read from the zip's `data/<key>` record, a tensor a
bounds-checked strided view of it) and refuses every other global, so a malicious file fails
before anything it names is called.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from returns.result import Failure, Result, Success

if TYPE_CHECKING:  # MLX is imported where it is used: these modules also serve the torch engine
    import mlx.core as mx

# torch.<Name>Storage -> dtype of its elements (bfloat16 read as uint16 and reinterpreted later).
STORAGES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}


class UnsafePickle(Exception):
    """The pickle names something a plain tensor checkpoint never needs."""


class _Tensor:
    """A rebuilt tensor: numpy data plus the dtype name (numpy has no bfloat16)."""

    __slots__ = ("data", "dtype")

    def __init__(self, data: np.ndarray, dtype: str):
        self.data, self.dtype = data, dtype


class _Unpickler(pickle.Unpickler):
    """Allows only what `torch.save(state_dict)` writes; everything else is refused unexecuted."""

    def __init__(self, file, archive: zipfile.ZipFile, root: str):
        super().__init__(file)
        self._archive, self._root = archive, root
        self._storages: dict[str, tuple[np.ndarray, str]] = {}

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self._rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return self._rebuild_parameter
        if module == "torch" and name in STORAGES:
            return STORAGES[name]  # a plain string: calling it fails, it only tags a storage
        raise UnsafePickle(f"refusing to load {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafePickle(f"unexpected persistent id {pid!r:.80}")
        _, dtype, key, _location, numel = pid
        if dtype not in STORAGES.values() or not isinstance(key, str) or not isinstance(numel, int):
            raise UnsafePickle(f"unexpected storage record {pid!r:.80}")
        if key not in self._storages:
            name = f"{self._root}/data/{key}"
            try:
                raw = self._archive.read(name)
            except KeyError:
                raise UnsafePickle(f"storage {name} is missing from the archive") from None
            np_dtype = np.uint16 if dtype == "bfloat16" else np.dtype(dtype)
            if len(raw) < numel * np.dtype(np_dtype).itemsize:
                raise UnsafePickle(f"storage {name} is truncated")
            self._storages[key] = (np.frombuffer(raw, np_dtype, count=numel), dtype)
        return self._storages[key]

    def _rebuild_tensor(self, storage, offset, size, stride, requires_grad, hooks, metadata=None):
        data, dtype = storage
        if not (
            isinstance(data, np.ndarray)
            and isinstance(offset, int)
            and isinstance(size, tuple)
            and isinstance(stride, tuple)
            and len(size) == len(stride)
            and all(isinstance(n, int) and n >= 0 for n in size + stride)
            and offset >= 0
        ):
            raise UnsafePickle("malformed tensor record")
        if (
            0 not in size
            and offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) >= data.size
        ):
            raise UnsafePickle("tensor record reaches past its storage")
        item = data.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[offset:] if 0 not in size else data[:0],
            shape=size,
            strides=tuple(s * item for s in stride),
            writeable=False,
        )
        return _Tensor(np.array(view), dtype)  # a contiguous copy

    def _rebuild_parameter(self, data, requires_grad, hooks):
        if not isinstance(data, _Tensor):
            raise UnsafePickle("malformed parameter record")
        return data


def _to_mx(t: np.ndarray) -> mx.array:
    import mlx.core as mx

    from finetune.core.dtypes import BF16

    if t.dtype == BF16:
        return mx.array(t.view(np.uint16)).view(mx.bfloat16)
    return mx.array(t)


def read_torch_bin(path: str | Path) -> Result[dict[str, mx.array], str]:
    """The tensors of a `torch.save`d state dict (zip format) as MLX arrays, or a one-line reason."""
    return read_torch_bin_numpy(path).map(lambda state: {k: _to_mx(v) for k, v in state.items()})


def read_torch_bin_numpy(path: str | Path) -> Result[dict[str, np.ndarray], str]:
    """The tensors of a `torch.save`d state dict (zip format) as NumPy arrays (bfloat16 as
    `core.dtypes.BF16`), or a one-line reason it was refused."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        return Failure(
            f"{path}: not a zip-format torch checkpoint (legacy or corrupt .bin files are not "
            "supported; convert it to safetensors)"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [
                n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1
            ]
            if len(pickles) != 1:
                return Failure(f"{path}: not a torch checkpoint (no single data.pkl inside)")
            root = pickles[0].split("/")[0]
            order = f"{root}/byteorder"  # absent in files older than torch 1.10: little-endian
            if order in archive.namelist() and archive.read(order).strip() != b"little":
                return Failure(f"{path}: big-endian torch checkpoints are not supported")
            state = _Unpickler(io.BytesIO(archive.read(pickles[0])), archive, root).load()
    except UnsafePickle as err:
        return Failure(f"{path}: refused: {err} (only plain tensor state dicts are read)")
    except Exception as err:  # a damaged pickle can fail in many ways; none of them runs code
        return Failure(f"{path}: corrupt torch checkpoint ({type(err).__name__}: {err})")
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, _Tensor) for k, v in state.items()
    ):
        return Failure(f"{path}: not a state dict of named tensors")
    from finetune.core.dtypes import BF16

    return Success({k: v.data.view(BF16) if v.dtype == "bfloat16" else v.data for k, v in state.items()})
