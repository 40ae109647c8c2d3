"""Embedding stores (NAME.cfbd/): the commit record (record.py), the metadata schema (schema.py), the store
(store.py), writing from arrays (writing.py) and the integrity check (verify.py)."""
from .chunks import Chunk
from .record import (COMMIT_RECORD, DEFAULT_MATRICES, DTYPE_CODES, FORMAT_NAME, FORMAT_VERSION, MAX_DIM, META_DIR,
                     SKIP_DIR, dtype_name, encode_commit_record, numpy_dtype, read_commit_record, store_entries)
from .schema import META_COLUMNS, SKIP_COLUMNS
from .store import EmbeddingStore
from .writing import write_batches

__all__ = ["Chunk", "COMMIT_RECORD", "DEFAULT_MATRICES", "DTYPE_CODES", "FORMAT_NAME", "FORMAT_VERSION", "MAX_DIM",
           "META_COLUMNS", "META_DIR", "SKIP_COLUMNS", "SKIP_DIR", "EmbeddingStore", "dtype_name",
           "encode_commit_record", "numpy_dtype", "read_commit_record", "store_entries", "write_batches"]
