"""Input pipeline: packed next-token rows from token files, raw-text tokenisation, synthetic arithmetic rows, and
per-process batch loading with checkpointable per-row state (grain).

Every batch row has its own deterministic stream keyed by ``(seed, global row)``, so the global batch of a step
does not depend on how many processes read it; each process reads only the rows its devices hold.
"""
from m1jax.data.batch import BATCH_KEYS, DataError, rows_to_batch
from m1jax.data.loader import BatchLoader, ShardedBatchLoader, make_source
from m1jax.data.packing import PackedTokenSource
from m1jax.data.synthetic import SYNTHETIC_TASKS, ArithmeticSource, arithmetic_source
from m1jax.data.text import read_texts, tokenize_to_file
from m1jax.data.token_file import TokenFile, write_token_file

__all__ = ["ArithmeticSource", "BATCH_KEYS", "BatchLoader", "DataError", "PackedTokenSource", "SYNTHETIC_TASKS",
           "ShardedBatchLoader", "TokenFile", "arithmetic_source", "make_source", "read_texts", "rows_to_batch",
           "tokenize_to_file", "write_token_file"]
