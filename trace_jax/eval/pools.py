"""Candidate pools encoded once and kept on disk, for evaluation at the size of M-BEIR's union.

The union test pool has 5.6M candidates (~80 GB of float32 embeddings at width 3584): no process
holds it, nor its texts, in memory. Each process reads the pool file once, checking every line (and
that every image it names exists) and keeping only the dids (rankings name them) as one array of
fixed-width UTF-8 bytes, then reads it a second time streaming the candidates of its share
(`distributed.share`) to the encoder, `eval.pool_chunk` at a time. Each chunk's embeddings are
written at their place in a `.npy` file (`eval.embedding_dtype`: float32, or bfloat16 stored as its
raw uint16 bits, half the disk) and a progress file records the chunks that are complete: an
encoding that was stopped resumes at its first incomplete chunk, and gives the same bytes as one
that was not. The file is renamed when complete, and named for the checkpoint (a fingerprint of its
files, `train/checkpoint.py`), the encoder settings and the process layout, so a pool is encoded
once per evaluation (the union pool serves all 16 tasks), a rerun of the same evaluation reuses it
and a retrained checkpoint does not. Scoring reads it block by block from disk (`RowFile`,
`infer/retrieval.py`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from typing import Iterator

import jax
import ml_dtypes
import numpy as np

from trace_jax.data import mbeir
from trace_jax.eval import distributed, preflight
from trace_jax.infer.encode import Encoder, Item

DTYPES = ("float32", "bfloat16")
_DID_BLOCK = 65536  # Dids gathered as Python bytes before they join the compact array.


@dataclasses.dataclass
class PoolShard:
  """This process's share of an encoded pool."""

  dids: np.ndarray  # [N] every did of the pool as UTF-8 bytes (numpy "S"), in file order.
  rows: np.ndarray  # [n] global indices of this process's candidates.
  embeddings: RowFile  # [n, D] on disk, rows in the order of `rows`.
  truncated: int  # This process's candidates whose text was cut to fit.

  def did(self, index: int) -> str:
    """The did at a global pool index."""
    return self.dids[index].decode("utf-8")


class RowFile:
  """The rows of a 2-D `.npy` file, read from disk when sliced. No memory map: what was read is
  not kept resident, so scoring a pool larger than memory holds one block at a time."""

  def __init__(self, path: str, dtype: str):
    with open(path, "rb") as f:
      read_header = (np.lib.format.read_array_header_1_0 if np.lib.format.read_magic(f) == (1, 0)
                     else np.lib.format.read_array_header_2_0)
      shape, fortran, stored = read_header(f)
      self.offset = f.tell()
    if fortran or len(shape) != 2 or stored != np.dtype(_storage(dtype)):
      raise ValueError(f"{path}: not a C-ordered 2-D {dtype} array; delete it to encode again")
    self.path, self.shape, self.dtype_name = path, tuple(shape), dtype

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, rows: slice) -> np.ndarray:
    start, stop, step = rows.indices(self.shape[0])
    if step != 1:
      raise ValueError("RowFile reads contiguous rows only")
    width, storage = self.shape[1], np.dtype(_storage(self.dtype_name))
    n = max(stop - start, 0)
    with open(self.path, "rb") as f:
      data = np.fromfile(f, storage, n * width,
                         offset=self.offset + start * width * storage.itemsize)
    return _view(data.reshape(n, width), self.dtype_name)


def read_dids(path: str, image_root: str | None = None) -> np.ndarray:
  """Every did of a pool file in file order, as fixed-width UTF-8 bytes (tens of bytes each):
  one pass, every line checked (a malformed one names the file and line), duplicates included.
  With `image_root`, every candidate's image is checked to exist there in the same pass (a stat
  each, `preflight.check_image`): a missing one raises FileNotFoundError naming file, line, did
  and path."""
  blocks, block = [], []
  for n, record in mbeir.read_jsonl(path):
    cand = mbeir.parse_candidate(record, f"{path}:{n}")
    if image_root is not None:
      preflight.check_image(image_root, cand.image_path, f"did {cand.did}", f"{path}:{n}")
    block.append(cand.did.encode("utf-8"))
    if len(block) == _DID_BLOCK:
      blocks.append(np.asarray(block, np.bytes_))
      block = []
  if block:
    blocks.append(np.asarray(block, np.bytes_))
  dids = np.concatenate(blocks) if blocks else np.zeros(0, np.bytes_)
  order = np.argsort(dids, kind="stable")
  same = np.flatnonzero(dids[order[1:]] == dids[order[:-1]])
  if len(same):
    _raise_duplicate(path, dids[order[same[0]]].decode("utf-8"))
  return dids


def _raise_duplicate(path: str, did: str) -> None:
  """Names the lines of a duplicate did (read again: an error, so a rare second pass)."""
  lines = [n for n, record in mbeir.read_jsonl(path) if record.get("did") == did]
  raise mbeir.MBEIRFormatError(f"{path}:{lines[1]}: duplicate did {did!r} "
                               f"(first on line {lines[0]})")


def share_items(path: str, start: int = 0) -> Iterator[Item]:
  """This process's candidates of a pool file (its `distributed.share`), from its `start`-th
  on, read again from the file one at a time (the file was checked by `read_dids`)."""
  p, n_proc = jax.process_index(), jax.process_count()
  records = (r for _, r in _lines_of_share(path, p, n_proc))
  for record in itertools.islice(records, start, None):
    cand = mbeir.parse_candidate(json.loads(record), path)
    yield Item(cand.text, cand.image_path, cand.did)


def _lines_of_share(path: str, p: int, n_proc: int) -> Iterator[tuple[int, str]]:
  """(record index, raw line) of every record `i` with `i % n_proc == p`; blank lines are not
  records (as `mbeir.read_jsonl`), and only these lines are parsed."""
  index = 0
  with open(path, encoding="utf-8") as f:
    for line in f:
      if not line.strip():
        continue
      if index % n_proc == p:
        yield index, line
      index += 1


def encode_pool(path: str, encoder: Encoder, out_dir: str, dtype: str, tag: str,
                chunk: int = 4096, dids: np.ndarray | None = None) -> PoolShard:
  """Encodes this process's share of a pool file into `out_dir` (or reuses the file a previous
  call completed, or resumes one it left incomplete); `tag` names the checkpoint and encoder
  settings the embeddings depend on; `chunk` candidates are encoded and saved at a time. `dids`:
  the file's `read_dids`, when the caller read (and checked) it already."""
  if dtype not in DTYPES:
    raise ValueError(f"eval.embedding_dtype={dtype!r}; expected one of {DTYPES}")
  if chunk < 1:
    raise ValueError(f"eval.pool_chunk={chunk}; expected >= 1")
  dids = read_dids(path, encoder.root) if dids is None else dids
  rows = distributed.share(len(dids))
  name = (f"{os.path.basename(path).removesuffix('.jsonl')}.{tag}.{dtype}."
          f"p{jax.process_index()}of{jax.process_count()}.npy")
  final = os.path.join(out_dir, name)
  width = encoder.model.cfg.text.width
  counts = final.removesuffix(".npy") + ".json"
  if not os.path.exists(final):
    os.makedirs(out_dir, exist_ok=True)
    _encode_chunks(path, encoder, final, (len(rows), width), dtype, chunk)
  with open(counts) as f:
    truncated = json.load(f)["truncated"]
  embeddings = RowFile(final, dtype)
  if embeddings.shape != (len(rows), width):
    raise ValueError(f"{final}: shape {embeddings.shape}, expected {(len(rows), width)}; "
                     "delete it to encode the pool again")
  return PoolShard(dids, rows, embeddings, truncated)


def _encode_chunks(path: str, encoder: Encoder, final: str, shape: tuple[int, int], dtype: str,
                   chunk: int) -> None:
  """Writes `final` (and its counts) chunk by chunk through `final.partial`, resuming after the
  chunks a progress file lists as complete when it describes the same encoding."""
  partial, progress_path = final + ".partial", final + ".progress.json"
  layout = {"shape": list(shape), "dtype": dtype, "chunk": chunk}
  progress = _read_progress(progress_path, partial, layout)
  if progress is None:
    progress = dict(layout, chunks=0, truncated=0)
    with open(partial, "wb") as f:  # The header, then zeros (sparse) where the rows go.
      np.lib.format.write_array_header_1_0(f, {
        "descr": np.lib.format.dtype_to_descr(np.dtype(_storage(dtype))),
        "fortran_order": False, "shape": shape})
      f.truncate(f.tell() + shape[0] * shape[1] * np.dtype(_storage(dtype)).itemsize)
    _write_json(progress_path, progress)
  offset = RowFile(partial, dtype).offset
  row_bytes = shape[1] * np.dtype(_storage(dtype)).itemsize
  items = share_items(path, progress["chunks"] * chunk)
  with open(partial, "r+b") as f:
    for c in range(progress["chunks"], -(-shape[0] // chunk)):
      batch = list(itertools.islice(items, chunk))
      out = _view(np.zeros((len(batch), shape[1]), _storage(dtype)), dtype)
      enc = encoder.encode_candidates(batch, out=out)
      f.seek(offset + c * chunk * row_bytes)
      f.write(out.view(_storage(dtype)).tobytes())
      f.flush()
      os.fsync(f.fileno())  # The rows are on disk before the progress file says so.
      cut = int((enc.truncated > 0).sum())
      progress.update(chunks=c + 1, truncated=progress["truncated"] + cut)
      _write_json(progress_path, progress)
  _write_json(final.removesuffix(".npy") + ".json", {"truncated": progress["truncated"]})
  os.replace(partial, final)  # After the counts: a complete file means complete counts too.
  os.remove(progress_path)


def _read_progress(progress_path: str, partial: str, layout: dict) -> dict | None:
  """The progress of an earlier, stopped encoding of the same layout, or None (start over)."""
  if not (os.path.exists(progress_path) and os.path.exists(partial)):
    return None
  with open(progress_path) as f:
    progress = json.load(f)
  return progress if {k: progress.get(k) for k in layout} == layout else None


def _write_json(path: str, value: dict) -> None:
  """Writes a small JSON file atomically (a temporary name, then a rename)."""
  with open(path + ".tmp", "w") as f:
    json.dump(value, f)
  os.replace(path + ".tmp", path)


def _storage(dtype: str):
  return np.uint16 if dtype == "bfloat16" else np.float32  # .npy has no bfloat16.


def _view(array: np.ndarray, dtype: str) -> np.ndarray:
  return array.view(ml_dtypes.bfloat16) if dtype == "bfloat16" else array
