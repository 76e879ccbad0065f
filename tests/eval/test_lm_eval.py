"""lm-eval's ``local-completions`` model against the running server: a tiny custom task (tests/eval/lm_eval_tasks)
whose synthetic documents have the greedy answer of m1jax.generate as target for half of them and a wrong target for
the others. The exact-match score lm-eval reports must equal the one m1jax.generate's answers give (0.5).

lm-eval needs torch; it runs from the transformers reference environment (Python 3.11, CPU torch), which
scripts/setup_parity_env.sh builds with lm-eval in it.
"""
import glob
import json
import os
import subprocess
from pathlib import Path

import numpy as np

from m1jax.serve.loading import load_served_model
from tests.parity import hf_runner as hr
from tests.serve import server_harness as h

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
EVAL_MARKER, EVAL_PINS = ".m1jax-lm-eval-ok", "lm-eval[api]==0.4.13"  # as scripts/setup_parity_env.sh writes them
MAX_GEN_TOKS = 6  # as the task's generation_kwargs


def lm_eval_python() -> str:
    """The parity interpreter with lm-eval installed (the setup script adds it to an older parity venv)."""
    python = hr.parity_python()
    if os.environ.get("M1JAX_PARITY_PYTHON"):
        return python
    venv = Path(python).parent.parent
    marker = venv / EVAL_MARKER
    if not (marker.exists() and marker.read_text().strip() == EVAL_PINS):
        proc = subprocess.run(["bash", str(hr.SETUP_SCRIPT), str(venv)], capture_output=True, text=True,
                              timeout=1800, env=hr._clean_env())
        assert proc.returncode == 0, proc.stderr[-3000:]
    return python


def words(ids):
    return " ".join(h.WORDS[i] for i in ids if i >= len(h.SPECIALS))


def test_lm_eval_local_completions_scores_as_generate(tmp_path):
    python = lm_eval_python()
    checkpoint = h.write_checkpoint(tmp_path / "ckpt", seed=3)
    source = load_served_model(hf_checkpoint=checkpoint)
    rng = np.random.default_rng(0)
    content = h.WORDS[len(h.SPECIALS) + len(h.TEMPLATE_WORDS):]
    prompts = [" ".join(rng.choice(content, rng.integers(3, 11))) for _ in range(8)]
    with h.serving(source, "tiny-m1") as (server, engine, _):
        answers = [words(h.greedy(engine.split, source.text.encode(p), MAX_GEN_TOKS, stop_ids=[h.EOS_ID])[0])
                   for p in prompts]
        targets = [a if i % 2 == 0 else "w0 " + a for i, a in enumerate(answers)]
        docs = tmp_path / "docs.jsonl"
        docs.write_text("".join(json.dumps({"prompt": p, "target": t}) + "\n" for p, t in zip(prompts, targets)))
        model_args = ",".join([f"base_url={server.url}/v1/completions", "model=tiny-m1",
                               "tokenizer_backend=huggingface", f"tokenizer={checkpoint}", "tokenized_requests=True",
                               f"max_length={h.MAX_POSITIONS}", "num_concurrent=2", "max_retries=1", "timeout=600"])
        env = {**hr._clean_env(), "HF_DATASETS_OFFLINE": "1", "OPENAI_API_KEY": "none"}
        proc = subprocess.run(
            [python, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", model_args,
             "--tasks", "m1jax_smoke", "--include_path", str(TASKS_DIR), "--batch_size", "1",
             "--metadata", json.dumps({"docs_path": str(docs)}), "--output_path", str(tmp_path / "out")],
            cwd=tmp_path, capture_output=True, text=True, timeout=1200, env=env)
        assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
        stats = h.wait_idle(engine)
    (results_file,) = glob.glob(str(tmp_path / "out" / "**" / "results_*.json"), recursive=True)
    reported = json.loads(Path(results_file).read_text())["results"]["m1jax_smoke"]["exact,none"]
    expected = float(np.mean([a == t for a, t in zip(answers, targets)]))
    assert reported == expected == 0.5
    assert stats["finished_requests"] == len(prompts)  # one request per document, all answered
