"""Weights out of a TorchScript archive (e.g. OpenAI's `ViT-L-14-336px.pt`) without running it.

`torch.load(weights_only=True)` refuses such archives, and `torch.jit.load` compiles and runs the
code stored in them. The tensors themselves are plain records: `<root>/data.pkl` pickles the module
tree (one `__torch__.*` object per module, its attributes in a dict, tensors as
`torch._utils._rebuild_tensor_v2` over storages kept as `<root>/data/<key>`), and
`<root>/code/__torch__/...py` lists which attributes are parameters and buffers. We unpickle
data.pkl with an allow-list (module records, tensors, storages, lists, OrderedDict) and read the two
lists as text, so the result is what `torch.jit.load(path).state_dict()` returns.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import re
import zipfile

import torch

from models.backbones.base import BackboneError

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


def convert_hint(path) -> str:
    return (f"convert it once on a machine where you trust the file: python -c \"import torch; torch.save("
            f"torch.jit.load('{path}', map_location='cpu').state_dict(), 'weights.pt')\" and pass weights.pt")


def _archive_root(names: list[str]) -> str | None:
    roots = [n[:-len("/data.pkl")] for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    return roots[0] if len(roots) == 1 else None


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """A zip whose root holds data.pkl and TorchScript's constants.pkl or code/ (torch.save zips
    have neither)."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except OSError:
        return False
    root = _archive_root(names)
    return root is not None and (f"{root}/constants.pkl" in names or any(n.startswith(f"{root}/code/") for n in names))


class _Record:
    """Stands for one scripted module (or script class) object: only its attributes are kept."""
    qualname = ""

    def __setstate__(self, state):
        self.state = state


_RECORD_CLASSES: dict[str, type] = {}


def _record_class(qualname: str) -> type:
    if qualname not in _RECORD_CLASSES:
        _RECORD_CLASSES[qualname] = type(qualname.rsplit(".", 1)[-1], (_Record,), {"qualname": qualname})
    return _RECORD_CLASSES[qualname]


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    """torch._utils._rebuild_tensor_v2 (and _rebuild_tensor) on our (bytes, dtype) storages; the
    extra arguments (requires_grad, hooks, metadata) do not matter for a state dict."""
    data, dtype = storage
    return torch.empty((0,), dtype=dtype).set_(data, storage_offset, tuple(size), tuple(stride))


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.jit._pickle", "build_intlist"): list,
    ("torch.jit._pickle", "build_doublelist"): list,
    ("torch.jit._pickle", "build_boollist"): list,
    ("torch.jit._pickle", "build_tensorlist"): list,
    ("torch.jit._pickle", "restore_type_tag"): lambda value, _type: value,
    ("torch", "device"): torch.device,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, zf: zipfile.ZipFile, root: str):
        super().__init__(io.BytesIO(zf.read(f"{root}/data.pkl")))
        self.zf, self.root = zf, root
        self.storages: dict[str, tuple] = {}

    def find_class(self, module, name):
        if module == "__torch__" or module.startswith("__torch__."):
            return _record_class(f"{module}.{name}")
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which is neither a tensor nor a module record")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unexpected persistent record {pid!r}")
        key = str(pid[2])
        if key not in self.storages:
            raw = bytearray(self.zf.read(f"{self.root}/data/{key}"))
            data = torch.frombuffer(raw, dtype=torch.uint8).untyped_storage() if raw else torch.UntypedStorage(0)
            self.storages[key] = (data, pid[1].dtype)
        return self.storages[key]


_CLASS_RE = re.compile(r"^class (\w+)\(Module\):\n((?:  .*\n?)*)", re.M)
_LIST_RE = re.compile(r"^  (__parameters__|__buffers__) = \[(.*)\]", re.M)


def _layouts(zf: zipfile.ZipFile, root: str, qualnames: set[str]) -> dict[str, set[str] | None]:
    """qualname -> names of its parameters and buffers, from the archive's code (None: not listed)."""
    out: dict[str, set[str] | None] = {}
    texts: dict[str, str | None] = {}
    for q in qualnames:
        module, name = q.rsplit(".", 1)
        path = f"{root}/code/{module.replace('.', '/')}.py"
        if path not in texts:
            texts[path] = zf.read(path).decode("utf-8") if path in zf.namelist() else None
        out[q] = None
        for m in _CLASS_RE.finditer(texts[path] or ""):
            if m.group(1) == name:
                out[q] = {n for _, items in _LIST_RE.findall(m.group(2)) for n in re.findall(r'"([^"]+)"', items)}
    return out


def _walk(obj, prefix: str = ""):
    yield prefix, obj
    for name, value in (obj.state.items() if isinstance(getattr(obj, "state", None), dict) else ()):
        if isinstance(value, _Record):
            yield from _walk(value, f"{prefix}{name}.")


def read_torchscript_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript archive, by dotted name, without executing it."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            root = _archive_root(names)
            if root is None:
                raise ValueError("no single <root>/data.pkl record")
            order = zf.read(f"{root}/byteorder").decode().strip() if f"{root}/byteorder" in names else "little"
            if order != "little":
                raise ValueError(f"its tensors are stored {order}-endian")
            top = _Unpickler(zf, root).load()
            if not isinstance(top, _Record):
                raise ValueError("its data.pkl does not hold a module")
            modules = list(_walk(top))
            layouts = _layouts(zf, root, {type(m).qualname for _, m in modules})
    except (OSError, KeyError, ValueError, EOFError, pickle.UnpicklingError, RuntimeError, UnicodeDecodeError) as e:
        raise BackboneError(f"{path} is a TorchScript archive (a scripted model, such as OpenAI's CLIP .pt files), "
                            f"and its weights could not be read without running its code: {e}; "
                            f"{convert_hint(path)}") from e
    state = {}
    for prefix, module in modules:
        listed = layouts[type(module).qualname]
        for name, value in module.state.items():
            # no code for the class: every tensor attribute (a superset of its parameters and buffers)
            if isinstance(value, torch.Tensor) and (listed is None or name in listed):
                state[prefix + name] = value
    return state
