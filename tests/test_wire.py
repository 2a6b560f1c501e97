"""The by-value format: everything the suites need crosses intact, and a payload
built by a hostile student decodes to plain data or to an error, never to code."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from coursekit import wire


def roundtrip(value):
    return wire.loads(wire.dumps(value))


@pytest.mark.parametrize("dtype", list(wire.DTYPES.values()))
def test_tensors_of_every_dtype_roundtrip_exactly(dtype):
    source = (torch.randn(2, 3, 4) * 10).to(dtype)
    back = roundtrip(source)
    assert back.dtype == dtype and back.shape == source.shape
    assert torch.equal(back, source)


@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (1,), (2, 1, 3)])
def test_odd_shapes_roundtrip(shape):
    source = torch.ones(shape)
    back = roundtrip(source)
    assert back.shape == source.shape and torch.equal(back, source)


def test_non_contiguous_and_subclassed_tensors_become_plain_tensors():
    base = torch.arange(12.0).reshape(3, 4)
    assert torch.equal(roundtrip(base.t()), base.t())
    param = torch.nn.Parameter(torch.ones(2))
    back = roundtrip(param)
    assert type(back) is torch.Tensor and not back.requires_grad


def test_containers_and_scalars_roundtrip():
    value = {"a": (1, 2.5, None, True), 3: [b"\x00\xff", "text"], (1, "x"): {1, 2},
             "inf": float("inf"), "dtype": torch.float64, "device": torch.device("cpu")}
    back = roundtrip(value)
    assert back["a"] == (1, 2.5, None, True) and back[3] == [b"\x00\xff", "text"]
    assert back[(1, "x")] == {1, 2} and math.isinf(back["inf"])
    assert back["dtype"] is torch.float64 and back["device"] == torch.device("cpu")
    assert math.isnan(roundtrip(float("nan")))


def test_numpy_values_arrive_as_torch_and_python_values():
    assert torch.equal(roundtrip(np.arange(4, dtype=np.int32)), torch.arange(4, dtype=torch.int32))
    assert roundtrip(np.float32(1.5)) == 1.5 and type(roundtrip(np.int64(3))) is int


def test_requires_grad_is_kept_only_when_asked():
    text = wire.dumps(torch.ones(2, requires_grad=True))
    assert not wire.loads(text).requires_grad
    assert wire.loads(text, grad=True).requires_grad


def test_objects_that_are_not_data_do_not_cross_without_a_handle():
    class Sneaky:
        def __reduce__(self):
            return (print, ("pwned",))

    with pytest.raises(wire.WireError):
        wire.dumps(Sneaky())
    record = wire.encode(Sneaky(), lambda obj: {wire.TAG: "handle", "id": 7})
    assert record == {wire.TAG: "handle", "id": 7}


def _tensor_record(**overrides):
    record = json.loads(wire.dumps(torch.ones(2, 2)))
    record.update(overrides)
    return json.dumps(record)


@pytest.mark.parametrize("payload,reason", [
    ("not json", "well-formed JSON"),
    (json.dumps({wire.TAG: "pickle", "v": "gASVAAAA"}), "unknown record type"),
    (json.dumps({"no_tag": 1}), "unexpected dict"),
    (_tensor_record(shape=[3, 3]), "need"),
    (_tensor_record(dtype="object"), "bad tensor record"),
    (_tensor_record(data="!!!notbase64"), "bad base64"),
    (_tensor_record(shape=[-1]), "bad tensor record"),
    (json.dumps({wire.TAG: "dict", "v": [[[1, 2], 3]]}), "cannot be a dict key"),
    (json.dumps({wire.TAG: "handle", "id": 1}), "handle is not expected"),
    (json.dumps({wire.TAG: "dtype", "v": "__import__"}), "unknown dtype"),
    ("[" * 100 + "]" * 100, "nested deeper"),
])
def test_hostile_payloads_are_rejected(payload, reason):
    with pytest.raises(wire.WireError, match=reason):
        wire.loads(payload)


def test_self_referencing_values_are_refused():
    loop = []
    loop.append(loop)
    with pytest.raises(wire.WireError, match="nested deeper"):
        wire.dumps(loop)
