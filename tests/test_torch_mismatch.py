"""A _C built against another torch is loud: a warning at import naming both versions and the rebuild
command, the same words in ff.explain, and a _C that cannot load says why (with the versions)."""

from __future__ import annotations

import sys

import pytest
import torch

import fusedformer as ff
from fusedformer import _build_info, backends


@pytest.fixture
def clean_state(monkeypatch):
    monkeypatch.setattr(backends, "_MISMATCH", None)
    return monkeypatch


def test_the_build_records_this_torch():
    assert backends._C.built_with_torch() == torch.__version__
    assert _build_info.TORCH_VERSION == torch.__version__
    assert backends._MISMATCH is None


def test_a_loaded_extension_of_another_torch_warns_and_explain_says_so(clean_state):
    clean_state.setattr(backends._C, "built_with_torch", lambda: "1.13.1+cpu")
    with pytest.warns(ff.ExtensionWarning) as record:
        _C, error = backends._load_extension()
    message = str(record[0].message)
    assert "1.13.1+cpu" in message and torch.__version__ in message
    assert _build_info.REBUILD_COMMAND in message
    assert _C is not None and error is None
    q = torch.randn(1, 1, 4, 8)
    text = str(ff.explain(ff.scaled_dot_product_attention, q, q, q))
    assert "WARNING" in text and "1.13.1+cpu" in text and torch.__version__ in text, text


def test_an_extension_that_cannot_load_names_both_versions(clean_state):
    clean_state.setattr(_build_info, "TORCH_VERSION", "1.13.1+cpu")
    clean_state.setitem(sys.modules, "fusedformer._C", None)  # the import fails, as an ABI mismatch would
    clean_state.delattr(ff, "_C")
    with pytest.warns(ff.ExtensionWarning) as record:
        _C, error = backends._load_extension()
    assert _C is None
    for text in (error, str(record[0].message)):
        assert "1.13.1+cpu" in text and torch.__version__ in text and _build_info.REBUILD_COMMAND in text, text
    assert "reference path" in str(record[0].message)
