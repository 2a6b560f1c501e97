"""The oracle cache: answers the same for every submission, computed once and kept beside the suite."""
from __future__ import annotations

import pytest
import torch

from coursekit.oracle_cache import OracleCache


class Counting:
    def __init__(self, value):
        self.value, self.calls = value, 0

    def __call__(self):
        self.calls += 1
        return self.value


ANSWER = ({3: b"ab", 256: b"\xff\x00"}, [(b"a", b"b")], torch.arange(6, dtype=torch.float32).reshape(2, 3))


def _same(a, b) -> bool:
    return a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2]) and a[2].dtype == b[2].dtype


def test_computed_once_then_read(tmp_path):
    cache, compute = OracleCache(tmp_path / ".cache"), Counting(ANSWER)
    first = cache.get("merges", ["source", b"text", "1000"], compute)
    second = OracleCache(tmp_path / ".cache").get("merges", ["source", b"text", "1000"], compute)
    assert compute.calls == 1
    assert _same(first, ANSWER) and _same(second, ANSWER)
    assert [p.name for p in (tmp_path / ".cache").iterdir()] == [cache.path("merges", ["source", b"text", "1000"]).name]


def test_a_changed_key_part_computes_again(tmp_path):
    cache, compute = OracleCache(tmp_path), Counting(1)
    cache.get("x", ["ab", "c"], compute)
    cache.get("x", ["a", "bc"], compute)      # the same bytes, split differently
    cache.get("x", ["ab", "c", "cuda"], compute)
    cache.get("y", ["ab", "c"], compute)
    assert compute.calls == 4
    cache.get("x", ["ab", "c"], compute)
    assert compute.calls == 4


def test_an_unreadable_file_is_computed_again(tmp_path):
    cache, compute = OracleCache(tmp_path), Counting([1, 2])
    path = cache.path("x", ["k"])
    path.write_text('{"$t": "tensor", "v": "not base64"', encoding="utf-8")
    assert cache.get("x", ["k"], compute) == [1, 2] and compute.calls == 1
    assert cache.get("x", ["k"], compute) == [1, 2] and compute.calls == 1  # rewritten whole
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]      # no partial file left


def test_a_folder_that_cannot_be_written_only_means_computing_every_time(tmp_path):
    (tmp_path / "file").write_text("", encoding="utf-8")
    cache, compute = OracleCache(tmp_path / "file" / ".cache"), Counting(7)
    assert cache.get("x", ["k"], compute) == 7
    assert cache.get("x", ["k"], compute) == 7
    assert compute.calls == 2


def test_a_name_must_be_a_file_name_stem(tmp_path):
    with pytest.raises(ValueError, match="file-name stem"):
        OracleCache(tmp_path).get("../outside", ["k"], Counting(1))
