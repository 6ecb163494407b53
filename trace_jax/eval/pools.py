"""Candidate pools encoded once and kept on disk, for evaluation at the size of M-BEIR's union.

The union test pool has 5.6M candidates (~80 GB of float32 embeddings at width 3584): no process
holds it in memory. Each process reads the pool file once, keeps every did (rankings name them)
and the candidates of its share (`distributed.share`), and streams its share's embeddings into a
`.npy` file as it encodes them (`eval.embedding_dtype`: float32, or bfloat16 stored as its raw
uint16 bits, half the disk). The file is written under a temporary name and renamed when
complete, and named for the checkpoint step, the encoder settings and the process layout, so a
pool is encoded once per evaluation (the union pool serves all 16 tasks) and a rerun of the same
evaluation reuses it. Scoring reads it block by block (`infer/retrieval.py`).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import ml_dtypes
import numpy as np

from trace_jax.data import mbeir
from trace_jax.eval import distributed
from trace_jax.infer.encode import Encoder, Item

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass
class PoolShard:
  """This process's share of an encoded pool."""

  dids: list[str]  # Every did of the pool, in file order (global index -> did).
  rows: np.ndarray  # [n] global indices of this process's candidates.
  embeddings: np.ndarray  # [n, D] on disk (memmap), rows in the order of `rows`.
  truncated: int  # This process's candidates whose text was cut to fit.


def read_share(path: str) -> tuple[list[str], list[mbeir.Candidate]]:
  """(every did, in file order; the candidates of this process's share), one pass over the file.
  Every line is checked (a malformed one names the file and line), duplicates included."""
  dids: list[str] = []
  first_line: dict[str, int] = {}
  mine: list[mbeir.Candidate] = []
  p, n_proc = jax.process_index(), jax.process_count()
  for n, record in mbeir.read_jsonl(path):
    cand = mbeir.parse_candidate(record, f"{path}:{n}")
    if cand.did in first_line:
      raise mbeir.MBEIRFormatError(f"{path}:{n}: duplicate did {cand.did!r} "
                                   f"(first on line {first_line[cand.did]})")
    first_line[cand.did] = n
    if len(dids) % n_proc == p:
      mine.append(cand)
    dids.append(cand.did)
  return dids, mine


def encode_pool(path: str, encoder: Encoder, out_dir: str, dtype: str, tag: str) -> PoolShard:
  """Encodes this process's share of a pool file into `out_dir` (or reuses the file a previous
  call completed); `tag` names the checkpoint and encoder settings the embeddings depend on."""
  if dtype not in DTYPES:
    raise ValueError(f"eval.embedding_dtype={dtype!r}; expected one of {DTYPES}")
  dids, mine = read_share(path)
  rows = distributed.share(len(dids))
  name = (f"{os.path.basename(path).removesuffix('.jsonl')}.{tag}.{dtype}."
          f"p{jax.process_index()}of{jax.process_count()}.npy")
  final = os.path.join(out_dir, name)
  width = encoder.model.cfg.text.width
  counts = final.removesuffix(".npy") + ".json"
  if not os.path.exists(final):
    os.makedirs(out_dir, exist_ok=True)
    partial = final + ".partial"
    disk = np.lib.format.open_memmap(partial, "w+", _storage(dtype), (len(mine), width))
    enc = encoder.encode_candidates([Item(c.text, c.image_path, c.did) for c in mine],
                                    out=_view(disk, dtype))
    disk.flush()
    del disk
    with open(counts, "w") as f:
      json.dump({"truncated": int((enc.truncated > 0).sum())}, f)
    os.replace(partial, final)  # Last: a complete file means complete counts too.
  with open(counts) as f:
    truncated = json.load(f)["truncated"]
  embeddings = _view(np.load(final, mmap_mode="r"), dtype)
  if embeddings.shape != (len(mine), width):
    raise ValueError(f"{final}: shape {embeddings.shape}, expected {(len(mine), width)}; "
                     "delete it to encode the pool again")
  return PoolShard(dids, rows, embeddings, truncated)


def _storage(dtype: str):
  return np.uint16 if dtype == "bfloat16" else np.float32  # .npy has no bfloat16.


def _view(array: np.ndarray, dtype: str) -> np.ndarray:
  return array.view(ml_dtypes.bfloat16) if dtype == "bfloat16" else array
