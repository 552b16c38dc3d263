"""The coverage sweep's rules of "equal" (benchmarks/coverage/_compare.py), on tiny NumPy maps.

Each rule is checked both ways: what it must accept, and what it must still refuse.
"""
import numpy as np

from benchmarks.coverage._compare import ATOL, match_maps, softmax_of_scores

MIN = np.finfo(np.float32).min


def _softmax(scores):
    scores = np.asarray(scores, dtype=np.float64)
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def _scores(seed=0, shape=(2, 2, 3, 4)):
    return np.random.RandomState(seed).randn(*shape).astype(np.float32)


def test_probabilities_match_plainly_and_say_nothing():
    probs = _softmax(_scores())
    assert match_maps([probs], [probs.copy()]) == (0, "", "")


def test_other_probabilities_do_not_match():
    unmatched, reason, note = match_maps([_softmax(_scores(0))], [_softmax(_scores(1))])
    assert unmatched == 1 and "captured with other values" in reason and note == ""


def test_scores_reference_matches_its_softmax_and_says_so():
    scores = _scores()
    scores[1, :, :, -1] = MIN  # a padded key, masked the way models mask it
    unmatched, reason, note = match_maps([scores], [_softmax(scores)])
    assert (unmatched, reason) == (0, "")
    assert "softmaxed" in note and "1 of the 1" in note


def test_scores_reference_does_not_match_a_wrong_map():
    scores = _scores()
    wrong = _softmax(scores)
    wrong[0, 0, 0, :2] += np.float32(2 * ATOL) * np.array([1, -1], dtype=np.float32)  # still sums to 1
    unmatched, reason, note = match_maps([scores], [wrong])
    assert unmatched == 1 and note == ""
    assert "no probabilities" in reason and "nor do their softmaxes match" in reason


def test_scores_reference_does_not_match_the_scores_softmaxed_over_another_axis():
    scores = _scores()
    unmatched, _, _ = match_maps([scores], [_softmax(scores.swapaxes(-1, -2)).swapaxes(-1, -2).copy()])
    assert unmatched == 1


def test_probability_reference_is_never_softmaxed():
    probs = _softmax(_scores())
    unmatched, _, note = match_maps([probs], [_softmax(probs)])
    assert unmatched == 1 and note == ""


def test_rows_masked_whole_match_zeros_or_uniform_rows():
    scores = _scores()
    scores[0, 1, 2, :] = -np.inf  # a query that sees no key
    scores[1, 0, 0, :] = MIN
    expected, masked = softmax_of_scores(scores)
    assert masked.sum() == 2
    for fill in (0.0, 0.25):
        captured = expected.copy()
        captured[masked] = fill
        assert match_maps([scores], [captured])[0] == 0, fill


def test_rows_masked_whole_refuse_anything_else():
    scores = _scores()
    scores[0, 1, 2, :] = -np.inf
    expected, masked = softmax_of_scores(scores)
    captured = expected.copy()
    captured[masked] = 0.0
    captured[0, 1, 2, :2] = 0.5  # a distribution, but neither zeros nor uniform
    assert match_maps([scores], [captured])[0] == 1
    captured[0, 1, 2, :] = np.nan
    assert match_maps([scores], [captured])[0] == 1


def test_a_row_is_masked_whole_only_when_every_score_is_masked():
    scores = _scores()
    scores[0, 0, 0, 1:] = MIN  # one key left: its probability is 1, not uniform and not zeros
    expected, masked = softmax_of_scores(scores)
    assert not masked[0, 0, 0]
    captured = expected.copy()
    assert match_maps([scores], [captured])[0] == 0
    captured[0, 0, 0, :] = 0.0
    assert match_maps([scores], [captured])[0] == 1
    captured[0, 0, 0, :] = 0.25
    assert match_maps([scores], [captured])[0] == 1


def test_nan_reference_is_named_not_matched():
    ref = np.full((2, 2, 3, 3), np.nan, dtype=np.float32)
    unmatched, reason, _ = match_maps([ref], [np.full_like(ref, 1 / 3.0)])
    assert unmatched == 1 and "all NaN in the reference" in reason


def test_unit_axes_match():
    ref = _softmax(_scores(shape=(2, 1, 16)))  # timm GlobalContext: (B, 1, HW)
    assert match_maps([ref], [ref.reshape(2, 1, 16, 1)]) == (0, "", "")
    assert match_maps([ref.reshape(2, 1, 16, 1)], [ref]) == (0, "", "")


def test_unit_axes_need_the_same_values_in_the_same_order():
    ref = _softmax(_scores(shape=(2, 1, 16)))
    unmatched, reason, _ = match_maps([ref], [ref[::-1].reshape(2, 1, 16, 1).copy()])
    assert unmatched == 1 and "other values" in reason


def test_unit_axes_do_not_excuse_other_shapes():
    ref = _softmax(_scores(shape=(2, 1, 16)))
    unmatched, reason, _ = match_maps([ref], [ref.reshape(2, 16, 1, 1)[:, :8].copy()])
    assert unmatched == 1 and "not captured" in reason


def test_the_report_names_why_a_known_miss_is_missed_and_only_where_it_is_missed():
    from benchmarks.coverage._report import KNOWN, markdown

    library, name = next(iter(KNOWN))
    section = {"library": library, "versions": {library: "x", "torch": "y"}, "seconds": 60,
               "date": "today", "results": [
                   {"name": name, "status": "missed", "model": "M", "maps": 2, "captured": 1,
                    "unmatched": 1, "reason": "1/2 maps unmatched"},
                   {"name": "other", "status": "missed", "model": "N", "maps": 1, "captured": 0,
                    "unmatched": 1, "reason": "1/1 maps unmatched"}]}
    text = markdown([section])
    row = next(line for line in text.splitlines() if line.startswith("| {} |".format(name)))
    assert KNOWN[(library, name)] in row and "1/2 maps unmatched" in row
    other = next(line for line in text.splitlines() if line.startswith("| other |"))
    assert "**" not in other
    section["results"][0]["status"] = "covered"
    assert KNOWN[(library, name)] not in markdown([section])


def test_heads_merged_into_the_batch_axis_do_not_match():
    ref = _softmax(_scores(shape=(2, 4, 3, 5)))  # (B, H, N, M), as output_attentions returns it
    unmatched, reason, _ = match_maps([ref], [ref.reshape(8, 3, 5)])  # (B*H, N, M): same values
    assert unmatched == 1 and "1 of shape (2,4,3,5) not captured" in reason
    assert "captured shapes: 1x(8,3,5)" in reason
