"""Pool files read for evaluation at M-BEIR's size: every did kept as compact bytes, a duplicate
named by its lines, and this process's candidates streamed from the file again."""

import json

import numpy as np
import pytest

from trace_jax.data import mbeir
from trace_jax.eval import pools


def _pool(tmp_path, dids):
  path = tmp_path / "pool.jsonl"
  lines = [json.dumps({"did": d, "txt": f"text of {d}", "img_path": None, "modality": "text"})
           for d in dids]
  path.write_text("\n".join(lines[:2] + [""] + lines[2:]) + "\n")  # A blank line is no record.
  return str(path)


def test_dids_are_compact_bytes_and_the_share_streams(tmp_path):
  path = _pool(tmp_path, ["9:1", "9:22", "9:333", "9:4"])
  dids = pools.read_dids(path)
  assert isinstance(dids, np.ndarray) and dids.dtype == np.dtype("S5")  # 5 bytes a did.
  assert [d.decode() for d in dids] == ["9:1", "9:22", "9:333", "9:4"]
  items = list(pools.share_items(path, start=1))
  assert [(it.id, it.text) for it in items] == [("9:22", "text of 9:22"),
                                                ("9:333", "text of 9:333"), ("9:4", "text of 9:4")]


def test_duplicate_did_names_both_lines(tmp_path):
  path = _pool(tmp_path, ["9:1", "9:2", "9:3", "9:2"])
  with pytest.raises(mbeir.MBEIRFormatError, match=r"pool\.jsonl:5: duplicate did '9:2' "
                                                   r"\(first on line 2\)"):
    pools.read_dids(path)


def test_missing_candidate_image_names_file_line_did_and_path(tmp_path):
  (tmp_path / "here.jpg").write_bytes(b"")  # Existence is checked, not decoding.
  path = tmp_path / "pool.jsonl"
  lines = [json.dumps({"did": f"9:{i}", "txt": None, "img_path": name, "modality": "image"})
           for i, name in enumerate(["here.jpg", "here.jpg", "gone.jpg"])]
  path.write_text("\n".join(lines) + "\n")
  assert len(pools.read_dids(str(path))) == 3  # Without an image root: dids only.
  with pytest.raises(FileNotFoundError,
                     match=rf"pool\.jsonl:3: did 9:2: image not found: {tmp_path}/gone\.jpg$"):
    pools.read_dids(str(path), image_root=str(tmp_path))
