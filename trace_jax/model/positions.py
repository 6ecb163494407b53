"""Host-side (numpy) index computations that depend on image sizes: M-RoPE position ids for the
decoder and the patch layout (2-D RoPE positions, windows, segments) for the vision tower.

These run outside `jit` on the small `image_grid_thw` table, the way the Hugging Face processor and
`Qwen2_5_VLModel.get_rope_index` do; the results are plain arrays fed to the jitted model. Only
images are supported (a video's temporal positions are not implemented).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from trace_jax.model.config import ModelConfig, VisionConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VisionLayout:
  """Index arrays for one flat batch of P patches (P = sum over images of t*h*w)."""

  rot_pos_p2: np.ndarray  # (h, w) patch coordinates in the merge-block order, original patch order.
  window_index: np.ndarray  # [P/m^2] merged-unit order used inside the tower (identity: Qwen2-VL).
  reverse_index: np.ndarray  # [P/m^2] argsort(window_index).
  segment_full: np.ndarray  # [P] frame id of each patch, in tower order.
  segment_window: np.ndarray  # [P] window id of each patch, in tower order.


def vision_layout(grid_thw: np.ndarray, vcfg: VisionConfig, windowed: bool) -> VisionLayout:
  """Mirrors transformers' `get_vision_position_ids`, `get_vision_cu_seqlens` and
  `get_vision_window_index` (transformers/vision_utils.py)."""
  grid_thw = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
  m = vcfg.spatial_merge_size
  unit = m * m
  rot, frames, windows, win_index = [], [], [], []
  frame_id = window_id = offset = 0
  win = vcfg.window_size // m // vcfg.patch_size
  for t, h, w in grid_thw.tolist():
    if h % m or w % m:
      raise ValueError(f"image grid {(t, h, w)} is not divisible by spatial_merge_size={m}")
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    block = (h // m, m, w // m, m)
    hpos = hh.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
    wpos = ww.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
    rot.append(np.tile(np.stack([hpos, wpos], -1), (t, 1)))
    frames.append(np.repeat(np.arange(frame_id, frame_id + t), h * w))
    frame_id += t
    gh, gw = h // m, w // m
    if not windowed:
      win_index.append(np.arange(t * gh * gw) + offset)
      windows.append(np.repeat(np.arange(frame_id - t, frame_id), h * w))
    else:
      idx = np.arange(t * gh * gw).reshape(t, gh, gw)
      nh, nw = -(-gh // win), -(-gw // win)
      padded = np.full((t, nh * win, nw * win), -1)
      padded[:, :gh, :gw] = idx
      padded = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, -1)
      for frame in padded:
        for cell in frame:
          cell = cell[cell >= 0]
          if cell.size:
            win_index.append(cell + offset)
            windows.append(np.full(cell.size * unit, window_id))
            window_id += 1
    offset += t * gh * gw
  window_index = np.concatenate(win_index).astype(np.int32)
  segment_full = np.concatenate(frames).reshape(-1, unit)[window_index].reshape(-1)
  return VisionLayout(
    rot_pos_p2=np.concatenate(rot).astype(np.int32),
    window_index=window_index,
    reverse_index=np.argsort(window_index).astype(np.int32),
    segment_full=segment_full.astype(np.int32),
    segment_window=np.concatenate(windows).astype(np.int32),
  )


def rope_index(input_ids: np.ndarray, attention_mask: np.ndarray | None,
               image_grid_thw: np.ndarray | None, cfg: ModelConfig) -> np.ndarray:
  """M-RoPE position ids [3, B, T], as transformers' `Qwen2_5_VLModel.get_rope_index`.

  Text tokens advance all three components together; a run of image tokens gets
  (t, h, w) grid coordinates offset by the running position, after which text resumes at
  `start + max(h, w)` merged cells. Padding positions (mask 0) get position 0.
  """
  input_ids = np.asarray(input_ids)
  b, t = input_ids.shape
  mask = np.ones_like(input_ids, bool) if attention_mask is None else np.asarray(attention_mask) > 0
  grids = iter(np.asarray(image_grid_thw, np.int64).reshape(-1, 3).tolist()
               if image_grid_thw is not None else [])
  m = cfg.vision.spatial_merge_size
  out = np.zeros((3, b, t), np.int32)
  for row in range(b):
    ids = input_ids[row][mask[row]]
    is_img = ids == cfg.image_token_id
    pos, pieces, i = 0, [], 0
    while i < len(ids):
      j = i
      while j < len(ids) and is_img[j] == is_img[i]:
        j += 1
      if not is_img[i]:
        pieces.append(np.broadcast_to(np.arange(j - i) + pos, (3, j - i)))
        pos += j - i
      else:
        run = j - i
        while run > 0:
          try:
            gt, gh, gw = next(grids)
          except StopIteration:
            raise ValueError(f"row {row}: more image tokens than images in image_grid_thw"
                             ) from None
          gh, gw = gh // m, gw // m
          n = gt * gh * gw
          if n > run:
            raise ValueError(f"row {row}: an image run of {j - i} tokens does not match the grids "
                             "in image_grid_thw")
          tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw), indexing="ij")
          pieces.append(np.stack([tt.ravel() + pos, hh.ravel() + pos, ww.ravel() + pos]))
          pos += max(gh, gw)
          run -= n
      i = j
    if pieces:
      out[:, row, mask[row]] = np.concatenate(pieces, axis=1)
  if next(grids, None) is not None:
    raise ValueError("image_grid_thw has more images than the input_ids have image tokens")
  return out
