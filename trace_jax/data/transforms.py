"""Per-example Grain transform: a `TrainExample` -> token ids, masks, M-RoPE positions, pixels.

Images are resized to the bucket's fixed patch grid (every image of a bucket shares one grid, so
batches have static shapes). Long texts are cut where tokens are made (`prompts.py`): the query text
to `query_text_tokens` (LamRA's 480) and further so that the sequence fits the longest query bucket;
a candidate by the candidate-length policy (`prompts.CandidateLimits`: its text to
`cand_text_tokens`, LamRA's 1024, and the sequence to the longest candidate bucket,
`data.cand_len`), the one the evaluation encoder applies too. The instruction, the image tokens, the
rule and the target stay whole, and each cut is reported with the example's id. A hard negative
(`negatives.py`) becomes a third side, `neg`, encoded as a candidate. A bad example (missing or
unreadable image, a sequence too long even without its text, empty candidate) raises
`BadExampleError` naming the example id, or with `on_bad_example="skip"` becomes a marker that the
pipeline drops and counts. Padding and batching are in `pipeline.py`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import grain
import numpy as np

from trace_jax.data import image as image_lib
from trace_jax.data import mbeir
from trace_jax.data import prompts
from trace_jax.data.examples import TrainExample
from trace_jax.data.tokenizer import Tokenizer
from trace_jax.model.config import ModelConfig
from trace_jax.model.positions import rope_index

BAD = "bad_example"  # Key of the marker a skipped example turns into.
TRUNCATED = "data/truncated_texts"  # Key of the note on a cut text ("" when none was cut).


class BadExampleError(ValueError):
  """An example that cannot become a training sequence; the message starts with its id."""


@dataclasses.dataclass(frozen=True)
class Shapes:
  """Static sizes: the longest query / candidate bucket and the (t, h, w) patch grid."""

  max_query_len: int
  max_cand_len: int
  image_grid: tuple[int, int, int]

  @property
  def patches(self) -> int:
    return int(np.prod(self.image_grid))


class ToArrays(grain.transforms.Map):
  """TrainExample dict -> unpadded arrays of one example (see module docstring)."""

  def __init__(self, tokenizer: Tokenizer, model_cfg: ModelConfig, shapes: Shapes, root: str,
               on_bad_example: str = "error", compact_prompts: bool = False,
               cand_may_reason: bool = False, query_text_tokens: int = 0,
               cand_text_tokens: int = 0, lm_only: bool = False):
    if on_bad_example not in ("error", "skip"):
      raise ValueError(f"data.on_bad_example={on_bad_example!r}; expected 'error' or 'skip'")
    self.tok, self.cfg, self.shapes, self.root = tokenizer, model_cfg, shapes, root
    self.on_bad_example = on_bad_example
    self.compact = compact_prompts
    self.cand_may_reason = cand_may_reason  # Candidate-side reasoning: candidates get targets.
    # A backbone's LM-only pretraining (`data.target="lm"`): plain chat turns, no candidates.
    self.lm_only = lm_only
    self.query_text_tokens = query_text_tokens  # 0: no limit.
    # Candidates (and hard negatives) follow the policy evaluation applies (`infer/encode.py`).
    self.cand_limits = prompts.CandidateLimits(cand_text_tokens, shapes.max_cand_len)

  def map(self, record: dict[str, Any]) -> dict[str, Any]:
    record = dict(record)
    inline = {side: record.pop(f"{side}_image_bytes", None) for side in ("query", "cand", "neg")}
    ex = TrainExample.from_dict(record)
    try:
      return self._arrays(ex, inline)
    except (OSError, ValueError) as e:
      reason = f"{ex.example_id} (query {ex.qid}): {e}"
      if self.on_bad_example == "skip":
        return {BAD: reason}
      raise BadExampleError(reason) from e

  def _pixels(self, path: str | None, inline: bytes | None) -> tuple[np.ndarray, int]:
    """Pixels [P, C] of the image (encoded bytes inline, else the file under the root) at the
    bucket grid, and its merged-token count (0: no image)."""
    s = self.shapes
    if path is None:
      return np.zeros((s.patches, self.cfg.vision.patch_dim), np.float32), 0
    source = inline
    if source is None:
      source = os.path.join(self.root, path)
      if not os.path.exists(source):
        raise FileNotFoundError(f"image not found: {source}")
    pixels, _ = image_lib.resize_to_grid(source, s.image_grid[1:])
    return pixels, s.patches // self.cfg.vision.spatial_merge_size**2

  def _side(self, enc: prompts.Encoded, n_img: int) -> dict[str, Any]:
    ids = np.asarray(enc.ids, np.int32)
    grid = np.asarray([self.shapes.image_grid]) if n_img else None
    positions = rope_index(ids[None], None, grid, self.cfg)[:, 0]
    return {"ids": ids, "target_mask": np.asarray(enc.target_mask, np.int32),
            "positions": positions, "has_image": bool(n_img)}

  def _encode(self, ex: TrainExample, side: str, n_img: int) -> prompts.Encoded:
    """The side's token ids: a query's text cut to `data.query_text_tokens` and to the bucket, a
    candidate's (or a hard negative's) by the candidate-length policy."""
    limits = dict(max_text_tokens=self.query_text_tokens, max_len=self.shapes.max_query_len)
    try:
      if self.lm_only:
        return prompts.encode_chat(self.tok, ex.query_text, n_img, ex.reasoning, self.compact,
                                   **limits)
      if side == "query":
        return prompts.encode_query(self.tok, ex.query_text, n_img, ex.reasoning, self.compact,
                                    **limits)
      # A hard negative is encoded as a candidate that writes nothing before `<|emb|>`.
      text, reasoning = ((ex.cand_text, ex.cand_reasoning) if side == "cand"
                         else (ex.neg_text, None))
      return prompts.encode_candidate(self.tok, text, n_img, self.compact,
                                      may_reason=self.cand_may_reason, reasoning=reasoning,
                                      limits=self.cand_limits)
    except prompts.PromptTooLongError as e:
      field = "query_len" if side == "query" else "cand_len"
      raise ValueError(f"{side}: {e} (data.{field})") from None

  def _arrays(self, ex: TrainExample, inline: dict[str, bytes | None]) -> dict[str, Any]:
    sides = [("query", ex.query_image)]
    if not self.lm_only:
      sides.append(("cand", ex.cand_image))
      if ex.neg_id is not None:
        sides.append(("neg", ex.neg_image))
    for side, image in sides[1:]:
      did = getattr(ex, f"{side}_id")
      if not (getattr(ex, f"{side}_text") or "").strip() and image is None:
        raise ValueError(f"{'hard negative' if side == 'neg' else 'candidate'} {did} has empty "
                         "text and no image")
    out, cuts = {}, []
    for side, image in sides:
      pixels, n_img = self._pixels(image, inline[side])
      enc = self._encode(ex, side, n_img)
      arrays = dict(self._side(enc, n_img), pixels=pixels)
      if side == "neg" or (side == "cand" and not self.cand_may_reason):
        del arrays["target_mask"]
      out.update({f"{side}_{k}": v for k, v in arrays.items()})
      if enc.text_cut:
        cuts.append(f"{side} text cut by {enc.text_cut} tokens")
      if side != "query":
        out[f"{side}_key"] = np.int32(mbeir.did_key(getattr(ex, f"{side}_id")))
    out.update(query_is_reasoning=np.int32(ex.is_reasoning), task_id=np.int32(ex.task_id),
               **{TRUNCATED: f"{ex.example_id} (query {ex.qid}): {', '.join(cuts)}" if cuts
                  else ""})
    return out
