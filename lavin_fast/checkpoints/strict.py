"""Strict state-dict loading with errors that name every problem at once, and the safe reading
of torch files that every checkpoint format here shares: `torch_load` (weights_only) for
`torch.save` files, `torchscript_tensors` for TorchScript archives, which it reads without
running them.

`torch.nn.Module.load_state_dict(strict=True)` already refuses missing and unexpected keys, but
stops at the first shape mismatch and names the module, not the file. Here every missing,
unexpected and mis-shaped key is listed together with the checkpoint it came from.
"""
from __future__ import annotations

import json
import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch
from safetensors import safe_open
from torch import Tensor, nn

from lavin_fast.errors import UserError


class CheckpointError(UserError):
    """A checkpoint that does not match the model it is loaded into."""


def check_state_dict(expected: Mapping[str, Tensor], found: Mapping[str, Tensor], source: str) -> None:
    """Raise CheckpointError naming missing, unexpected and mis-shaped keys of `found`."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(
        f"{key}: checkpoint {tuple(found[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in set(expected) & set(found)
        if tuple(found[key].shape) != tuple(expected[key].shape)
    )
    problems = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("mismatched shapes", mismatched)):
        if items:
            shown = ", ".join(items[:20]) + (f", ... ({len(items) - 20} more)" if len(items) > 20 else "")
            problems.append(f"{title} ({len(items)}): {shown}")
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems))


def load_strict(module: nn.Module, state_dict: Mapping[str, Tensor], source: str, assign: bool = True) -> None:
    """Check `state_dict` against `module` (every key, every shape) and load it.

    assign=True keeps the checkpoint's tensors (mmap-backed ones included) instead of copying
    them into freshly allocated parameters, so a model built on the meta device is materialised
    without a second full copy in memory.
    """
    check_state_dict(module.state_dict(), state_dict, source)
    module.load_state_dict(state_dict, strict=True, assign=assign)


def torch_load(path: Path) -> object:
    """`torch.load(weights_only=True)` on the CPU, memory-mapped when the file is in the zip
    format (torch >= 1.6); files in the older pickle format cannot be mapped and are read whole.
    Callers wrap failures in a message about what the file should have been."""
    if zipfile.is_zipfile(path):
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    return torch.load(path, map_location="cpu", weights_only=True)


def flat_state_dict(state: object, source: str) -> dict[str, Tensor]:
    """`state` as a {name: tensor} dict, or a CheckpointError saying what it is instead."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source} holds a {type(state).__name__}, not a state dict")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise CheckpointError(f"{source} is not a flat state dict: key {key!r} holds a {type(value).__name__}")
    return dict(state)


def check_floating(dtypes: Mapping[str, torch.dtype | str], source: str) -> None:
    """CheckpointError naming every tensor whose dtype is not floating point: weights stored as
    integers or booleans would be converted into other numbers silently, or fail deep inside a
    forward. dtypes: name -> a torch dtype, or a safetensors dtype name ("BF16", "I64")."""
    wrong = [f"{name} ({dtype})" for name, dtype in dtypes.items()
             if not (dtype.is_floating_point if isinstance(dtype, torch.dtype) else dtype.startswith(("F", "BF")))]
    if wrong:
        shown = ", ".join(wrong[:20]) + (f", ... ({len(wrong) - 20} more)" if len(wrong) > 20 else "")
        raise CheckpointError(f"{source}: weights are not floating point: {shown}")


def read_json(file: Path) -> dict:
    """A JSON object from `file`, or a CheckpointError naming the file."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{file} is not readable JSON: {error}") from error
    if not isinstance(value, dict):
        raise CheckpointError(f"{file} holds a {type(value).__name__}, not a JSON object")
    return value


def open_safetensors(file: Path) -> safe_open:
    """`safetensors.safe_open` on the CPU (memory-mapped, tensors read on demand), or a
    CheckpointError naming the file (truncated, not safetensors)."""
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as error:  # noqa: BLE001 - SafetensorError, OSError: both mean the same to a user
        raise CheckpointError(f"{file} is not a readable safetensors file: {error}") from error


# ---- TorchScript archives, read without running them -----------------------------------------------
#
# A `torch.jit.save` zip holds <folder>/data.pkl, a pickle of the module tree: every module an
# instance of a class `__torch__.<qualified name>` whose code is in <folder>/code/, its state a
# dict of attributes (parameters and buffers as tensors, submodules, plain values), or whatever
# the class's own `__getstate__` returned. A tensor is `torch._utils._rebuild_tensor_v2(storage,
# offset, size, stride, ...)`, its storage a persistent id ("storage", torch.<Type>Storage, key,
# location, numel) whose bytes are the zip entry <folder>/data/<key>. torch.jit.load compiles the
# code and runs each class's `__setstate__`, which is code from the file; here the classes are
# inert records of their state, and nothing but building tensors is resolved.

# Storage classes as the pickle names them -> the dtype of their elements.
_STORAGE_DTYPES = {
    "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16, "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
# The TorchScript pickler tags lists and dicts with their static type through
# torch.jit._pickle.restore_type_tag (older archives: these build_* lists); for Python they return
# the value unchanged, and so do the stand-ins here.
_TYPE_TAGS = {"build_intlist", "build_tensorlist", "build_doublelist", "build_boollist"}


@dataclass(frozen=True)
class _Storage:
    """A storage of the archive: the entry data/<key>, `numel` elements of `dtype`."""

    key: str
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class _ArchivedTensor:
    """A tensor of the archive, not read yet: a strided view of one storage."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(frozen=True)
class _StorageType:
    """What the pickle's torch.<Type>Storage resolves to: its dtype, nothing callable."""

    dtype: torch.dtype


class _ScriptObject:
    """An instance of a TorchScript class of the archive: it keeps the state it is given and runs
    nothing (`torch_type` is the class's qualified name)."""

    torch_type = ""

    def __setstate__(self, state: object) -> None:
        self.state = state


def _rebuild_tensor(storage: object, offset: object, size: object, stride: object, *_flags: object) -> _ArchivedTensor:
    if not isinstance(storage, _Storage) or not isinstance(offset, int) or not all(
            isinstance(n, int) for n in (*size, *stride)) or len(size) != len(stride):
        raise pickle.UnpicklingError(f"a tensor with storage {storage!r}, offset {offset!r}, size {size!r}, "
                                     f"stride {stride!r}")
    return _ArchivedTensor(storage, offset, tuple(size), tuple(stride))


def _restore_type_tag(value: object, _type: str) -> object:
    return value


def _same_list(value: object) -> object:
    return value


class _ArchiveUnpickler(pickle.Unpickler):
    """Resolves torch's tensor rebuilding, OrderedDict, the storage types and the type tags;
    every `__torch__.*` class becomes an inert `_ScriptObject` subclass; anything else is refused."""

    def __init__(self, file: IO[bytes]) -> None:
        super().__init__(file)
        self.classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> object:
        if module == "__torch__" or module.startswith("__torch__."):
            qualified = f"{module}.{name}"
            if qualified not in self.classes:
                self.classes[qualified] = type(name, (_ScriptObject,), {"torch_type": qualified})
            return self.classes[qualified]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch.jit._pickle" and name in _TYPE_TAGS:
            return _same_list
        if (module, name) == ("torch.jit._pickle", "restore_type_tag"):
            return _restore_type_tag
        raise pickle.UnpicklingError(f"it needs {module}.{name}, which a file of weights does not")

    def persistent_load(self, pid: object) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
                and isinstance(pid[2], str) and isinstance(pid[4], int) and pid[4] >= 0):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        return _Storage(pid[2], pid[1].dtype, pid[4])


def is_torchscript_archive(path: Path) -> bool:
    """A zip written by torch.jit.save (it has <folder>/constants.pkl), which weights_only refuses."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def torchscript_tensors(path: Path, module: str, source: str) -> dict[str, Tensor]:
    """The tensors held by the attributes of submodule `module` (e.g. "visual") of a TorchScript
    archive and its submodules, named as its state dict names them ("visual.conv1.weight"),
    read without running anything from the archive (see the notes above). Only these tensors'
    bytes are read. Raises CheckpointError, naming `source`, on anything else: a global beyond
    tensor rebuilding, a module on the way that keeps its state through its own `__getstate__`
    (it cannot be read without running its code), a storage that does not fit its tensors."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if re.fullmatch(r"[^/]+/data\.pkl", name)]
            if len(pickles) != 1:
                raise CheckpointError(f"{source} is a zip with {len(pickles)} <folder>/data.pkl records, "
                                      "not one TorchScript archive")
            folder = pickles[0].removesuffix("/data.pkl")
            order = f"{folder}/byteorder"
            if order in archive.namelist() and archive.read(order).strip() != b"little":
                raise CheckpointError(f"{source}: a big-endian TorchScript archive is not supported")
            with archive.open(pickles[0]) as file:
                root = _ArchiveUnpickler(file).load()
            found = _module_tensors(root, module, source)
            storages = {record.storage for record in found.values()}
            data = {storage: _read_storage(archive, f"{folder}/data/{storage.key}", storage, source)
                    for storage in storages}
    except CheckpointError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever a damaged or hostile file raises, one message
        raise CheckpointError(f"{source} cannot be read as a TorchScript archive of weights: {error}") from error
    tensors = {}
    for name, record in found.items():
        try:
            tensors[name] = data[record.storage].as_strided(record.size, record.stride, record.offset)
        except RuntimeError as error:
            raise CheckpointError(f"{source}: {name} does not fit its storage: {error}") from error
    return tensors


def _module_tensors(root: object, module: str, source: str) -> dict[str, _ArchivedTensor]:
    """Tensors reachable through attributes from the submodule at dotted path `module`."""
    node: object = root
    for part in module.split("."):
        node = _attributes(node, "", source).get(part)
        if not isinstance(node, _ScriptObject):
            raise CheckpointError(f"{source} is a TorchScript archive without a module {module!r}")
    found: dict[str, _ArchivedTensor] = {}
    pending, seen = [(module, node)], set()
    while pending:
        name, record = pending.pop()
        if id(record) in seen:  # a module tree has none; a crafted pickle could loop or fan out
            raise CheckpointError(f"{source}: module {name} is reached twice (a module in two places)")
        seen.add(id(record))
        for attribute, value in _attributes(record, name, source).items():
            if isinstance(value, _ArchivedTensor):
                found[f"{name}.{attribute}"] = value
            elif isinstance(value, _ScriptObject):
                pending.append((f"{name}.{attribute}", value))
    return found


def _attributes(record: object, name: str, source: str) -> dict[str, object]:
    if not isinstance(record, _ScriptObject):
        raise CheckpointError(f"{source}: {name or 'the archive'} holds a {type(record).__name__}, not a module")
    state = getattr(record, "state", None)
    if not isinstance(state, dict) or not all(isinstance(key, str) for key in state):
        raise CheckpointError(f"{source}: module {name or '(root)'} ({record.torch_type}) keeps its state through "
                              "its own __getstate__, which cannot be read without running the archive's code")
    return state


def _read_storage(archive: zipfile.ZipFile, entry: str, storage: _Storage, source: str) -> Tensor:
    """The storage's elements, a 1-d tensor of its dtype, read into memory allocated here."""
    nbytes = storage.numel * storage.dtype.itemsize
    size = archive.getinfo(entry).file_size
    if size != nbytes:
        raise CheckpointError(f"{source}: {entry} holds {size} bytes, its storage {nbytes} "
                              f"({storage.numel} x {storage.dtype})")
    data = torch.empty(nbytes, dtype=torch.uint8)
    with archive.open(entry) as file:
        if file.readinto(memoryview(data.numpy())) != nbytes:
            raise CheckpointError(f"{source}: {entry} is shorter than its {nbytes} bytes")
    return data.view(storage.dtype)
