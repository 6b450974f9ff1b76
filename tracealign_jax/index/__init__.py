"""TraceIndex: a sharded, memory-mapped suffix-array index over corpus token ids (host-side NumPy + numba).

Build with ``build_index`` (JSONL/Parquet + a local Hugging Face tokenizer) or
``build_index_from_tokens``; query with ``TraceIndex.open(path)``. Never imports jax.
"""

from tracealign_jax.index.query import Span, TraceIndex

__all__ = ["Span", "TraceIndex", "build_index", "build_index_from_tokens"]


def __getattr__(name: str):
    # build_index pulls in transformers, build_index_from_tokens pydivsufsort and tqdm: a query needs neither
    if name == "build_index":
        from tracealign_jax.index.corpus import build_index

        return build_index
    if name == "build_index_from_tokens":
        from tracealign_jax.index.build import build_index_from_tokens

        return build_index_from_tokens
    raise AttributeError(name)
