"""The by-value format in which arguments and results cross between the grader and
the student's process.

Only plain data crosses: JSON scalars and lists, plus tagged objects for tuples,
dicts with non-string keys, sets, bytes, non-finite floats, tensors (raw bytes with
dtype and shape), torch dtypes and devices, and references to objects that stay in
the student's process ("handles"). Decoding builds fresh objects from that data
alone, so nothing the student controls is ever unpickled or executed by the grader.

Both sides use this module: the grader encodes arguments and decodes results; the
runtime inside the student's kernel does the reverse. Each side passes its own
``on_unencodable`` / ``on_handle`` callbacks.
"""
from __future__ import annotations

import binascii
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

# Bound at import, before any student cell runs: a notebook that monkeypatches these
# builtins (or json's functions) cannot change how its own values are encoded.
from builtins import bool, bytes, dict, float, int, isinstance, len, list, str, tuple, type  # noqa: A004
from json import dumps as _json_dumps, loads as _json_loads

TAG = "$t"
MAX_DEPTH = 64
MAX_ITEMS = 1_000_000
MAX_PAYLOAD_BYTES = 1 << 30

DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "float16", "bfloat16", "float32", "float64", "complex64", "complex128",
        "uint8", "int8", "int16", "int32", "int64", "bool",
    )
}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_HASHABLE_KEYS = (str, int, float, bytes, bool, type(None), tuple)
# What a container's items mostly are, and cross as themselves: checked inline, without a call per item.
_AS_IS = frozenset({str, int, bool, type(None)})


class WireError(ValueError):
    """A value that cannot cross, or a payload that is not well formed."""


def dumps(value: Any, on_unencodable: Callable[[Any], dict] | None = None) -> str:
    return _json_dumps(encode(value, on_unencodable), allow_nan=False, separators=(",", ":"))


def loads(text: str | bytes, on_handle: Callable[[dict], Any] | None = None, grad: bool = False) -> Any:
    return decode(parse(text), on_handle, grad)


def parse(text: str | bytes) -> Any:
    """Plain JSON, size-limited: the envelope of a message, before ``decode``."""
    if len(text) > MAX_PAYLOAD_BYTES:
        raise WireError(f"payload of {len(text)} bytes is over the {MAX_PAYLOAD_BYTES}-byte limit")
    try:
        raw = _json_loads(text)
    except (ValueError, RecursionError) as exc:
        raise WireError(f"payload is not well-formed JSON: {exc}") from None
    return raw


# -- encoding -------------------------------------------------------------------


def encode(value: Any, on_unencodable: Callable[[Any], dict] | None = None, _depth: int = 0) -> Any:
    """Turn ``value`` into JSON-ready data. Objects that are not plain data go to
    ``on_unencodable`` (which returns a handle record), or raise ``WireError``."""
    if _depth > MAX_DEPTH:
        raise WireError(f"value is nested deeper than {MAX_DEPTH} levels")
    kind = type(value)
    if value is None or kind is bool or kind is int or kind is str:
        return value
    # The builtin containers first, by exact type: a vocabulary of 50,000 entries is mostly these.
    depth = _depth + 1
    if kind is list:
        return [v if type(v) in _AS_IS else encode(v, on_unencodable, depth) for v in _sized(value)]
    if kind is tuple:
        return {TAG: "tuple", "v": [v if type(v) in _AS_IS else encode(v, on_unencodable, depth) for v in _sized(value)]}
    if kind is dict:
        return {TAG: "dict", "v": [[k if type(k) in _AS_IS else encode(k, on_unencodable, depth),
                                    v if type(v) in _AS_IS else encode(v, on_unencodable, depth)]
                                   for k, v in _sized(value).items()]}
    if kind is bytes or kind is bytearray:
        return {TAG: "bytes", "v": binascii.b2a_base64(value, newline=False).decode("ascii")}
    if kind is float:
        if math.isfinite(value):
            return value
        return {TAG: "float", "v": repr(value)}
    rec = lambda v: encode(v, on_unencodable, depth)  # noqa: E731
    if isinstance(value, torch.Tensor):
        return _encode_tensor(value)
    if isinstance(value, torch.dtype):
        if value not in _DTYPE_NAMES:
            raise WireError(f"dtype {value} cannot cross")
        return {TAG: "dtype", "v": _DTYPE_NAMES[value]}
    if isinstance(value, torch.device):
        return {TAG: "device", "v": str(value)}
    numpy_value = _from_numpy(value)
    if numpy_value is not _NOT_NUMPY:
        return rec(numpy_value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return {TAG: "tuple", "v": [rec(v) for v in _bounded(value)]}
    if isinstance(value, Mapping):
        return {TAG: "dict", "v": [[rec(k), rec(v)] for k, v in _bounded(value.items())]}
    if kind in (set, frozenset):
        return {TAG: "set", "v": [rec(v) for v in _bounded(value)]}
    if isinstance(value, Iterator) and on_unencodable is not None:
        return [rec(v) for v in _bounded(value)]
    if on_unencodable is not None:
        return on_unencodable(value)
    raise WireError(f"a value of type {type(value).__qualname__} cannot cross by value")


def _sized(container):
    """A builtin list, tuple or dict, whose length can be trusted, checked against the limit."""
    if len(container) > MAX_ITEMS:
        raise WireError(f"more than {MAX_ITEMS} items in one container")
    return container


def _bounded(items):
    for i, item in enumerate(items):
        if i >= MAX_ITEMS:
            raise WireError(f"more than {MAX_ITEMS} items in one container")
        yield item


def _encode_tensor(t: torch.Tensor) -> dict:
    if t.dtype not in _DTYPE_NAMES:
        raise WireError(f"tensors of dtype {t.dtype} cannot cross")
    if t.layout != torch.strided:
        t = t.to_dense()
    flat = t.detach().as_subclass(torch.Tensor).cpu().contiguous().reshape(-1)
    raw = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return {
        TAG: "tensor",
        "dtype": _DTYPE_NAMES[t.dtype],
        "shape": list(t.shape),
        "data": binascii.b2a_base64(raw, newline=False).decode("ascii"),
        "device": str(t.device),
        "grad": bool(t.requires_grad),
    }


_NOT_NUMPY = object()


def _from_numpy(value: Any) -> Any:
    """numpy arrays become tensors and numpy scalars Python numbers, without
    importing numpy on a side that never saw it."""
    module = type(value).__module__
    if not module.startswith("numpy"):
        return _NOT_NUMPY
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        arr = np.asarray(value)  # drops masked-array and matrix subclasses
        if arr.dtype == object:
            return arr.tolist()
        return torch.from_numpy(np.ascontiguousarray(arr).copy())
    return _NOT_NUMPY


# -- decoding -------------------------------------------------------------------


def decode(data: Any, on_handle: Callable[[dict], Any] | None = None, grad: bool = False, _depth: int = 0) -> Any:
    """Build fresh objects from ``data``. ``grad``: honour the requires_grad flag of
    tensors (the student's side does, for backward probes; the grader never needs it)."""
    if _depth > MAX_DEPTH:
        raise WireError(f"payload is nested deeper than {MAX_DEPTH} levels")
    kind = type(data)
    if data is None or kind is bool or kind is int or kind is float or kind is str:
        return data
    depth = _depth + 1
    if kind is list:
        return [v if type(v) in _AS_IS else decode(v, on_handle, grad, depth) for v in data]
    if kind is not dict or not isinstance(data.get(TAG), str):
        raise WireError(f"unexpected {type(data).__name__} in payload")
    tag = data[TAG]
    v = data.get("v")
    if tag == "bytes":
        return _b64(v)
    if tag == "tuple":
        return tuple([x if type(x) in _AS_IS else decode(x, on_handle, grad, depth) for x in _list(v)])
    if tag == "dict":
        out = {}
        for pair in _list(v):
            if type(pair) is not list or len(pair) != 2:
                raise WireError("bad dict record")
            k, x = pair
            out[k if type(k) in _AS_IS else _key(decode(k, on_handle, grad, depth))] = (
                x if type(x) in _AS_IS else decode(x, on_handle, grad, depth))
        return out
    if tag == "float":
        if v not in ("nan", "inf", "-inf"):
            raise WireError("bad float record")
        return float(v)
    if tag == "set":
        return {_key(decode(x, on_handle, grad, depth)) for x in _list(v)}
    if tag == "tensor":
        return _decode_tensor(data, grad)
    if tag == "dtype":
        if v not in DTYPES:
            raise WireError(f"unknown dtype {v!r}")
        return DTYPES[v]
    if tag == "device":
        if type(v) is not str or len(v) > 32:
            raise WireError("bad device record")
        return torch.device(v)
    if tag == "handle":
        if on_handle is None:
            raise WireError("a handle is not expected here")
        if type(data.get("id")) is not int:
            raise WireError("bad handle record")
        return on_handle(data)
    raise WireError(f"unknown record type {tag!r}")


def _list(v: Any) -> list:
    if type(v) is not list:
        raise WireError("expected a list in payload")
    return v


def _key(k: Any) -> Any:
    if not isinstance(k, _HASHABLE_KEYS):
        raise WireError(f"a {type(k).__name__} cannot be a dict key or set item")
    return k


def _b64(v: Any) -> bytes:
    if type(v) is not str:
        raise WireError("bad bytes record")
    try:
        return binascii.a2b_base64(v, strict_mode=True)
    except (binascii.Error, ValueError):
        raise WireError("bad base64 in payload") from None


def _decode_tensor(data: dict, grad: bool) -> torch.Tensor:
    dtype = DTYPES.get(data.get("dtype"))
    shape = data.get("shape")
    if dtype is None or type(shape) is not list or not all(type(s) is int and s >= 0 for s in shape):
        raise WireError("bad tensor record")
    raw = _b64(data.get("data"))
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(raw) != numel * itemsize:
        raise WireError(f"tensor data holds {len(raw)} bytes, its shape {shape} and dtype need {numel * itemsize}")
    if numel == 0:
        tensor = torch.empty(shape, dtype=dtype)
    else:
        tensor = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape).clone()
    device = data.get("device", "cpu")
    if type(device) is str and device != "cpu" and torch.cuda.is_available():
        tensor = tensor.to(device)
    if grad and data.get("grad") is True and (tensor.is_floating_point() or tensor.is_complex()):
        tensor.requires_grad_(True)
    return tensor
