"""Weak-to-strong consistency training (UniMatch): determinism and resume, CutMix alignment, feature perturbation,
bad inputs, the augmentation halves it uses, and a regression pin of the one phantom setting where it measurably beat
exemplar-only training (it does not in general: over seeds the gain ranges from +0.05 to -0.14)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import RecordingCheckpoint

from caudo_ray.config import ConfigError, ConsistencyConfig, SegmenterConfig, load_config
from caudo_ray.data.phantom import phantom_case
from caudo_ray.errors import DataError
from caudo_ray.metrics import dice_per_case
from caudo_ray.networks.segmenter import build_segmenter, predict, predict_tensor
from caudo_ray.training.consistency import (
    check_anchor,
    class_balance_weights,
    class_thresholds,
    consistency_views,
    cutmix,
    cutmix_boxes,
    encoder_taps,
    feature_perturbation,
    masked_dice_ce,
    rampup_weight,
    strong_profile,
    weak_profile,
)
from caudo_ray.training.hooks import TrainingHooks
from caudo_ray.training.inputs import RoundInputs
from caudo_ray.training.segmenter import train_segmenter
from caudo_ray.transforms.augment import augment, exemplar_profile, intensity_views, spatial_views

torch.set_num_threads(1)

SIZE = 32
SEG = SegmenterConfig(channels=(4, 8, 16), strides=(2, 2), num_res_units=1, batch_size=4, learning_rate=5e-3)
# UniMatch as published (caudo's guards off), as the ``consistency`` peer trains.
CONS = ConsistencyConfig(unlabelled_batch_size=3).peer()


def phantoms(seeds, size=SIZE):
    cases = [phantom_case(s, (size, size)) for s in seeds]
    return np.stack([c[0] for c in cases]), np.stack([c[1] for c in cases])


@pytest.fixture(scope="module")
def data():
    images, labels = phantoms(range(9))
    return RoundInputs(images[:1], labels[:1]), images[1:]


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def train_consistency(model, inputs, pool, *, seg_cfg, cfg, **kwargs):
    """The ``consistency`` method: train_segmenter on the labelled set with the pool's consistency terms."""
    pooled = RoundInputs(inputs.exemplar_images, inputs.exemplar_labels, inputs.pseudo_images, inputs.pseudo_labels, inputs.pseudo_weights, pool)
    return train_segmenter(model, pooled, cfg=seg_cfg, consistency=cfg, **kwargs)


def test_same_seed_same_weights_and_resume_continues_exactly(data, tmp_path):
    inputs, pool = data
    kwargs = {"iterations": 6, "seg_cfg": SEG, "cfg": CONS, "seed": 3}
    checkpoint = RecordingCheckpoint(tmp_path / "train.pt")

    full = build_segmenter(SEG, 2, seed=0)
    whole = train_consistency(full, inputs, pool, hooks=TrainingHooks(checkpoint=checkpoint, every=3), **kwargs)
    assert len(whole.losses) == 6 and whole.iterations == 6 and all(np.isfinite(whole.losses))
    assert sorted(checkpoint.states) == [3, 6] and checkpoint.states[3]["phase"] == "segmenter"

    again = build_segmenter(SEG, 2, seed=0)
    assert train_consistency(again, inputs, pool, **kwargs).losses == whole.losses
    for a, b in zip(weights(full), weights(again)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    resumed = build_segmenter(SEG, 2, seed=0)
    state = checkpoint.states[3]
    resumed.load_state_dict(state["segmenter"])
    tail = train_consistency(resumed, inputs, pool, resume=state, **kwargs)
    assert tail.losses == whole.losses[3:]
    for a, b in zip(weights(full), weights(resumed)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    other = build_segmenter(SEG, 2, seed=0)
    assert train_consistency(other, inputs, pool, **{**kwargs, "seed": 4}).losses != whole.losses


def test_labelled_views_are_exemplar_only_trainings(data):
    """Iteration i draws the very exemplar views train_segmenter draws: the methods differ only by the pool terms."""
    inputs, pool = data
    net = build_segmenter(SEG, 2, seed=0)
    zero = ConsistencyConfig(unlabelled_batch_size=2, strong_weight=0.0, feature_weight=0.0).peer()
    ours = train_consistency(net, inputs, pool, iterations=3, seg_cfg=SEG, cfg=zero, seed=5)
    plain = build_segmenter(SEG, 2, seed=0)
    theirs = train_segmenter(plain, inputs, iterations=3, cfg=SEG, seed=5)
    # With the pool terms weighted 0 the loss is half of exemplar-only DiceCE, and the Adam steps (scale-free) match.
    # (Compared by outputs: conv biases under instance norm get only rounding noise as gradient, which Adam
    # scales up differently in the two runs, yet they cancel in the norm.)
    np.testing.assert_allclose(np.array(ours.losses) * 2, theirs.losses, rtol=1e-5)
    np.testing.assert_allclose(predict(net, pool).probs, predict(plain, pool).probs, atol=2e-3)


def test_cutmix_pastes_image_and_target_from_the_same_source():
    u, h, w = 6, 20, 24
    boxes = cutmix_boxes(u, (h, w), 1.0, np.random.default_rng(0))
    assert boxes.shape == (u, h, w) and boxes.any(axis=(1, 2)).all()
    for box in boxes:  # one axis-aligned rectangle covering 2-40% of the frame
        rows, cols = np.flatnonzero(box.any(1)), np.flatnonzero(box.any(0))
        assert box[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all() and box.sum() == len(rows) * len(cols)
        assert 0.01 <= box.mean() <= 0.45
    assert not cutmix_boxes(u, (h, w), 0.0, np.random.default_rng(0)).any()

    # Every image, label and confidence map carries its source's index: the mixed ones must agree pixel by pixel.
    base = np.arange(u, dtype=np.float32)[:, None, None] * np.ones((u, h, w), np.float32)
    mixed_in = base + 100
    img, lab, conf = cutmix(
        boxes,
        (base, mixed_in),
        (torch.from_numpy(base).long(), torch.from_numpy(mixed_in).long()),
        (torch.from_numpy(base / 1000), torch.from_numpy(mixed_in / 1000)),
    )
    np.testing.assert_array_equal(lab.numpy(), img.astype(np.int64))
    np.testing.assert_allclose(conf.numpy() * 1000, img, rtol=1e-6)
    np.testing.assert_array_equal(img >= 100, boxes)


def test_class_thresholds_scale_with_each_class_mean_confidence():
    target = torch.tensor([[0, 0, 0, 1], [1, 2, 2, 0]])
    confidence = torch.tensor([[1.0, 0.9, 0.8, 0.6], [0.4, 0.3, 0.5, 0.9]])
    fixed = class_thresholds(target, confidence, ConsistencyConfig(threshold=0.9, class_thresholds=False), 4)
    torch.testing.assert_close(fixed, torch.full((4,), 0.9))
    # Mean confidence: background 0.9, class 1 0.5, class 2 0.4; class 3 has no pixel and keeps the threshold.
    tau = class_thresholds(target, confidence, ConsistencyConfig(threshold=0.9), 4)
    torch.testing.assert_close(tau, torch.tensor([0.9, 0.5, 0.4, 0.9]), rtol=0, atol=1e-6)
    assert not load_config({"consistency": {"class_thresholds": False}}).consistency.class_thresholds


def test_views_of_an_iteration_are_aligned_with_their_targets(data):
    _, pool = data
    net = build_segmenter(SEG, 2, seed=1)
    cfg = ConsistencyConfig(unlabelled_batch_size=4, cutmix_prob=1.0).peer()
    v = consistency_views(net, pool, cfg=cfg, seg_cfg=SEG, seeds=(1, 2, 3, 4, 5))

    # The teacher labels are the model's own argmax / max softmax on the weak views.
    probs, _ = predict_tensor(net, torch.from_numpy(np.concatenate([v.weak, v.mix_weak])).unsqueeze(1))
    conf, target = probs.max(1)
    torch.testing.assert_close(torch.cat([v.weak_confidence, v.mix_confidence]), conf)
    assert torch.equal(torch.cat([v.weak_target, v.mix_target]), target)
    torch.testing.assert_close(v.thresholds, torch.full((2,), cfg.threshold))

    for k in range(2):
        box = torch.from_numpy(v.boxes[k])
        assert v.boxes[k].any(axis=(1, 2)).all()  # cutmix_prob 1: every view mixed
        # Inside the box, image and target both come from the second batch; outside, both from the first.
        np.testing.assert_array_equal(v.strong[k][v.boxes[k]], v.mix_strong[k][v.boxes[k]])
        np.testing.assert_array_equal(v.strong[k][~v.boxes[k]], v.strong_unmixed[k][~v.boxes[k]])
        assert torch.equal(v.targets[k][box], v.mix_target[box]) and torch.equal(v.targets[k][~box], v.weak_target[~box])
        assert torch.equal(v.confidences[k][box], v.mix_confidence[box])
        assert torch.equal(v.confidences[k][~box], v.weak_confidence[~box])
    # The strong views are intensity views of the weak ones (same geometry); the two differ.
    redo = intensity_views(np.concatenate([v.weak, v.mix_weak]), strong_profile(SEG), 3)
    np.testing.assert_array_equal(redo[:4], v.strong_unmixed[0])
    assert not np.array_equal(v.strong_unmixed[0], v.strong_unmixed[1])


def test_anchored_views_teach_only_where_the_teacher_agrees_with_the_anchor(data):
    _, pool = data
    net = build_segmenter(SEG, 2, seed=1)
    cfg = ConsistencyConfig(unlabelled_batch_size=4, cutmix_prob=1.0, anchored=True)
    seeds = (1, 2, 3, 4, 5)
    free = consistency_views(net, pool, cfg=cfg, seg_cfg=SEG, seeds=seeds)
    anchor = (pool > np.median(pool)).astype(np.uint8)  # any label map: agreement is per pixel
    v = consistency_views(net, pool, cfg=cfg, seg_cfg=SEG, seeds=seeds, anchor_labels=anchor)
    np.testing.assert_array_equal(v.weak, free.weak)  # the anchor is warped with the weak views, not redrawn
    assert torch.equal(v.weak_target, free.weak_target)

    rng = np.random.default_rng(seeds[0])
    idx, mix_idx = rng.choice(len(pool), 4, replace=False), rng.choice(len(pool), 4, replace=False)
    _, warped = spatial_views(pool, np.concatenate([idx, mix_idx]), weak_profile(cfg), seeds[1], anchor)
    agree = torch.cat([v.weak_target, v.mix_target]) == torch.from_numpy(warped).long()
    assert 0 < float(agree.float().mean()) < 1
    conf, free_conf = torch.cat([v.weak_confidence, v.mix_confidence]), torch.cat([free.weak_confidence, free.mix_confidence])
    assert torch.equal(conf[agree], free_conf[agree]) and bool((conf[~agree] == 0).all())
    for k in range(2):  # the strong views' confidences are CutMixed from the anchored ones
        box = torch.from_numpy(v.boxes[k])
        assert torch.equal(v.confidences[k][~box], v.weak_confidence[~box])

    for labels, problem in [(None, "calibrated label"), (anchor[:, :8], "shape"), (anchor * 2, "class 2")]:
        with pytest.raises(DataError, match=f"pool_labels.*{problem}"):
            check_anchor(labels, pool.shape, 2)
    inputs = RoundInputs(data[0].exemplar_images, data[0].exemplar_labels, pool_images=pool)
    with pytest.raises(DataError, match="pool_labels"):  # anchored training without the previous round's labels
        train_segmenter(net, inputs, iterations=1, cfg=SEG, seed=0, consistency=cfg)
    on = ConsistencyConfig(enabled=True, anchored=True)
    assert not on.online_in_round(0) and on.online_in_round(1)
    assert ConsistencyConfig(anchored=False).online_in_round(0) and not ConsistencyConfig(enabled=False).online_in_round(1)


def test_intensity_views_keep_the_geometry_and_spatial_views_are_augments_geometry():
    images, labels = phantoms(range(20, 24))
    views = intensity_views(images, strong_profile(SEG), 7)
    assert views.shape == images.shape and views.dtype == np.float32
    assert views.min() >= 0.0 and views.max() <= 1.0 and not np.allclose(views, images, atol=0.05)
    # No pixel moves: where the image was structured, the view is still correlated with it; the labels still fit.
    for img, view in zip(images, views):
        assert np.corrcoef(img.ravel(), view.ravel())[0, 1] > 0.3

    # spatial_views draws exactly the spatial half of augment: the same seed gives augment's very labels.
    profile = exemplar_profile(SEG)
    sources = np.array([0, 1, 2, 3, 1])
    _, aug_labels = augment(images, labels, sources, profile, 11)
    warped, warped_labels = spatial_views(images, sources, profile, 11, labels=labels)
    np.testing.assert_array_equal(warped_labels, aug_labels)
    assert warped.dtype == np.float32 and warped.min() >= 0.0
    with pytest.raises(ValueError, match="area_limits"):
        spatial_views(images, sources, profile, 11)


def test_feature_perturbation_touches_only_the_tail_and_leaves_no_hooks():
    net = build_segmenter(SEG, 2, seed=0).eval()
    skips, bottom = encoder_taps(net)
    assert len(skips) == len(SEG.channels) - 1
    x = torch.from_numpy(phantoms(range(30, 34))[0]).unsqueeze(1)
    with torch.no_grad():
        clean = net(x)
        with feature_perturbation(net, 0.5, 2, torch.Generator().manual_seed(0)):
            perturbed = net(x)
        with feature_perturbation(net, 0.0, 2, torch.Generator().manual_seed(0)):
            untouched = net(x)
    torch.testing.assert_close(perturbed[:2], clean[:2])
    assert not torch.allclose(perturbed[2:], clean[2:])
    torch.testing.assert_close(untouched, clean)
    assert all(not m._forward_hooks for m in [*skips, bottom])


def test_masked_loss_ignores_unconfident_pixels():
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    target = torch.randint(0, 3, (2, 8, 8))
    none = masked_dice_ce(logits, target, torch.zeros(2, 8, 8, dtype=torch.bool))
    none.backward()
    assert float(none.detach()) == pytest.approx(0.0, abs=1e-6) and float(logits.grad.abs().max()) == pytest.approx(0.0, abs=1e-6)
    # A confident pixel's label decides: logits that agree with it score lower than logits that do not.
    agree = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 10
    conf = torch.ones(2, 8, 8, dtype=torch.bool)
    assert float(masked_dice_ce(agree, target, conf)) < 0.01 < float(masked_dice_ce(-agree, target, conf))


def test_class_balance_gives_each_class_its_reference_share_of_the_teaching_weight():
    # Reference: 60 background, 30 class 1, 10 class 2 pixels; the teaching pixels: 50 background, 5 class 1, none
    # of class 2 (the teacher is eroding class 1).
    reference = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    kept = torch.tensor([0] * 50 + [1] * 5)
    w = class_balance_weights(kept, reference, 4)
    # Shares among the taught classes: reference 60/90 and 30/90, kept 50/55 and 5/55.
    torch.testing.assert_close(w, torch.tensor([(60 / 90) / (50 / 55), (30 / 90) / (5 / 55), 1.0, 1.0]), rtol=1e-6, atol=0)
    assert float((w[kept]).sum()) == pytest.approx(len(kept))  # redistributed, not added
    assert float(class_balance_weights(torch.tensor([0] * 999 + [1]), torch.tensor([0, 1]), 2)[1]) == 10.0  # capped

    # In the loss, the weights scale each class's pixels' CE; the Dice term and the mask stay as they were.
    logits = torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 8, 8))
    conf = torch.rand(2, 8, 8) > 0.3
    ones = masked_dice_ce(logits, target, conf, torch.ones(3))
    torch.testing.assert_close(ones, masked_dice_ce(logits, target, conf))
    ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    only_1 = (ce * conf * (target == 1)).sum() / conf.numel()
    torch.testing.assert_close(masked_dice_ce(logits, target, conf, torch.tensor([1.0, 3.0, 1.0])) - ones, 2 * only_1)


def test_class_balanced_views_weigh_by_the_anchor_labels_or_the_teacher(data):
    _, pool = data
    net = build_segmenter(SEG, 2, seed=1)
    seeds = (1, 2, 3, 4, 5)
    anchor = (pool > np.median(pool)).astype(np.uint8)
    assert consistency_views(net, pool, cfg=ConsistencyConfig(unlabelled_batch_size=4, class_balance=False), seg_cfg=SEG, seeds=seeds).class_weights is None
    cfg = ConsistencyConfig(unlabelled_batch_size=4, threshold=0.5, class_thresholds=False)  # a fixed 0.5 mask, counted below
    for labels in (anchor, None):
        v = consistency_views(net, pool, cfg=cfg, seg_cfg=SEG, seeds=seeds, anchor_labels=labels)
        target, conf = torch.cat([v.weak_target, v.mix_target]), torch.cat([v.weak_confidence, v.mix_confidence])
        if labels is None:
            reference = target
        else:
            rng = np.random.default_rng(seeds[0])
            idx = np.concatenate([rng.choice(len(pool), 4, replace=False), rng.choice(len(pool), 4, replace=False)])
            reference = torch.from_numpy(spatial_views(pool, idx, weak_profile(cfg), seeds[1], labels)[1]).long()
        torch.testing.assert_close(v.class_weights, class_balance_weights(target[conf >= 0.5], reference, 2))


def test_rampup_weights_the_pool_terms_in_gradually():
    assert rampup_weight(0, 100, 0.0) == 1.0
    assert rampup_weight(0, 100, 0.2) == pytest.approx(np.exp(-5.0))
    assert rampup_weight(10, 100, 0.2) == pytest.approx(np.exp(-1.25))
    assert rampup_weight(20, 100, 0.2) == rampup_weight(99, 100, 0.2) == 1.0


def test_bad_inputs_name_the_argument(data):
    inputs, pool = data
    net = build_segmenter(SEG, 2)
    kwargs = {"iterations": 1, "seg_cfg": SEG, "cfg": CONS, "seed": 0}
    cases = [
        (inputs, pool[:, :16], "pool_images"),  # size differs from the exemplars'
        (inputs, (pool * 255).astype(np.uint8), "pool_images"),  # not float
        (inputs, pool[:0], "pool_images"),  # empty
        (inputs, pool[0], "pool_images"),  # not (N, H, W)
        (inputs, np.where(pool > 0.5, np.nan, pool), "pool_images"),
        (RoundInputs(inputs.exemplar_images, inputs.exemplar_labels * 2), pool, "exemplar_labels"),  # class 2 of 2
        (RoundInputs(inputs.exemplar_images, inputs.exemplar_labels[:, :16]), pool, "exemplar_labels"),
    ]
    for bad_inputs, bad_pool, name in cases:
        with pytest.raises(DataError, match=name):
            train_consistency(net, bad_inputs, bad_pool, **kwargs)
    with pytest.raises(DataError, match="pool_images"):  # consistency without the pool's images
        train_segmenter(net, inputs, iterations=1, cfg=SEG, seed=0, consistency=CONS)


def test_config_section_is_validated_naming_the_key():
    cfg = load_config({"consistency": {"threshold": 0.9, "weak_zoom": [0.9, 1.1]}})
    assert cfg.consistency.threshold == 0.9 and cfg.consistency.weak_zoom == (0.9, 1.1) and cfg.consistency.enabled
    for key, value in [("threshold", 1.5), ("feature_dropout", 1.0), ("unlabelled_batch_size", 0), ("weak_zoom", [1.2, 0.8])]:
        with pytest.raises(ConfigError, match=f"consistency.{key}"):
            load_config({"consistency": {key: value}})


@pytest.mark.slow
def test_regression_pin_one_seed_where_consistency_beat_exemplar_only_on_phantoms():
    """A regression pin, not evidence of a general gain: same network, labelled set, exemplar views and iterations;
    consistency also learns from 40 unlabelled frames.

    48x48 phantoms, four labelled frames, 500 iterations: the cheapest setting where it beat exemplar-only training
    on seeds 0-3. Seed s of this construction takes as labelled frames the first of phantoms 1000 + 10 s + 0..9
    whose target covers ~10% of the frame plus phantoms 3000 + 10 s + 0..2, and as pool 2000 + 100 s + 0..39.
    Test Dice gains, seeds 0-5: +0.026 (this one: 0.630 against 0.604), +0.013, +0.052, +0.008, -0.040, -0.139.
    So this pins one measured win of the method, deterministic on CPU, and guards it against regressions; it is
    not evidence that consistency beats exemplar-only on phantoms in general (it does not: seeds 4 and 5).
    """
    seg = SegmenterConfig(channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=1, batch_size=8, learning_rate=5e-3)
    labelled = RoundInputs(*phantoms([1000, 3000, 3001, 3002], size=48))
    pool, _ = phantoms(range(2000, 2040), size=48)
    test_images, test_labels = phantoms(range(5000, 5024), size=48)

    def test_dice(net):
        pred = predict(net, test_images, return_features=False).probs.argmax(1).astype(np.uint8)
        return float(dice_per_case(pred, test_labels, 2).mean())

    exemplar_only = build_segmenter(seg, 2, seed=0)
    train_segmenter(exemplar_only, labelled, iterations=500, cfg=seg, seed=0)
    consistency = build_segmenter(seg, 2, seed=0)
    train_consistency(consistency, labelled, pool, iterations=500, seg_cfg=seg, cfg=ConsistencyConfig().peer(), seed=0)
    base, ours = test_dice(exemplar_only), test_dice(consistency)
    assert base > 0.5, base  # a working exemplar-only segmenter is the bar, not a broken one
    assert ours > base, (base, ours)
