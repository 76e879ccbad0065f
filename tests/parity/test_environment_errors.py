"""A missing transformers environment is an error, never a skip: a skipped parity test reports green while checking
nothing, and several modules (the converter, checkpoint restore, generation) are only tested against transformers."""
import re
from pathlib import Path

import pytest

from . import hf_runner as hr

TESTS = Path(__file__).resolve().parent.parent
SKIP = re.compile(r"pytest\.skip\(|importorskip|mark\.skip|mark\.xfail|except\s+\w*\.?ParityEnvError")


def test_unusable_interpreter_raises(monkeypatch, tmp_path):
    monkeypatch.setenv("M1JAX_PARITY_PYTHON", str(tmp_path / "missing-python"))
    request = hr.make_request(hr.tiny_hf_config(), [hr.forward_job("fwd", [[1, 2, 3]])])
    with pytest.raises(hr.ParityEnvError, match="missing-python"):
        hr.run_reference(request, tmp_path / "cache")


def test_missing_venv_raises_when_not_created(monkeypatch, tmp_path):
    monkeypatch.delenv("M1JAX_PARITY_PYTHON", raising=False)
    with pytest.raises(hr.ParityEnvError, match="setup_parity_env.sh"):
        hr.parity_python(tmp_path / "no-venv", create=False)


def test_no_test_using_the_reference_skips_or_swallows_its_errors():
    users = [f for f in TESTS.rglob("*.py") if f.name != "hf_runner.py" and "hf_runner" in f.read_text()]
    assert len(users) >= 4  # parity, generation, converter tests (guards against the search finding nothing)
    offenders = [f"{f.relative_to(TESTS)}: {m.group(0)}" for f in users if f != Path(__file__).resolve()
                 for m in [SKIP.search(f.read_text())] if m]
    assert not offenders, offenders
