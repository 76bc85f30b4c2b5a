from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from normmatters.experiments.cifar_pickle import ALLOWED_GLOBALS, RefusedGlobalError, load_cifar_pickle


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_plain_batch_roundtrip(tmp_path):
    batch = {b"data": np.arange(6, dtype=np.uint8).reshape(2, 3), b"labels": [3, 4], b"filenames": [b"a", b"b"],
             "batch_label": "x", b"n": 1.5}
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        (tmp_path / "b").write_bytes(pickle.dumps(batch, protocol=protocol))
        out = load_cifar_pickle(tmp_path / "b")
        assert np.array_equal(out[b"data"], batch[b"data"]) and out[b"labels"] == [3, 4]
        assert out[b"filenames"] == [b"a", b"b"] and out["batch_label"] == "x"


def test_foreign_global_refused_before_it_runs(tmp_path):
    marker = tmp_path / "PWNED"
    (tmp_path / "b").write_bytes(pickle.dumps({b"data": np.zeros(3), b"x": _System(marker)}))
    with pytest.raises(RefusedGlobalError, match=r"names (posix|nt)\.system") as e:
        load_cifar_pickle(tmp_path / "b")
    assert not marker.exists() and e.value.name == "system"


def test_codecs_encode_only_latin1(tmp_path):
    # a hand-written protocol-2 pickle calling _codecs.encode with another codec
    payload = b"\x80\x02c_codecs\nencode\nq\x00X\x03\x00\x00\x00abcX\x06\x00\x00\x00base64\x86R."
    (tmp_path / "b").write_bytes(payload)
    with pytest.raises(RefusedGlobalError, match="base64"):
        load_cifar_pickle(tmp_path / "b")


def test_allowed_set_is_small():
    assert {m for m, _ in ALLOWED_GLOBALS} <= {"numpy", "numpy.core.multiarray", "numpy._core.multiarray",
                                               "numpy.core.numeric", "numpy._core.numeric", "_codecs"}
