"""The cost of the default integrity checks (issue 17): time to open an index and to restore a checkpoint
with and without them.

    .venv/bin/python benchmarks/integrity_bench.py index --tokens 100M --workdir /tmp/ib
    .venv/bin/python benchmarks/integrity_bench.py checkpoint --params 1B --workdir /tmp/ib

index: a zipf corpus (32 k vocab, 500-token documents) built with ``build_index_from_tokens``; opens with
``verify="size"`` (sizes only), ``"auto"`` as the build left it (checksums remembered), ``"auto"`` on a first
open (every SHA-256, then remembered; simulated with an empty verified cache), ``"full"`` (every SHA-256).
checkpoint: a random float32 parameter pytree of the given size in a TrainState, saved with the project's
``Checkpointer`` (synchronous) — save time, checksum-record time, restore with and without verification.
Files are in the page cache (just written): a cold read adds the disk's read time to the checked opens.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path


def _size(text: str) -> int:
    mult = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}
    return int(float(text[:-1]) * mult[text[-1].upper()]) if text[-1].upper() in mult else int(text)


def _timed(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_index(tokens: int, workdir: Path) -> None:
    import numpy as np

    from tracealign_jax.index import TraceIndex, build_index_from_tokens

    rng = np.random.default_rng(0)
    corpus = np.minimum(rng.zipf(1.2, size=tokens), 32000) - 1
    docs = [corpus[i : i + 500] for i in range(0, tokens, 500)]
    path = workdir / "index"
    start = time.perf_counter()
    build_index_from_tokens(docs, path, vocab_size=32000, metadata=[{"unsafe": False}] * len(docs), overwrite=True)
    print(f"build {tokens:,} tokens: {time.perf_counter() - start:.1f} s, "
          f"{sum(p.stat().st_size for p in path.iterdir()) / 2**20:.0f} MiB on disk")  # fmt: skip
    del corpus, docs
    print(f"open verify=size                      {_timed(lambda: TraceIndex.open(path, verify='size')):.3f} s")
    print(f"open verify=auto (remembered)         {_timed(lambda: TraceIndex.open(path, verify='auto')):.3f} s")

    def first_open() -> None:
        os.environ["TRACEALIGN_CACHE_DIR"] = tempfile.mkdtemp()
        TraceIndex.open(path, verify="auto")

    print(f"open verify=auto (first open)         {_timed(first_open):.3f} s")
    print(f"open verify=full / index verify       {_timed(lambda: TraceIndex.open(path, verify='full')):.3f} s")


def bench_checkpoint(params: int, workdir: Path) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from tracealign_jax.config import CheckpointConfig
    from tracealign_jax.training import checkpoint as ck
    from tracealign_jax.training.state import TrainState

    leaf = 1 << 26  # 64 M params (256 MiB) per leaf, like a large layer's weight
    sizes = [leaf] * (params // leaf) + ([params % leaf] if params % leaf else [])
    rng = np.random.default_rng(0)
    tree = {}
    for i, n in enumerate(sizes):
        tree[f"w{i:03d}"] = jnp.asarray(rng.random(n, dtype=np.float32))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=tree, opt_state=None, rng=jnp.zeros(2, jnp.uint32),
                       ref_params=None, nonfinite_in_row=jnp.zeros((), jnp.int32), nonfinite_total=jnp.zeros((), jnp.int32))  # fmt: skip
    directory = workdir / "ckpt"
    shutil.rmtree(directory, ignore_errors=True)
    saver = ck.Checkpointer(CheckpointConfig(async_save=False, keep_last=1), directory)
    start = time.perf_counter()
    saver.save(1, state, {"epoch": 0, "cursor": 0})
    saver.manager.wait_until_finished()
    saved = time.perf_counter() - start
    start = time.perf_counter()
    saver.close()  # writes checksums/1.json
    summed = time.perf_counter() - start
    nbytes = sum(p.stat().st_size for p in (directory / "1").rglob("*") if p.is_file())
    print(f"checkpoint {params:,} float32 params ({nbytes / 2**30:.2f} GiB): save {saved:.2f} s, checksum record {summed:.2f} s")
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
    del tree, state
    reader = ck.open_checkpoints(directory)
    for verify in (False, True, False, True):
        start = time.perf_counter()
        got, _ = reader.restore(abstract, verify=verify)
        jax.block_until_ready(got)
        print(f"restore verify={verify!s:5}  {time.perf_counter() - start:.2f} s")
        del got
    start = time.perf_counter()
    reader.verify(1)
    print(f"verify alone   {time.perf_counter() - start:.2f} s")
    reader.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("index", "checkpoint"))
    ap.add_argument("--tokens", default="100M")
    ap.add_argument("--params", default="1B")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp())
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"load average before: {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs")
    if args.what == "index":
        bench_index(_size(args.tokens), workdir)
    else:
        bench_checkpoint(_size(args.params), workdir)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
