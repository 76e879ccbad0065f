"""Float64 NumPy oracle for lightning attention: the per-token recurrence and its hand-derived adjoint.

Independent of every implementation under test (no JAX, no autodiff):
    forward:  S_t = m_t lam S_{t-1} + k_t^T v_t,   o_t = q_t S_t          (m_t = 0 where a new document starts)
    adjoint:  G_t = q_t^T dO_t + m_{t+1} lam G_{t+1}  (G_{T-1} adds dS_final)
              dq_t = dO_t S_t^T,  dk_t = G_t v_t,  dv_t = k_t G_t,  d_init = m_0 lam G_0  (m_0 = 1)
"""
from __future__ import annotations

import types

import numpy as np
import pytest


def lightning_oracle(q, k, v, decay, *, initial_state=None, segment_ids=None, d_o=None, d_final=None):
    """q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; decay: [H]. Returns dict(o, final[, dq, dk, dv, d_init]) in float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, length, heads, dk = q.shape
    dv = v.shape[-1]
    lam = np.exp(-np.asarray(decay, np.float64))[None, :, None, None]
    keep = np.ones((batch, length))
    if segment_ids is not None:
        seg = np.asarray(segment_ids)
        keep[:, 1:] = seg[:, 1:] == seg[:, :-1]
    keep = keep[:, :, None, None, None]
    state = np.zeros((batch, heads, dk, dv)) if initial_state is None else np.asarray(initial_state, np.float64)
    states, outs = [], []
    for t in range(length):
        state = keep[:, t] * lam * state + np.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        states.append(state)
        outs.append(np.einsum("bhk,bhkv->bhv", q[:, t], state))
    result = {"o": np.stack(outs, 1), "final": state}
    if d_o is None:
        return result
    d_o = np.asarray(d_o, np.float64)
    grad = np.zeros_like(state) if d_final is None else np.asarray(d_final, np.float64).copy()
    dq, dk_, dv_ = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for t in reversed(range(length)):
        if t + 1 < length:
            grad = keep[:, t + 1] * lam * grad
        grad = grad + np.einsum("bhk,bhv->bhkv", q[:, t], d_o[:, t])
        dq[:, t] = np.einsum("bhv,bhkv->bhk", d_o[:, t], states[t])
        dk_[:, t] = np.einsum("bhkv,bhv->bhk", grad, v[:, t])
        dv_[:, t] = np.einsum("bhk,bhkv->bhv", k[:, t], grad)
    result.update(dq=dq, dk=dk_, dv=dv_, d_init=lam * grad)
    return result


def rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def random_problem(seed: int, batch: int, length: int, heads: int, dk: int, dv: int, *, segments: bool,
                   init: bool):
    """Random inputs (fp32 numpy) with decay rates spanning slow to fast, sorted packed-document ids."""
    rng = np.random.default_rng(seed)
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    prob = {"q": f32(batch, length, heads, dk) * 0.5, "k": f32(batch, length, heads, dk) * 0.5,
            "v": f32(batch, length, heads, dv), "decay": rng.uniform(0.01, 1.0, heads).astype(np.float32),
            "d_o": f32(batch, length, heads, dv), "d_final": f32(batch, heads, dk, dv),
            "initial_state": f32(batch, heads, dk, dv) if init else None,
            "segment_ids": np.sort(rng.integers(0, 4, (batch, length)), axis=1).astype(np.int32) if segments else None}
    return prob


@pytest.fixture
def lt():
    """The oracle and helpers, as a fixture (conftest modules are not importable under --import-mode=importlib)."""
    return types.SimpleNamespace(oracle=lightning_oracle, rel_err=rel_err, random_problem=random_problem)
