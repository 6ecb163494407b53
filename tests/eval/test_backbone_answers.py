"""backbone_answers: counts of a backbone's answers against the teacher's text (answers from a
built backbone: tests/train/test_backbone.py)."""

from trace_jax.eval import backbone_answers

TEACHER = "red circle top left. circle moves to center. red circle center"


def test_count_checks_the_answer_and_the_whole_text():
  written = [TEACHER,  # All right.
             "red circle top left. circle moves to top center. red circle center",  # Answer only.
             "red circle top left. circle moves to center. blue circle center",  # Neither.
             "red circle center"]  # The answer, no reasoning.
  assert backbone_answers.count(written, [TEACHER] * 4) == {
    "queries": 4, "answers_right": 3, "texts_right": 1}
