"""Blockwise, sharded, disk-streamed top-k equals a plain numpy sort."""

import numpy as np
import pytest

from trace_jax.infer.retrieval import top_k


@pytest.mark.parametrize("block", [7, 16, 1000])
def test_top_k_matches_numpy(mesh, tmp_path, block):
  rng = np.random.default_rng(0)
  q = rng.standard_normal((5, 8)).astype(np.float32)
  c = rng.standard_normal((64, 8)).astype(np.float32)
  c[10] = c[3]  # A tie: the lower index wins.
  want = np.argsort(-(q @ c.T), axis=1, kind="stable")[:, :10]
  np.save(tmp_path / "cands.npy", c)
  on_disk = np.load(tmp_path / "cands.npy", mmap_mode="r")
  for cands, m in ((c, None), (c, mesh), (on_disk, mesh)):
    scores, idx = top_k(q, cands, 10, block=block, mesh=m)
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_allclose(scores, np.take_along_axis(q @ c.T, want, 1), atol=1e-5)
