"""pytest setup: makes the built package importable and gives each test a store path.

The package is looked up in $EMBSTORE_PYTHONPATH, else on PYTHONPATH, else in ../../build/python
(relative to this directory). Child processes get the same directory on PYTHONPATH.
"""
import os
import sys

import pytest

_here = os.path.dirname(os.path.abspath(__file__))
_dir = os.environ.get("EMBSTORE_PYTHONPATH")
if _dir is None:
    try:
        import embstore  # noqa: F401
        _dir = os.path.dirname(os.path.dirname(os.path.abspath(embstore.__file__)))
    except ImportError:
        _dir = os.path.join(_here, "..", "..", "build", "python")
PACKAGE_DIR = os.path.abspath(_dir)
if PACKAGE_DIR not in sys.path:
    sys.path.insert(0, PACKAGE_DIR)
if _here not in sys.path:
    sys.path.insert(0, _here)
os.environ["PYTHONPATH"] = os.pathsep.join(
    [PACKAGE_DIR, _here] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


@pytest.fixture
def store(tmp_path):
    """A path (str) where a test may create a store."""
    return str(tmp_path / "store")


def point_pair_slot_at(store, key, row):
    """Damages the store's key index (keys.1, src/format/FORMAT.md "keys.K"): the first pair slot
    of `key` is made to name `row` instead (its key and epoch fields stay as they were)."""
    import struct
    with open(os.path.join(store, "keys.1"), "r+b") as f:
        data = f.read()
        pair_slots = struct.unpack_from("<Q", data, 48)[0]
        for i in range(pair_slots):
            slot_key, word = struct.unpack_from("<QQ", data, 4096 + 16 * i)
            if word and slot_key == key:
                f.seek(4096 + 16 * i + 8)
                f.write(struct.pack("<Q", (word & ~((1 << 41) - 1)) | (row + 1)))
                return
    pytest.fail(f"no pair slot of key {key}")
