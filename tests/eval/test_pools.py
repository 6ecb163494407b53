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
