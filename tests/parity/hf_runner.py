"""Python-3.12-side driver for the transformers reference (``hf_reference.py``, run under Python 3.11).

No torch here: numpy + subprocess only. Typical use in a test::

    from tests.parity import hf_runner as hr      # or: import hf_runner (tests/parity on sys.path)

    cfg = hr.tiny_hf_config()                       # the tiny reference config, layer_types [lin, lin, lin, full]
    ids = hr.random_ids(2, 11, cfg["vocab_size"], seed=1)
    req = hr.make_request(cfg, [hr.forward_job("fwd", ids), hr.save_job()], seed=0)
    ref = hr.run_reference(req, cache_dir)          # cached per request hash under cache_dir
    logits = ref.array("fwd", "logits")             # float32 [B, T, V]
    sd = ref.state_dict()                           # in-memory HF names -> numpy (buffers included)
    ckpt = ref.checkpoint_dir("minimax_names")      # MiniMax on-disk names + MiniMax-dialect config.json

Interpreter: ``$M1JAX_PARITY_PYTHON`` if set (used as is); else ``<repo>/.venv-parity/bin/python`` if its marker
says the pinned packages are in; else that venv is created by ``scripts/setup_parity_env.sh`` (a Python 3.11 from
PATH / pyenv, then ``pip install torch==2.13.0 transformers==5.24.0 safetensors numpy``). Failure raises
``ParityEnvError`` with the script's message. See ``hf_reference.py`` for the request/job schema and the outputs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
REFERENCE_SCRIPT = HERE / "hf_reference.py"
SETUP_SCRIPT = REPO_ROOT / "scripts" / "setup_parity_env.sh"
DEFAULT_VENV = REPO_ROOT / ".venv-parity"
PINS = "torch==2.13.0 transformers==5.24.0 safetensors numpy"  # keep equal to scripts/setup_parity_env.sh
MARKER = ".m1jax-parity-ok"
M1_ALPHA = 3.5565588200778455  # (2*80)**0.25, DeepNorm alpha of the 80-layer M1


class ParityEnvError(RuntimeError):
    """The Python 3.11 parity environment could not be found or created."""


class ReferenceError(RuntimeError):
    """hf_reference.py failed on a request."""


# ------------------------------------------------------------------------------------------ environment
@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _venv_ready(venv: Path) -> bool:
    py, marker = venv / "bin" / "python", venv / MARKER
    return py.exists() and marker.exists() and marker.read_text().strip() == PINS


def parity_python(venv_dir: str | os.PathLike | None = None, *, create: bool = True, timeout: float = 1800) -> str:
    """Path of the Python 3.11 interpreter with torch/transformers; creates the venv on demand."""
    env_py = os.environ.get("M1JAX_PARITY_PYTHON")
    if env_py:
        if not (os.path.isfile(env_py) and os.access(env_py, os.X_OK)):
            raise ParityEnvError(f"M1JAX_PARITY_PYTHON={env_py!r} is not an executable file")
        return env_py
    venv = Path(venv_dir) if venv_dir is not None else DEFAULT_VENV
    if _venv_ready(venv):
        return str(venv / "bin" / "python")
    if not create:
        raise ParityEnvError(f"parity venv {venv} missing; run scripts/setup_parity_env.sh {venv}")
    # the lock lives outside the repo so that it never shows up as an untracked file
    tag = hashlib.sha1(str(venv.resolve()).encode()).hexdigest()[:12]
    lock = Path(tempfile.gettempdir()) / f"m1jax-parity-venv-{tag}.lock"
    with _file_lock(lock):
        if _venv_ready(venv):  # another process made it while we waited
            return str(venv / "bin" / "python")
        try:
            proc = subprocess.run(["bash", str(SETUP_SCRIPT), str(venv)], capture_output=True, text=True,
                                  timeout=timeout, env=_clean_env())
        except subprocess.TimeoutExpired as e:
            raise ParityEnvError(f"creating the parity venv {venv} timed out after {timeout}s") from e
        if proc.returncode != 0 or not _venv_ready(venv):
            tail = "\n".join((proc.stderr or "").strip().splitlines()[-15:])
            raise ParityEnvError(
                f"could not create the Python 3.11 parity venv at {venv} ({SETUP_SCRIPT.name} exit "
                f"{proc.returncode}).\n{tail}\nSet M1JAX_PARITY_PYTHON to an interpreter with {PINS} to skip this.")
    return str(venv / "bin" / "python")


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "VIRTUAL_ENV", "JAX_", "XLA_"))}
    env.update(PYTHONNOUSERSITE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               HF_HUB_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false", PYTHONHASHSEED="0")
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


# ------------------------------------------------------------------------------------------ configs
def m1_layer_types(num_layers: int, full_every: int | None = None) -> list[str]:
    """M1's hybrid pattern: layer i is softmax ("full_attention") iff i % full_every == full_every - 1.

    ``full_every`` defaults to 8 (M1: 7 lightning + 1 softmax) when num_layers >= 8, else num_layers
    (4 layers -> the tiny pattern [linear, linear, linear, full])."""
    if full_every is None:
        full_every = 8 if num_layers >= 8 else num_layers
    return ["full_attention" if i % full_every == full_every - 1 else "linear_attention" for i in range(num_layers)]


def tiny_hf_config(*, num_layers: int = 4, num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 16,
                   hidden_size: int = 64, intermediate_size: int = 32, num_experts: int = 4, top_k: int = 2,
                   block_size: int = 4, vocab_size: int = 128, layer_types: Sequence[str] | None = None,
                   full_every: int | None = None, rope_theta: float = 1e7, max_position_embeddings: int = 256,
                   alpha: float = M1_ALPHA, beta: float = 1.0, rms_norm_eps: float = 1e-5,
                   output_router_logits: bool = False, router_aux_loss_coef: float = 0.001,
                   **extra: Any) -> dict:
    """transformers ``MiniMaxConfig`` kwargs for a tiny model (defaults: 4 layers [lin, lin, lin, full], H=4, KV=2,
    d=16, E=4, top-2, block 4: the parity tests' base case)."""
    if num_heads & (num_heads - 1):
        raise ValueError("num_heads must be a power of two (HF slopes differ from ALiBi's otherwise)")
    if num_heads % num_kv_heads:
        raise ValueError("num_heads must be a multiple of num_kv_heads")
    lt = list(layer_types) if layer_types is not None else m1_layer_types(num_layers, full_every)
    if len(lt) != num_layers:
        raise ValueError("len(layer_types) != num_layers")
    cfg = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        head_dim=head_dim, num_local_experts=num_experts, num_experts_per_tok=top_k, layer_types=lt,
        block_size=block_size, rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
        max_position_embeddings=max_position_embeddings, rms_norm_eps=rms_norm_eps, hidden_act="silu",
        full_attn_alpha_factor=alpha, linear_attn_alpha_factor=alpha, mlp_alpha_factor=alpha,
        full_attn_beta_factor=beta, linear_attn_beta_factor=beta, mlp_beta_factor=beta,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        output_router_logits=output_router_logits, router_aux_loss_coef=router_aux_loss_coef,
        router_jitter_noise=0.0, sliding_window=None, attention_dropout=0.0,
    )
    cfg.update(extra)
    return cfg


def random_ids(batch: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    return np.random.default_rng(seed).integers(0, vocab_size, (batch, length)).tolist()


# ------------------------------------------------------------------------------------------ requests
def _aslist(x):
    return None if x is None else np.asarray(x).tolist()


def forward_job(name: str, input_ids, *, attention_mask=None, position_ids=None, labels=None,
                output_router_logits: bool = False, output_hidden_states: bool = False,
                param_overrides: list | None = None) -> dict:
    """position_ids: array [B,T], "from_mask", or None (HF default arange)."""
    job = {"name": name, "kind": "forward", "input_ids": _aslist(input_ids),
           "output_router_logits": output_router_logits, "output_hidden_states": output_hidden_states}
    if attention_mask is not None:
        job["attention_mask"] = _aslist(attention_mask)
    if position_ids is not None:
        job["position_ids"] = position_ids if isinstance(position_ids, str) else _aslist(position_ids)
    if labels is not None:
        job["labels"] = _aslist(labels)
    if param_overrides:
        job["param_overrides"] = list(param_overrides)
    return job


def decode_job(name: str, input_ids, prefill: int, *, attention_mask=None, explicit_positions: bool = True) -> dict:
    job = {"name": name, "kind": "decode", "input_ids": _aslist(input_ids), "prefill": int(prefill),
           "explicit_positions": explicit_positions}
    if attention_mask is not None:
        job["attention_mask"] = _aslist(attention_mask)
    return job


def generate_job(name: str, input_ids, max_new_tokens: int, *, attention_mask=None) -> dict:
    job = {"name": name, "kind": "generate", "input_ids": _aslist(input_ids), "max_new_tokens": int(max_new_tokens)}
    if attention_mask is not None:
        job["attention_mask"] = _aslist(attention_mask)
    return job


def save_job(name: str = "save", *, max_shard_size: str = "200KB", minimax_shards: int = 2,
             minimax_dtype: str = "float32") -> dict:
    return {"name": name, "kind": "save", "max_shard_size": max_shard_size, "minimax_shards": minimax_shards,
            "minimax_dtype": minimax_dtype}


def forward_from_checkpoint_job(name: str, checkpoint: str, input_ids, **kw) -> dict:
    job = forward_job(name, input_ids, **kw)
    job.update(kind="forward_from_checkpoint", checkpoint=checkpoint)
    return job


def pretrained_job(name: str, checkpoint: str | os.PathLike, input_ids, *, dtype: str = "float32", **kw) -> dict:
    """Forward of ``MiniMaxForCausalLM.from_pretrained(checkpoint)`` (a directory written outside the reference, e.g.
    by ``m1jax.convert.export_hf``). The files' hash goes into the request, so the cache never serves a stale result
    for rewritten files. Use with ``make_request(None, ...)`` when no model of the reference's own is needed."""
    job = forward_job(name, input_ids, **kw)
    job.update(kind="forward_pretrained", checkpoint=str(Path(checkpoint).resolve()), dtype=dtype,
               checkpoint_digest=directory_digest(checkpoint))
    return job


def directory_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(path).iterdir()):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:20]


def make_request(config: dict | None, jobs: Sequence[dict], *, seed: int = 0, weight_std: float = 0.2,
                 norm_mean: float = 1.0, norm_std: float = 0.1, overrides: list | None = None,
                 attn_implementation: str = "eager", experts_implementation: str = "eager",
                 dump_state_dict: bool = True) -> dict:
    return {
        "config": dict(config) if config is not None else None, "seed": int(seed),
        "init": {"weight_std": weight_std, "norm_mean": norm_mean, "norm_std": norm_std,
                 "overrides": list(overrides or [])},
        "attn_implementation": attn_implementation, "experts_implementation": experts_implementation,
        "dump_state_dict": dump_state_dict, "jobs": list(jobs),
    }


def request_hash(request: dict) -> str:
    """Hash of the request *and* of hf_reference.py's source (editing the script invalidates caches)."""
    h = hashlib.sha256()
    h.update(json.dumps(request, sort_keys=True, separators=(",", ":")).encode())
    h.update(REFERENCE_SCRIPT.read_bytes())
    return h.hexdigest()[:20]


# ------------------------------------------------------------------------------------------ results
@dataclasses.dataclass
class ReferenceResult:
    out_dir: Path
    manifest: dict
    request: dict
    cached: bool = False
    wall_s: float = 0.0

    def job(self, name: str) -> dict:
        try:
            return self.manifest["jobs"][name]
        except KeyError:
            raise KeyError(f"no job {name!r}; have {sorted(self.manifest['jobs'])}") from None

    def array(self, name: str, key: str = "logits") -> np.ndarray:
        files = self.job(name)["files"]
        if key not in files:
            raise KeyError(f"job {name!r} wrote no {key!r}; have {sorted(files)}")
        return np.load(self.out_dir / files[key])

    def arrays(self, name: str) -> dict[str, np.ndarray]:
        return {k: np.load(self.out_dir / f) for k, f in self.job(name)["files"].items()}

    def path(self, name: str, key: str = "logits") -> Path:
        return self.out_dir / self.job(name)["files"][key]

    def checkpoint_dir(self, which: str = "hf_saved") -> Path:
        if which not in ("hf_saved", "hf_sharded", "minimax_names"):
            raise ValueError(which)
        d = self.out_dir / which
        if not d.is_dir():
            raise FileNotFoundError(f"{d} missing: the request needs a 'save' job")
        return d

    def state_dict(self) -> dict[str, np.ndarray]:
        with np.load(self.out_dir / self.manifest["state_dict"]) as z:
            return {k: z[k] for k in z.files}

    @property
    def hf_config(self) -> dict:
        return self.manifest["hf_config"]

    @property
    def timings(self) -> dict:
        return self.manifest["timings"]


def default_cache_dir() -> Path:
    d = os.environ.get("M1JAX_PARITY_CACHE")
    return Path(d) if d else Path(tempfile.gettempdir()) / f"m1jax-hf-reference-{os.getuid()}"


def run_reference(request: dict, cache_dir: str | os.PathLike | None = None, *, python: str | None = None,
                  timeout: float = 900) -> ReferenceResult:
    """Run hf_reference.py on ``request`` (or reuse ``cache_dir/<hash>/`` from an earlier identical run)."""
    import time

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    key = request_hash(request)
    out = cache / key
    with _file_lock(cache / f"{key}.lock"):
        if (out / "manifest.json").exists():
            return ReferenceResult(out, json.loads((out / "manifest.json").read_text()), request, cached=True)
        py = python or parity_python()
        work = cache / f"{key}.partial"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        (work / "request.json").write_text(json.dumps(request, indent=1))
        t0 = time.time()
        try:
            proc = subprocess.run([py, str(REFERENCE_SCRIPT), str(work / "request.json"), str(work)],
                                  capture_output=True, text=True, timeout=timeout, env=_clean_env())
        except subprocess.TimeoutExpired as e:
            raise ReferenceError(f"hf_reference.py timed out after {timeout}s") from e
        wall = time.time() - t0
        (work / "stderr.txt").write_text(proc.stderr or "")
        if proc.returncode != 0 or not (work / "manifest.json").exists():
            tail = "\n".join((proc.stderr or "").strip().splitlines()[-25:])
            raise ReferenceError(f"hf_reference.py failed (exit {proc.returncode}) with {py}:\n{tail}")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(work, out)
        return ReferenceResult(out, json.loads((out / "manifest.json").read_text()), request, wall_s=wall)


# ------------------------------------------------------------------------------------------ numpy helpers
def load_balancing_loss_np(router_logits: np.ndarray, top_k: int, mask: np.ndarray | None = None) -> float:
    """Independent numpy Switch-style aux loss over all layers' router logits [L, N, E] (HF's definition)."""
    lg = router_logits.astype(np.float64)
    p = np.exp(lg - lg.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    E = p.shape[-1]
    w = np.ones(p.shape[1]) if mask is None else np.asarray(mask, np.float64).reshape(-1)
    top = np.argsort(-p, axis=-1, kind="stable")[..., :top_k]
    counts = np.zeros(E)
    for l in range(p.shape[0]):
        for k in range(top_k):
            np.add.at(counts, top[l, :, k], w)
    probs = (p * w[None, :, None]).sum((0, 1))
    rows = w.sum() * p.shape[0]
    return float(E * np.sum((counts / rows) * (probs / rows)))


def load_safetensors_np(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file, or of every *.safetensors in a checkpoint dir, as numpy arrays.

    For fp32/fp16 checkpoints (safetensors.numpy cannot return bfloat16)."""
    from safetensors.numpy import load_file

    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out
