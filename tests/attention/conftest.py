"""Float64 NumPy oracle for masked GQA softmax attention: the forward and its hand-derived adjoint.

Independent of every implementation under test (no JAX, no autodiff). Per row b and query head h (KV head
g = h // (H / Hkv)), with M the boolean mask (query i sees key j):
    s_ij = q_i . k_j / sqrt(Dh)          p_i = softmax_j(s_ij over M_ij)   (p_i = 0 when row i sees no key)
    o_i  = sum_j p_ij v_j
and the row's logsumexp lse_i = log sum_j exp(s_ij) over M_ij; adjoint for cotangents dO (and dlse):
    dp_ij = dO_i . v_j                    ds_ij = p_ij (dp_ij - sum_l p_il dp_il + dlse_i)
    dq_i  = sum_j ds_ij k_j / sqrt(Dh)    dk_j = sum_i ds_ij q_i / sqrt(Dh)    dv_j = sum_i p_ij dO_i
(dk, dv summed over the query heads sharing a KV head).
"""
from __future__ import annotations

import types

import numpy as np
import pytest


def oracle_mask(q_slot, k_slot, q_segment=None, k_segment=None, k_valid=None):
    """[B, Tq, Tk] bool: causal by slot, same segment, valid key."""
    mask = np.asarray(k_slot)[:, None, :] <= np.asarray(q_slot)[:, :, None]
    if q_segment is not None:
        mask = mask & (np.asarray(q_segment)[:, :, None] == np.asarray(k_segment)[:, None, :])
    if k_valid is not None:
        mask = mask & np.asarray(k_valid, bool)[:, None, :]
    return mask


def attention_oracle(q, k, v, mask, d_out=None, d_lse=None):
    """q [B, Tq, H, Dh], k/v [B, Tk, Hkv, Dh], mask [B, Tq, Tk] bool -> dict(o, lse[, dq, dk, dv]) in float64;
    lse [B, Tq, H] is -inf for a row with no visible key; d_lse [B, Tq, H] (optional) is its cotangent."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, tq, nh, hd = q.shape
    group = nh // k.shape[2]
    kh, vh = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)  # [B, Tk, H, Dh]
    scale = 1.0 / np.sqrt(hd)
    m = np.asarray(mask, bool)[:, None]                                # [B, 1, Tq, Tk]
    s = np.einsum("bqhd,bkhd->bhqk", q, kh) * scale
    s = np.where(m, s, -np.inf)
    top = np.max(s, axis=-1, keepdims=True)
    e = np.where(m, np.exp(s - np.where(np.isfinite(top), top, 0.0)), 0.0)
    total = np.sum(e, axis=-1, keepdims=True)
    p = e / np.where(total > 0, total, 1.0)                            # [B, H, Tq, Tk]
    with np.errstate(divide="ignore"):
        lse = np.where(total > 0, np.log(np.where(total > 0, total, 1.0)) + top, -np.inf)[..., 0]  # [B, H, Tq]
    result = {"o": np.einsum("bhqk,bkhd->bqhd", p, vh), "lse": np.transpose(lse, (0, 2, 1))}
    if d_out is None:
        return result
    d_out = np.asarray(d_out, np.float64)
    dp = np.einsum("bqhd,bkhd->bhqk", d_out, vh)
    extra = 0.0 if d_lse is None else np.transpose(np.asarray(d_lse, np.float64), (0, 2, 1))[..., None]
    ds = p * (dp - np.sum(p * dp, axis=-1, keepdims=True) + extra)
    dkh = np.einsum("bhqk,bqhd->bkhd", ds, q) * scale
    dvh = np.einsum("bhqk,bqhd->bkhd", p, d_out)
    fold = lambda x: x.reshape(b, x.shape[1], nh // group, group, hd).sum(axis=3)  # noqa: E731
    result.update(dq=np.einsum("bhqk,bkhd->bqhd", ds, kh) * scale, dk=fold(dkh), dv=fold(dvh))
    return result


def rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


@pytest.fixture
def at():
    """The oracle and helpers, as a fixture (conftest modules are not importable under --import-mode=importlib)."""
    return types.SimpleNamespace(oracle=attention_oracle, mask=oracle_mask, rel_err=rel_err)
