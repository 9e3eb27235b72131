"""Reliability scores, curriculum selection and annotation queries on synthetic ellipse label maps."""

import numpy as np
import pytest
from scipy import ndimage

from caudo_ray.config import QUERY_STRATEGIES
from caudo_ray.errors import DataError
from caudo_ray.labelling.reliability import BAND_RADIUS, ShapePrior, _shape_features, reliability_scores
from caudo_ray.labelling.selection import annotation_queries, area_strata, diverse_queries, least_reliable, select_top
from caudo_ray.metrics import dice_per_case, spearman

SHAPE = (32, 32)


def ellipse(cy, cx, ry, rx, shape=SHAPE):
    y, x = np.mgrid[: shape[0], : shape[1]]
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1


def soft(mask, tau):
    """Two-class probabilities whose foreground is sigmoid(signed distance / tau): larger tau, blurrier."""
    sdf = ndimage.distance_transform_edt(mask) - ndimage.distance_transform_edt(~mask)
    fg = 1.0 / (1.0 + np.exp(-sdf / tau))
    return np.stack([1.0 - fg, fg]).astype(np.float32)


def corrupt(rng, params, severity):
    """An ellipse label with scale, shape and position errors and, more often when severe, a spurious blob."""
    cy, cx, ry, rx = params
    scale = np.exp(rng.normal(0, 0.35 * severity))
    mask = ellipse(
        cy + rng.normal(0, 6 * severity),
        cx + rng.normal(0, 6 * severity),
        ry * scale,
        rx * scale * np.exp(rng.normal(0, 0.2 * severity)),
    )
    if rng.random() < severity:
        mask |= ellipse(rng.uniform(4, 28), rng.uniform(4, 28), 3 + 4 * severity, 3 + 4 * severity)
    return mask


def ellipse_prior() -> ShapePrior:
    """The shape prior of an elliptical exemplar seen at a few sizes and places, as its augmented views are."""
    views = [ellipse(16 + d, 16 - d, 8 * z, 6 * z) for d in (-2, 0, 2) for z in (0.7, 1.0, 1.3)]
    return ShapePrior.from_labels(np.stack(views).astype(np.uint8), 2)


def test_identical_maps_agree_and_corruption_lowers_reliability():
    truth = ellipse(16, 16, 8, 6)
    p = soft(truth, 0.5)[None]
    prior = ellipse_prior()
    same = reliability_scores(p, p, prior=prior)
    assert same["agreement"][0] == pytest.approx(1.0)
    assert same["shape"][0] > 0.95  # the exemplar's own kind of shape
    assert same["area"][0] == pytest.approx(truth.mean())
    assert 0.0 <= same["reliability"][0] <= 1.0

    assert same["consistency"][0] == 1.0  # no flipped map given
    assert reliability_scores(p, p, p)["consistency"][0] == pytest.approx(1.0)

    shifted = soft(ellipse(20, 19, 8, 6), 0.5)[None]
    blurry = soft(truth, 4.0)[None]
    fragmented = soft(truth | ellipse(4, 4, 2.5, 2.5), 0.5)[None]
    for corrupted in (shifted, blurry, fragmented):
        # The segmenter gives its initial label again on the flipped image; the corrupted one is doubtful.
        assert reliability_scores(p, corrupted, p, prior)["reliability"][0] < reliability_scores(p, p, p, prior)["reliability"][0]
    assert reliability_scores(p, shifted)["agreement"][0] < 1.0
    # A segmenter that answers differently on the flipped image makes even an unmoved label doubtful.
    unstable = reliability_scores(p, p, shifted)
    assert unstable["consistency"][0] < 0.9 and unstable["reliability"][0] < same["reliability"][0]
    assert reliability_scores(p, blurry)["confidence"][0] < same["confidence"][0]
    assert reliability_scores(p, fragmented, prior=prior)["shape"][0] < same["shape"][0]
    # The segmenter's own uncertainty counts too: a blurry initial label with a sharp calibrated one is doubtful.
    assert reliability_scores(blurry, p)["confidence"][0] < same["confidence"][0]


def test_shape_prior_is_learnt_from_the_exemplars_not_assumed():
    truth = ellipse(16, 16, 8, 6)
    ring = truth & ~ellipse(16, 16, 5, 3)
    half = truth & (np.mgrid[:32, :32][1] < 16)
    fragmented = ring | ellipse(4, 4, 2.5, 2.5)
    filled = ellipse(16, 16, 8, 6)
    ring_prior = ShapePrior.from_labels(np.stack([ring, ellipse(15, 17, 8, 6) & ~ellipse(15, 17, 5, 3)]).astype(np.uint8), 2)
    score = lambda prior, m: prior.score(m[None].astype(np.uint8))[0]
    # An elliptical exemplar makes ellipses typical and rings not; a ring exemplar the other way round.
    assert score(ellipse_prior(), truth) > 0.95 and score(ellipse_prior(), ring) < 0.5
    assert score(ring_prior, ring) > 0.95 and score(ring_prior, filled) < 0.5
    assert score(ring_prior, fragmented) < score(ring_prior, ring) - 0.2
    assert score(ellipse_prior(), half) < score(ellipse_prior(), truth)
    # A structure every exemplar view holds is implausible when missing; round trip through a plain dict.
    assert score(ellipse_prior(), np.zeros(SHAPE, bool)) < 0.05
    again = ShapePrior.from_dict(ellipse_prior().to_dict())
    assert again.score(truth[None].astype(np.uint8))[0] == score(ellipse_prior(), truth)


def test_a_batch_is_scored_as_its_maps_one_by_one():
    """Batched scoring (one scipy call per batch) must not let maps touch: components, holes, boundaries and the
    uncertain band of one map stay its own, also where maps touch the border of the frame."""
    rng = np.random.default_rng(3)
    ring = ellipse(16, 16, 8, 6) & ~ellipse(16, 16, 5, 3)
    maps = [
        ring,
        ring | ellipse(4, 4, 2.5, 2.5),  # a ring and a fragment
        ellipse(0, 16, 10, 12),  # cut by the frame's top edge
        np.zeros(SHAPE, bool),  # empty
        np.ones(SHAPE, bool),  # everything
        ellipse(31, 31, 9, 9) & ~ellipse(31, 31, 4, 4),  # a hole open to the frame's corner: no hole
    ] + [corrupt(rng, (16, 16, 8, 6), 0.8) for _ in range(6)]
    p0 = np.stack([soft(m, 0.6) for m in maps])
    p1 = np.stack([soft(m, 1.2) for m in maps[::-1]])
    pf = np.stack([soft(np.roll(m, 2, axis=1), 0.6) for m in maps])
    prior = ShapePrior.from_labels(np.stack([ring, ellipse(15, 17, 8, 6)]).astype(np.uint8), 2)
    batch = reliability_scores(p0, p1, pf, prior)
    for i in range(len(maps)):
        one = reliability_scores(p0[i : i + 1], p1[i : i + 1], pf[i : i + 1], prior)
        for key, values in batch.items():
            assert values[i] == one[key][0], (key, i)
    # Scoring the initial maps as if uncalibrated (the same array twice) takes a shorter path to the same scores.
    unmoved, copied = reliability_scores(p0, p0, pf, prior), reliability_scores(p0, p0.copy(), pf, prior)
    for key, values in unmoved.items():
        np.testing.assert_array_equal(values, copied[key], err_msg=key)


def test_shape_features_match_scipys_per_map_measures():
    """The batched hole filling and components give scipy's 2D answers for each map (4-connectivity)."""
    ring = ellipse(16, 16, 8, 6) & ~ellipse(16, 16, 5, 3)
    maps = np.stack([ring, ring | ellipse(4, 4, 2.5, 2.5), ellipse(0, 16, 10, 12), ellipse(31, 31, 9, 9) & ~ellipse(31, 31, 4, 4)])
    features = _shape_features(maps)
    for mask, (_, largest, hole, log_area) in zip(maps, features):
        filled = ndimage.binary_fill_holes(mask).sum()
        components, _ = ndimage.label(mask)
        assert hole == pytest.approx((filled - mask.sum()) / filled, abs=1e-12)
        assert largest == pytest.approx(np.bincount(components.ravel())[1:].max() / mask.sum(), abs=1e-12)
        assert log_area == pytest.approx(np.log(mask.mean()), abs=1e-12)
    assert features[0, 2] > 0.2 and features[3, 2] == 0.0  # the closed ring has a hole, the open one none
    assert features[1, 1] < 1.0 == features[0, 1]  # the fragment is not in the largest component


def test_empty_maps():
    empty = np.zeros((1, 2) + SHAPE, np.float32)
    empty[:, 0] = 1.0
    scores = reliability_scores(empty, empty, prior=ellipse_prior())
    assert scores["agreement"][0] == 1.0  # both empty agree ...
    assert scores["reliability"][0] < 0.3  # ... but an empty map of a target every exemplar holds is doubtful
    assert scores["area"][0] == 0.0


def test_shape_mismatch_is_a_data_error():
    a = np.full((2, 2, 8, 8), 0.5, np.float32)
    with pytest.raises(DataError, match="calibrated_probs"):
        reliability_scores(a, a[:1])
    with pytest.raises(DataError, match="initial_probs"):
        reliability_scores(a[:, 0], a[:, 0])


def test_each_term_matches_its_definition_written_out_independently():
    """Each term of the reliability against a reference written out here with scipy and numpy, on maps corrupted
    independently of one another (no term can borrow another's signal): consistency is the foreground Dice of the
    calibrated label with the mirrored one; confidence is 1 minus the mean of the larger of the two maps' normalised
    entropies over the pixels within ``BAND_RADIUS`` (a square) of a class boundary of either label; reliability is
    the geometric mean of confidence, shape and consistency. Whether the result ranks labels by true Dice is
    measured on real data (the HC18 smoke in ``test_benchmark_accuracy.py``)."""
    rng = np.random.default_rng(5)
    n = 12
    labels = {k: [corrupt(rng, (16, 16, 8, 6), rng.uniform(0.1, 1.0)) for _ in range(n)] for k in "abf"}
    p0 = np.stack([soft(m, t) for m, t in zip(labels["a"], rng.uniform(0.3, 3.0, n))])
    p1 = np.stack([soft(m, t) for m, t in zip(labels["b"], rng.uniform(0.3, 3.0, n))])
    pf = np.stack([soft(m, 0.5) for m in labels["f"]])
    prior = ellipse_prior()
    scores = reliability_scores(p0, p1, pf, prior)

    def entropy(p):
        p = np.clip(p.astype(np.float64), 1e-8, 1.0)
        return -(p * np.log(p)).sum(0) / np.log(2)

    def boundary(m):
        m = m.astype(np.uint8)
        return ndimage.maximum_filter(m, 3, mode="nearest") != ndimage.minimum_filter(m, 3, mode="nearest")

    square = np.ones((2 * BAND_RADIUS + 1,) * 2, bool)
    for i, (a, b, f) in enumerate(zip(labels["a"], labels["b"], labels["f"])):
        assert scores["consistency"][i] == pytest.approx(2 * (b & f).sum() / (b.sum() + f.sum()), abs=1e-6), i
        band = ndimage.binary_dilation(boundary(a) | boundary(b), structure=square)
        assert band.any()
        h = np.maximum(entropy(p0[i]), entropy(p1[i]))
        assert scores["confidence"][i] == pytest.approx(1.0 - h[band].mean(), abs=1e-5), i
        assert scores["shape"][i] == pytest.approx(prior.score(b[None].astype(np.uint8))[0], abs=1e-6), i
        product = scores["confidence"][i] * scores["shape"][i] * scores["consistency"][i]
        assert scores["reliability"][i] == pytest.approx(product ** (1 / 3), abs=1e-6), i
    # The draw spans each term widely, so a term computed from the wrong maps could not match by luck.
    assert min(np.ptp(scores[k]) for k in ("consistency", "confidence", "shape")) > 0.1
    assert all(v.shape == (n,) and v.dtype == np.float32 for v in scores.values())


def test_select_top_takes_most_reliable_fraction_with_index_tie_break():
    rel = np.array([0.1, 0.9, 0.5, 0.9, np.nan, 0.3, 0.7, 0.2])
    assert select_top(rel, 0.25).tolist() == [1, 3]
    assert select_top(rel, 0.3).tolist() == [1, 3, 6]  # ceil(0.3 * 8) = 3
    assert select_top(np.array([0.5, 0.5, 0.5]), 0.5).tolist() == [0, 1]  # ties: lower index first
    assert select_top(rel, 1.0).tolist() == list(range(8))  # NaN ranks last but is kept at fraction 1
    with pytest.raises(ValueError):
        select_top(rel, 0.0)


def test_stratified_selection_keeps_every_stratum():
    rng = np.random.default_rng(1)
    area = rng.uniform(0.05, 0.5, 40)
    reliability = area + rng.normal(0, 0.02, 40)  # big targets look easy: plain top-k would take only them
    strata = area_strata(area, n_bins=4)
    assert np.bincount(strata).tolist() == [10, 10, 10, 10]
    assert (np.diff(strata[np.argsort(area)]) >= 0).all()

    plain = select_top(reliability, 0.25)
    assert set(strata[plain]) == {3}
    chosen = select_top(reliability, 0.25, strata=strata)
    assert set(strata[chosen]) == {0, 1, 2, 3}
    for s in range(4):
        members = np.flatnonzero(strata == s)
        best = members[np.argsort(-reliability[members])[:3]]  # ceil(0.25 * 10)
        assert set(chosen[strata[chosen] == s]) == set(best)
    assert (np.diff(chosen) > 0).all()


def test_annotation_queries_least_reliable_ascending():
    ids = [f"case{i}" for i in range(6)]
    rel = np.array([0.8, 0.2, 0.5, 0.2, 0.9, 0.1])
    queries = annotation_queries(ids, {"reliability": rel}, 3)
    assert [q.case_id for q in queries] == ["case5", "case1", "case3"]
    assert [q.reliability for q in queries] == pytest.approx([0.1, 0.2, 0.2])
    assert [q.group for q in queries] == ["case5", "case1", "case3"]  # no groups: each case its own
    assert len(annotation_queries(ids, {"reliability": rel}, 100)) == 6
    assert annotation_queries(ids, {"reliability": rel}, 0) == []
    with pytest.raises(DataError, match="case_ids"):
        annotation_queries(ids[:2], {"reliability": rel}, 1)
    with pytest.raises(ValueError, match="unknown query strategy 'margin'"):
        annotation_queries(ids, {"reliability": rel}, 1, strategy="margin")


def test_entropy_queries_ask_for_the_most_uncertain_first():
    ids = [f"case{i}" for i in range(5)]
    scores = {"reliability": np.array([0.1, 0.9, 0.5, 0.3, 0.7]), "entropy": np.array([0.05, 0.40, 0.40, 0.10, np.nan])}
    queries = annotation_queries(ids, scores, 3, strategy="entropy")
    # NaN entropy (a case the segmenter gave nothing finite for) first, then highest first, ties by index.
    assert [q.case_id for q in queries] == ["case4", "case1", "case2"]
    assert queries[1].entropy == pytest.approx(0.40)
    with pytest.raises(DataError, match="entropy"):
        annotation_queries(ids, {"reliability": scores["reliability"]}, 1, strategy="entropy")


def test_random_queries_are_seeded_distinct_and_not_the_reliability_order():
    ids = [f"case{i:02d}" for i in range(40)]
    rel = np.linspace(0.0, 1.0, 40)
    first = [q.case_id for q in annotation_queries(ids, {"reliability": rel}, 8, strategy="random", seed=(3, 1))]
    again = [q.case_id for q in annotation_queries(ids, {"reliability": rel}, 8, strategy="random", seed=(3, 1))]
    other = [q.case_id for q in annotation_queries(ids, {"reliability": rel}, 8, strategy="random", seed=(3, 2))]
    assert first == again and first != other
    assert len(set(first)) == 8
    assert first != ids[:8]  # the least reliable eight, in order: what the reliability strategy asks


def test_diverse_queries_take_one_case_per_group_until_every_group_is_asked():
    groups = np.array(["a", "a", "a", "b", "b", "c"])
    rel = np.array([0.10, 0.20, 0.30, 0.15, 0.05, 0.90])
    assert diverse_queries(rel, groups, 3).tolist() == [4, 0, 5]  # b's least reliable, then a's, then c's
    # k beyond the groups: a second pass over each group's next least reliable case, least reliable first.
    assert diverse_queries(rel, groups, 5).tolist() == [4, 0, 5, 3, 1]
    assert diverse_queries(rel, groups, 10).tolist() == [4, 0, 5, 3, 1, 2]
    # The plain ranking would ask group a and b twice within its first four.
    assert least_reliable(rel, 4).tolist() == [4, 0, 3, 1]
    with pytest.raises(DataError, match="groups"):
        diverse_queries(rel, groups[:2], 1)


def test_queries_never_come_from_a_labelled_group():
    ids = [f"p{p}_s{s}" for p in range(3) for s in range(3)]
    groups = [f"p{p}" for p in range(3) for _ in range(3)]
    rel = np.array([0.0, 0.1, 0.2, 0.5, 0.6, 0.7, 0.3, 0.4, 0.8])
    entropy = 1.0 - rel
    for strategy in QUERY_STRATEGIES:
        queries = annotation_queries(
            ids, {"reliability": rel, "entropy": entropy}, 9, strategy=strategy, groups=groups, labelled_groups={"p0"}, seed=0
        )
        assert {q.group for q in queries} == {"p1", "p2"}, strategy  # p0, the exemplar's patient, holds the worst
        assert len(queries) == 6 and len({q.case_id for q in queries}) == 6, strategy
    reliability = annotation_queries(ids, {"reliability": rel}, 2, groups=groups, labelled_groups={"p0"})
    assert [q.case_id for q in reliability] == ["p2_s0", "p2_s1"]
    diverse = annotation_queries(ids, {"reliability": rel}, 2, strategy="diverse", groups=groups, labelled_groups={"p0"})
    assert [q.case_id for q in diverse] == ["p2_s0", "p1_s0"]


def test_an_answered_group_stays_open_and_diverse_asks_it_last():
    # p2_s0 was answered (it left the candidates); p2's other slices are still new slices.
    ids = ["p1_s0", "p1_s1", "p2_s1", "p2_s2", "p3_s0"]
    groups = ["p1", "p1", "p2", "p2", "p3"]
    scores = {"reliability": np.array([0.5, 0.6, 0.1, 0.2, 0.7])}
    plain = annotation_queries(ids, scores, 2, groups=groups, answered_groups=["p2"])
    assert [q.case_id for q in plain] == ["p2_s1", "p2_s2"]  # the least reliable, wherever they are
    diverse = annotation_queries(ids, scores, 4, strategy="diverse", groups=groups, answered_groups=["p2"])
    # p1 and p3 were never answered: asked first; p2, answered once, joins the second pass with p1's second case.
    assert [q.case_id for q in diverse] == ["p1_s0", "p3_s0", "p2_s1", "p1_s1"]
    assert diverse_queries(scores["reliability"], groups, 2, asked={"p2": 1}).tolist() == [0, 4]


def test_dice_per_case_and_spearman():
    truth = np.stack([ellipse(16, 16, 8, 6), ellipse(16, 16, 8, 6), np.zeros(SHAPE, bool)]).astype(np.uint8)
    pred = truth.copy()
    pred[1] = ellipse(16, 24, 8, 6)
    dice = dice_per_case(pred, truth, 2)
    assert dice[0] == 1.0 and dice[2] == 1.0 and 0.0 < dice[1] < 1.0
    three = np.zeros((1,) + SHAPE, np.uint8)
    three[0, 8:16, 8:16] = 1
    assert dice_per_case(three, three, 3)[0] == 1.0  # class 2 absent from both counts 1
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))
