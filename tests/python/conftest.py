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
