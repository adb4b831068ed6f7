"""Rules the binding reads from the C++ library instead of restating: dtype names, error names."""

import pytest

import embstore
from embstore import _embstore
from embstore._errors import from_code


def test_dtype_aliases_come_from_the_cpp_table(tmp_path):
    aliases = _embstore.dtype_aliases()
    assert set(aliases.values()) == set(embstore.DTYPES)
    assert aliases["bf16"] == "bfloat16" and aliases["f4"] == "float32"
    for name in ("float", "double"):  # ambiguous between C (32/64 bits) and numpy (64 bits)
        assert name not in aliases
        with pytest.raises(ValueError, match="unknown dtype"):
            embstore.create(tmp_path / name, dim=4, dtype=name)
    embstore.create(tmp_path / "s", dim=4, dtype="BF16")
    assert embstore.info(tmp_path / "s")["dtype"] == "bfloat16"


def test_error_code_names_come_from_the_cpp_table():
    for code in range(1, 13):
        assert from_code(code, "m").code == _embstore.error_code_name(code)
    assert from_code(1, "m").code == "invalid_argument"
    assert from_code(4, "m").code == "corruption"
