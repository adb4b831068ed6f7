"""bench/compare/compare_py.py at a tiny size: embstore's lookup cells are filled, and a lookup that
returns the wrong row fails the run instead of being timed."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

_COMPARE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench",
                        "compare")
_ARGS = ["--rows", "3000", "--dim", "24", "--batch", "256", "--lookups", "2000"]


def test_embstore_lookup_cells_filled(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(_COMPARE, "compare_py.py"), "--system",
                          "embstore-py", "--dir", str(tmp_path)] + _ARGS,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["system"] == "embstore-py"
    assert result["lookup_p50_us"] > 0
    assert result["lookup_p99_us"] >= result["lookup_p50_us"]
    assert result["lookup_note"] == "by (key, epoch) through the key index"
    assert result["two_writer_mb_s"] not in ("failed", None)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("system", ["embstore-py", "numpy", "h5py"])
def test_rows_of_any_width_are_scanned_and_checked(tmp_path, system):
    # 25 float32 are 100 bytes a row: a row ends inside a 64-bit word of the scan's sum.
    out = subprocess.run([sys.executable, os.path.join(_COMPARE, "compare_py.py"), "--system",
                          system, "--dir", str(tmp_path), "--rows", "1001", "--dim", "25",
                          "--batch", "100", "--lookups", "100"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["scan_mb_s"] > 0


def test_a_wrong_scan_fails_the_run(compare_py, monkeypatch, tmp_path):
    real_scan = compare_py.EmbstorePy.scan

    def one_off(self):
        total, nbytes = real_scan(self)
        return total + 1, nbytes
    monkeypatch.setattr(compare_py.EmbstorePy, "scan", one_off)
    assert "scan of" in _run(compare_py, monkeypatch, tmp_path)


@pytest.fixture
def compare_py(monkeypatch):
    monkeypatch.syspath_prepend(_COMPARE)
    import compare_py
    return compare_py


def _run(compare_py, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["compare_py.py", "--system", "embstore-py", "--dir",
                                      str(tmp_path)] + _ARGS)
    with pytest.raises(SystemExit) as e:
        compare_py.main()
    return str(e.value)


def test_wrong_payload_fails_the_run(compare_py, monkeypatch, tmp_path):
    def next_row(self, row, key):  # The next row's vector: another pool row, so other values.
        return np.array(self.r.vectors[(row + 1) % len(self.r.vectors)])
    monkeypatch.setattr(compare_py.EmbstorePy, "lookup", next_row)
    assert "returned another row's payload" in _run(compare_py, monkeypatch, tmp_path)


def test_find_of_another_row_fails_the_run(compare_py, monkeypatch, tmp_path):
    import embstore
    real_find = embstore.Reader.find

    def off_by_one(self, key, epoch=None):
        return real_find(self, key, epoch) + 1
    monkeypatch.setattr(embstore.Reader, "find", off_by_one)
    message = _run(compare_py, monkeypatch, tmp_path)
    assert "embstore find(" in message and "expected row" in message
