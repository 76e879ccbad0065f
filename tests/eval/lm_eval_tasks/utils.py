"""Helpers of the m1jax_smoke lm-eval task (loaded by lm-eval from this folder)."""
import json


def load_docs(docs_path=None, **_):
    """The documents: a JSON-lines file of {"prompt", "target"} named by --metadata '{"docs_path": ...}'."""
    import datasets
    if docs_path is None:
        raise ValueError("m1jax_smoke needs --metadata '{\"docs_path\": \"<jsonl file>\"}'")
    with open(docs_path) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}


def process_results(doc, results):
    return {"exact": float(results[0].strip() == doc["target"])}
