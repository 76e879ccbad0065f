"""The one-line progress report the trainer prints on stdout."""
from __future__ import annotations

from typing import Mapping

BAR_WIDTH = 30


def progress_line(step: int, total: int, values: Mapping[str, float]) -> str:
    """``[####......] 12/200  loss 2.3015  aux 0.0121  gnorm 0.812  lr 3.00e-04  12,345 tok/s  [MFU 41.0%]``
    (and the evaluation values, ``eval/loss 2.41``, on the steps that have them)."""
    done = int(BAR_WIDTH * step / max(total, 1))
    parts = [f"[{'#' * done}{'.' * (BAR_WIDTH - done)}] {step}/{total}", f"loss {values['loss']:.4f}",
             f"aux {values['aux_loss']:.4f}", f"gnorm {values['grad_norm']:.3f}", f"lr {values['learning_rate']:.2e}",
             f"{values['tokens_per_s']:,.0f} tok/s"]
    if "mfu" in values:
        parts.append(f"MFU {100 * values['mfu']:.1f}%")
    parts += [f"{k} {v:.4f}" for k, v in values.items() if "/" in k]
    return "  ".join(parts)
