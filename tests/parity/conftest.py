"""Fixtures for the transformers parity harness (see hf_runner.py)."""
import pytest


@pytest.fixture(scope="session")
def hf_reference_cache(tmp_path_factory):
    """One cache dir per test session: identical reference requests run once and are shared."""
    return tmp_path_factory.mktemp("hf_reference")
