"""`python -m trace_jax.eval` end to end on a briefly trained demo model, and its QPS timing."""

import json
import os

import numpy as np

from configs import demo
from trace_jax.eval import mbeir_eval
from trace_jax.train import loop


def test_evaluate_writes_scores_embeddings_and_lists(tmp_path):
  config = demo.get_config("steps=2")
  config.data.root = str(tmp_path / "world")
  config.data.world_train, config.data.world_test = 48, 8
  config.data.global_batch = 16
  config.eval.tasks = ("synthetic_task0", "synthetic_task7")
  config.eval.max_new_tokens = 3
  config.eval.qps_queries = 4
  config.eval.batch_size = 8
  workdir = str(tmp_path / "run")
  loop.run(config, workdir)
  report = mbeir_eval.evaluate(config, workdir)

  with open(os.path.join(workdir, "eval", "results.json")) as f:
    saved = json.load(f)
  assert saved["average"] == report["average"] and saved["step"] == 2
  assert set(saved["tasks"]) == {"synthetic_task0", "synthetic_task7"}
  for name, res in saved["tasks"].items():
    assert res["k"] == 5 and res["num_queries"] == 8 and 0 <= res["recall"] <= 1
    assert 0 <= res["reason_rate"] <= 1 and res["recall@1"] <= res["recall@5"] <= res["recall@10"]
    q = np.load(os.path.join(workdir, "eval", f"{name}_queries.npy"))
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
    with open(os.path.join(workdir, "eval", f"{name}_retrieved.jsonl")) as f:
      lines = [json.loads(x) for x in f]
    assert len(lines) == 8 and all(len(x["ranked"]) == 10 for x in lines)
  assert set(saved["qps"]) == {"adaptive", "direct", "always_reason"}
  assert os.path.exists(os.path.join(workdir, "eval", "results.md"))

  config.eval.pool, config.eval.qps_queries = "global", 0
  union = mbeir_eval.evaluate(config, workdir)
  assert union["pool"] == "global" and set(union["tasks"]) == set(saved["tasks"])


class _ClockEncoder:
  """Stands in for the encoder: records the modes it runs and advances a fake clock by the mode's
  cost times the pass's number (counting every call from 1), so each pass takes its own time."""

  def __init__(self, cost):
    self.cost, self.calls, self.now = cost, [], 0.0

  def encode_queries(self, items, mode):
    self.now += self.cost[mode] * (1 + len(self.calls))
    self.calls.append(mode)


def test_mode_times_alternates_modes_and_pairs_rounds(monkeypatch):
  enc = _ClockEncoder({"adaptive": 2.0, "direct": 1.0, "always_reason": 5.0})
  monkeypatch.setattr(mbeir_eval.time, "perf_counter", lambda: enc.now)
  times = mbeir_eval.mode_times(enc, ["q"] * 10, rounds=3)
  # A warm-up pass of each mode, then each round every mode, the order rotating.
  assert enc.calls == ["adaptive", "direct", "always_reason",
                       "adaptive", "direct", "always_reason",
                       "direct", "always_reason", "adaptive",
                       "always_reason", "adaptive", "direct"]
  # The first three passes are the warm-up; pass i (from 1) took cost[mode] * i.
  assert times == {"adaptive": [2.0 * 4, 2.0 * 9, 2.0 * 11],
                   "direct": [1.0 * 5, 1.0 * 7, 1.0 * 12],
                   "always_reason": [5.0 * 6, 5.0 * 8, 5.0 * 10]}
  assert mbeir_eval.best_qps(times, 10) == {"adaptive": 10 / 8.0, "direct": 10 / 5.0,
                                            "always_reason": 10 / 30.0}
