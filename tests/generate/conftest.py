"""The transformers reference cache fixture, shared with tests/parity."""
from tests.parity.conftest import hf_reference_cache  # noqa: F401
