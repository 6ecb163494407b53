"""Evaluation's up-front check that every image a task names exists: every process checks whole
files (not its share) before any model work, so a missing image stops every process with the
same error, naming the file, line, item and path. Not a decode check: an image that exists but
does not decode is found by the process that encodes it (`distributed.agree` tells the others).

A missing image is an error, never a skip: UniIR and LamRA score every query of a task, and a
skipped query (or candidate) would change the recall denominators (or the pool) silently.
The check is one `stat` per image: ~4 us each with the directory entries cached (measured on
ext4, 100k files, best of 5), ~20 s per process for M-BEIR's 5.6M-candidate union pool, against
hours to encode it (README, "Evaluation").
"""

from __future__ import annotations

import os

from trace_jax.data import mbeir


def check_image(root: str, image_path: str | None, item: str, where: str) -> None:
  """Raises FileNotFoundError `"{where}: {item}: image not found: {path}"` when `image_path`
  (relative to `root`, as the encoder reads it) is set and no file is there."""
  if image_path and not os.path.isfile(os.path.join(root, image_path)):
    raise FileNotFoundError(f"{where}: {item}: image not found: "
                            f"{os.path.abspath(os.path.join(root, image_path))}")


def check_query_images(path: str, root: str) -> int:
  """Checks every query image of a query file (every line, whatever this process's share);
  returns how many images were checked.

  Raises:
    FileNotFoundError: `"{path}:{line}: qid {qid}: image not found: {image}"`.
    mbeir.MBEIRFormatError: a malformed line (names file and line).
  """
  count = 0
  for n, record in mbeir.read_jsonl(path):
    query = mbeir.parse_query(record, f"{path}:{n}")
    check_image(root, query.image_path, f"qid {query.qid}", f"{path}:{n}")
    count += bool(query.image_path)
  return count
