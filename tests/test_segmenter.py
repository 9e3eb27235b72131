"""Segmenter: shapes, the feature hook, augmentation, weighted and resumable training, on tiny ellipse images."""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import RecordingCheckpoint

from caudo_ray.config import SegmenterConfig
from caudo_ray.errors import DataError
from caudo_ray.metrics import dice_per_case
from caudo_ray.networks.segmenter import build_segmenter, feature_channels, feature_module, predict, predict_tensor
from caudo_ray.training.hooks import TrainingHooks
from caudo_ray.training.inputs import RoundInputs
from caudo_ray.training.segmenter import train_segmenter
from caudo_ray.transforms.augment import augment_views

SIZE = 32
CFG = SegmenterConfig(channels=(4, 8, 16), strides=(2, 2), num_res_units=1, batch_size=8, learning_rate=5e-3)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # Tensors this small gain nothing from intra-op threads, and on a busy 2-core machine the thread
    # contention makes each step several times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def ellipse_case(rng, cy, cx, ry, rx, inner=False):
    """An ultrasound-like image: bright ellipse on a dark, noisy background; label 1 inside (2 in a core)."""
    y, x = np.mgrid[:SIZE, :SIZE]
    r = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2
    label = (r < 1).astype(np.uint8)
    if inner:
        label[r < 0.3] = 2
    image = 0.15 + 0.55 * (r < 1) + 0.25 * np.exp(-((np.sqrt(r) - 1) ** 2) / 0.02) + rng.normal(0, 0.06, (SIZE, SIZE))
    image = (image - image.min()) / (image.max() - image.min())
    return image.astype(np.float32), label


def exemplar():
    image, label = ellipse_case(np.random.default_rng(0), 16, 16, 7, 5)
    return image[None], label[None]


def test_predict_shapes_and_hook_is_removed():
    model = build_segmenter(CFG, 3, seed=0)
    images = np.random.default_rng(0).random((5, SIZE, SIZE), dtype=np.float32)
    first = predict(model, images, batch_size=2)
    assert first.probs.shape == (5, 3, SIZE, SIZE) and first.probs.dtype == np.float32
    np.testing.assert_allclose(first.probs.sum(1), 1.0, atol=1e-5)
    assert first.features.shape == (5, feature_channels(CFG), SIZE // 2, SIZE // 2)
    assert first.features.dtype == np.float32
    assert len(feature_module(model)._forward_hooks) == 0

    second = predict(model, images, batch_size=2)
    np.testing.assert_array_equal(first.probs, second.probs)
    np.testing.assert_array_equal(first.features, second.features)
    assert len(feature_module(model)._forward_hooks) == 0
    # Batching changes only float rounding.
    np.testing.assert_allclose(predict(model, images, batch_size=5).probs, first.probs, atol=1e-5)
    assert predict(model, images, return_features=False).features is None

    # The features are the hooked module's own output, not a recomputation.
    x = torch.from_numpy(images[:2]).unsqueeze(1)
    probs, feats = predict_tensor(model, x)
    with torch.no_grad():
        direct = feature_module(model)(model.model[0](x))
    torch.testing.assert_close(feats, direct)
    assert probs.shape == (2, 3, SIZE, SIZE)

    with pytest.raises(RuntimeError):  # wrong channel count fails inside the forward pass ...
        predict_tensor(model, torch.zeros(1, 2, SIZE, SIZE))
    assert len(feature_module(model)._forward_hooks) == 0  # ... and the hook is still removed


def test_feature_channels_match_other_depths():
    for channels, strides in (((8, 16), (2,)), ((4, 8, 16, 32), (2, 2, 2))):
        cfg = SegmenterConfig(channels=channels, strides=strides)
        pred = predict(build_segmenter(cfg, 2), np.zeros((1, SIZE, SIZE), np.float32))
        assert pred.features.shape[1] == feature_channels(cfg)


def test_build_seed_gives_identical_weights():
    a, b = build_segmenter(CFG, 2, seed=3), build_segmenter(CFG, 2, seed=3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)


def test_augment_views_deterministic_in_range_and_scale_covering():
    rng = np.random.default_rng(1)
    image, label = ellipse_case(rng, 16, 16, 7, 5, inner=True)
    images, labels = image[None], label[None]
    a_img, a_lab = augment_views(images, labels, 64, cfg=CFG, rng_seed=7)
    b_img, b_lab = augment_views(images, labels, 64, cfg=CFG, rng_seed=7)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    c_img, _ = augment_views(images, labels, 64, cfg=CFG, rng_seed=8)
    assert not np.array_equal(a_img, c_img)

    assert a_img.shape == (64, SIZE, SIZE) and a_img.dtype == np.float32
    assert a_lab.shape == (64, SIZE, SIZE) and a_lab.dtype == np.uint8
    assert a_img.min() >= 0.0 and a_img.max() <= 1.0
    assert set(np.unique(a_lab)) <= {0, 1, 2}
    # Zoom over scale_range (0.4, 2.5) scales the target's area (here 11% of the frame) by 0.16..6.25 ...
    ratio = (a_lab > 0).reshape(64, -1).sum(1) / (label > 0).sum()
    assert ratio.min() < 0.4 and ratio.max() > 3.0
    # ... but never past target_area_limits: at most 80% of the frame, at least 1%.
    share = (a_lab > 0).reshape(64, -1).mean(1)
    assert share.max() <= 0.8 + 0.02 and share.min() >= 0.01 - 0.005
    big = dataclasses.replace(CFG, target_area_limits=(0.01, 0.3))
    _, b_lab = augment_views(images, labels, 64, cfg=big, rng_seed=7)
    assert (b_lab > 0).reshape(64, -1).mean(1).max() <= 0.3 + 0.02
    # Image and label stay aligned: the bright target is under the label.
    inside = [img[lab > 0].mean() - img[lab == 0].mean() for img, lab in zip(a_img, a_lab) if lab.any()]
    assert np.median(inside) > 0.2


def test_augment_views_rejects_bad_input():
    image, label = exemplar()
    with pytest.raises(DataError, match="exemplar_labels"):
        augment_views(image, label[:, :16], 2, cfg=CFG, rng_seed=0)


def test_training_improves_dice_and_zero_weight_pseudo_changes_nothing():
    images, labels = exemplar()
    rng = np.random.default_rng(5)
    unseen = [
        ellipse_case(rng, rng.uniform(12, 20), rng.uniform(12, 20), rng.uniform(4, 9), rng.uniform(4, 9))
        for _ in range(12)
    ]
    test_images = np.stack([u[0] for u in unseen])
    test_labels = np.stack([u[1] for u in unseen])

    untrained = build_segmenter(CFG, 2, seed=0)
    before = dice_per_case(predict(untrained, test_images).probs.argmax(1).astype(np.uint8), test_labels, 2)

    plain = build_segmenter(CFG, 2, seed=0)
    run = train_segmenter(plain, RoundInputs(images, labels), iterations=60, cfg=CFG, seed=1)
    assert len(run.losses) == 60 and run.iterations == 60
    after = dice_per_case(predict(plain, test_images).probs.argmax(1).astype(np.uint8), test_labels, 2)
    assert after.mean() > 0.7 and after.mean() > before.mean() + 0.2, (before.mean(), after.mean())

    weightless = build_segmenter(CFG, 2, seed=0)
    run0 = train_segmenter(
        weightless,
        # The pseudo labels are wrong on purpose: with weight 0 they must not matter.
        RoundInputs(images, labels, test_images, 1 - test_labels, np.zeros(len(test_images))),
        iterations=60,
        cfg=CFG,
        seed=1,
    )
    assert run0.losses == run.losses  # same seed, same loss curve; also shows training is deterministic
    for pa, pb in zip(plain.parameters(), weightless.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_weighted_pseudo_training_resumes_exactly_from_a_checkpoint(tmp_path):
    images, labels = exemplar()
    rng = np.random.default_rng(2)
    pseudo = [ellipse_case(rng, 16, 16, rng.uniform(4, 9), rng.uniform(4, 9)) for _ in range(6)]
    inputs = RoundInputs(images, labels, np.stack([p[0] for p in pseudo]), np.stack([p[1] for p in pseudo]), np.linspace(0.2, 1.0, 6))
    kwargs = {"iterations": 6, "cfg": CFG, "seed": 4}
    checkpoint = RecordingCheckpoint(tmp_path / "train.pt")

    full = build_segmenter(CFG, 2, seed=0)
    whole = train_segmenter(full, inputs, hooks=TrainingHooks(checkpoint=checkpoint, every=3), **kwargs)
    assert sorted(checkpoint.states) == [3, 6]

    resumed = build_segmenter(CFG, 2, seed=0)
    state = checkpoint.states[3]
    resumed.load_state_dict(state["segmenter"])
    tail = train_segmenter(resumed, inputs, resume=state, **kwargs)
    assert tail.losses == whole.losses[3:]
    for pa, pb in zip(full.parameters(), resumed.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_training_rejects_labels_outside_the_model_classes():
    images, labels = exemplar()
    with pytest.raises(DataError, match="exemplar_labels"):
        train_segmenter(build_segmenter(CFG, 2), RoundInputs(images, labels * 2), iterations=1, cfg=CFG, seed=0)
    with pytest.raises(DataError, match="pseudo_weights"):
        train_segmenter(
            build_segmenter(CFG, 2),
            RoundInputs(images, labels, images, labels, np.array([-1.0])),
            iterations=1,
            cfg=CFG,
            seed=0,
        )


def test_progress_lines_report_each_share_of_a_phase_on_its_own_line(capsys):
    """What a Ray trainer actor prints: one line per tenth (here half) of a phase, the last at its end, and training
    unchanged by it."""
    images, labels = exemplar()
    kwargs = {"iterations": 7, "cfg": CFG, "seed": 4}
    quiet = train_segmenter(build_segmenter(CFG, 2, seed=0), RoundInputs(images, labels), **kwargs)
    capsys.readouterr()
    told = train_segmenter(build_segmenter(CFG, 2, seed=0), RoundInputs(images, labels), hooks=TrainingHooks(progress_lines=2), **kwargs)
    assert capsys.readouterr().out.splitlines() == ["segmenter 3/7 iterations", "segmenter 6/7 iterations", "segmenter 7/7 iterations"]
    assert told.losses == quiet.losses
