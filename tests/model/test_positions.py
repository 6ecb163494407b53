"""Host-side index computations against transformers' own helpers, and their errors."""

import numpy as np
import pytest
import torch
from transformers import vision_utils

from tests.model import tiny
from trace_jax.model.positions import rope_index, vision_layout

GRIDS = [[(1, 4, 4)], [(1, 6, 12)], [(1, 10, 6), (1, 4, 8)], [(2, 4, 4)]]


@pytest.mark.parametrize("grids", GRIDS, ids=str)
def test_vision_layout_matches_transformers(grids):
  cfg = tiny.config().vision
  grid = torch.tensor(grids)
  layout = vision_layout(np.asarray(grids), cfg, windowed=True)
  want_pos = vision_utils.get_vision_position_ids(grid, cfg.spatial_merge_size)
  np.testing.assert_array_equal(layout.rot_pos_p2, want_pos.numpy())
  want_index, cu = vision_utils.get_vision_window_index(
    grid, spatial_merge_size=cfg.spatial_merge_size, window_size=cfg.window_size,
    patch_size=cfg.patch_size)
  np.testing.assert_array_equal(layout.window_index, want_index.numpy())
  # Our window segments, as cumulative lengths, are transformers' cu_window_seqlens.
  boundaries = np.flatnonzero(np.diff(layout.segment_window)) + 1
  np.testing.assert_array_equal(np.r_[0, boundaries, len(layout.segment_window)], cu.numpy())
  # Frame segments, put back in patch order, are transformers' cu_seqlens.
  in_patch_order = np.empty_like(layout.segment_full)
  in_patch_order[(layout.window_index[:, None] * 4 + np.arange(4)).ravel()] = layout.segment_full
  frames = np.flatnonzero(np.diff(in_patch_order)) + 1
  want_cu = vision_utils.get_vision_cu_seqlens(grid).numpy()
  np.testing.assert_array_equal(np.r_[0, frames, len(in_patch_order)], want_cu)


def test_rope_index_errors():
  cfg = tiny.config()
  ids = np.array([[1, tiny.START] + [tiny.IMAGE] * 4 + [tiny.END]])
  rope_index(ids, None, np.array([[1, 4, 4]]), cfg)  # 16 patches -> 4 tokens: fine.
  with pytest.raises(ValueError, match="more image tokens"):
    rope_index(ids, None, None, cfg)
  with pytest.raises(ValueError, match="does not match"):
    rope_index(ids, None, np.array([[1, 4, 8]]), cfg)
  with pytest.raises(ValueError, match="more images"):
    rope_index(ids, None, np.array([[1, 4, 4], [1, 4, 4]]), cfg)
