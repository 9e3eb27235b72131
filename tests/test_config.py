import pytest

from caudo_ray.cli import demo_config_path
from caudo_ray.config import ConfigError, ConsistencyConfig, load_config, parse_overrides


def test_defaults_and_demo_config_validate():
    assert load_config().rounds >= 1
    demo = load_config(demo_config_path())
    assert demo.data.path is None and demo.runtime.use_ray


def test_caudo_trains_online_from_round_1_and_the_peer_is_unimatch_from_the_start():
    caudo = ConsistencyConfig()
    assert caudo.anchored and caudo.class_balance and caudo.class_thresholds
    # Round 0 has no calibrated labels to anchor to: it learns from the exemplar alone.
    assert [caudo.online_in_round(r) for r in range(3)] == [False, True, True]
    peer = ConsistencyConfig(threshold=0.9, unlabelled_batch_size=4).peer()
    assert peer.online_in_round(0) and not (peer.anchored or peer.class_balance or peer.class_thresholds)
    assert (peer.threshold, peer.unlabelled_batch_size) == (0.9, 4)  # the user's other settings carry over
    assert not ConsistencyConfig(enabled=False).online_in_round(1)


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"calibrator": {"guidance_strenght": 1.0}}, "calibrator.guidance_strenght"),
        ({"rounds": "three"}, "rounds"),
        ({"calibrator": {"guidance_strength": -0.5}}, "calibrator.guidance_strength"),
        ({"calibrator": {"calibration_strength": 0}}, "calibrator.calibration_strength"),
        ({"split": {"val_fraction": 0.5, "test_fraction": 0.5}}, "split.test_fraction"),
        ({"split": {"test_fraction": 0.0}}, "split.test_fraction"),
        ({"data": {"working_size": [60, 64]}}, "data.working_size"),
        ({"data": {"working_size": [64]}}, "data.working_size"),
        ({"segmenter": {"strides": [2, 2]}}, "segmenter.strides"),
        ({"selection": {"fractions": [0.5, 1.5]}}, "selection.fractions[1]"),
        ({"runtime": {"use_ray": "yes"}}, "runtime.use_ray"),
        ({"data": {"phantom": {"speckle": 1.5}}}, "data.phantom.speckle"),
        ({"data": {"phantom": {"target_width": [0.6, 0.2]}}}, "data.phantom.target_width"),
        ({"calibrator": {"arbitrate": "sometimes"}}, "calibrator.arbitrate"),
        ({"calibrator": {"keep_class_presence": "maybe"}}, "calibrator.keep_class_presence"),
        ({"selection": {"query_strategy": "margin"}}, "selection.query_strategy"),
    ],
)
def test_bad_values_are_refused_naming_the_key(raw, key):
    with pytest.raises(ConfigError) as err:
        load_config(raw)
    assert err.value.key == key
    assert str(err.value).startswith(key)


def test_yaml_file_and_dotted_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("rounds: 2\ncalibrator:\n  guidance_strength: 2.5\n")
    cfg = load_config(path, {"calibrator.inference_steps": 4, "data.group_column": None})
    assert cfg.rounds == 2 and cfg.calibrator.guidance_strength == 2.5
    assert cfg.calibrator.inference_steps == 4 and cfg.data.group_column is None


def test_missing_or_malformed_file_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


def test_method_hash_tracks_method_not_runtime():
    base = load_config()
    assert load_config(None, {"runtime.num_workers": 4, "work_dir": "elsewhere"}).method_hash() == base.method_hash()
    assert load_config(None, {"calibrator.guidance_strength": 3.0}).method_hash() != base.method_hash()
    # The query strategy picks what a person is asked about; no label changes, so a run resumes under another one.
    assert load_config(None, {"selection.query_strategy": "diverse"}).method_hash() == base.method_hash()


@pytest.mark.parametrize(
    "split, key",
    [
        ({"labelled_groups": ["patient099"], "num_labelled_groups": 3}, "split.num_labelled_groups"),
        ({"exemplars": ["a"], "labelled_groups": ["patient099"]}, "split.labelled_groups"),
        ({"exemplars": ["a"], "num_labelled_groups": 1}, "split.num_labelled_groups"),
        ({"labelled_groups": ["patient099"], "num_exemplars": 3}, "split.num_exemplars"),
        ({"exemplars": ["a", "b"], "num_exemplars": 2}, "split.num_exemplars"),
        ({"labelled_groups": []}, "split.labelled_groups"),
        ({"labelled_groups": ["p1", "p1"]}, "split.labelled_groups"),
        ({"num_labelled_groups": 0}, "split.num_labelled_groups"),
        ({"column": ""}, "split.column"),
        ({"datalist": " "}, "split.datalist"),
    ],
)
def test_labelled_set_and_split_source_keys_refused_naming_the_key(split, key):
    with pytest.raises(ConfigError) as err:
        load_config({"split": split})
    assert err.value.key == key


def test_labelled_set_ways_and_volume_columns():
    cfg = load_config()
    assert cfg.split.num_exemplars == 1 and cfg.split.labelled_groups is None and cfg.split.num_labelled_groups is None
    assert cfg.split.column == "split" and cfg.split.datalist is None
    assert cfg.data.volume_column == "volume" and cfg.data.slice_column == "slice"
    by_group = load_config({"split": {"labelled_groups": ["patient038", "patient050", "patient099"], "num_exemplars": 1}})
    assert by_group.split.labelled_groups == ["patient038", "patient050", "patient099"]
    drawn = load_config({"split": {"num_labelled_groups": 3, "column": None, "datalist": "dataset.json"}})
    assert drawn.split.num_labelled_groups == 3 and drawn.split.column is None and drawn.split.datalist == "dataset.json"
    off = load_config({"data": {"volume_column": None, "slice_column": None}})
    assert off.data.volume_column is None
    with pytest.raises(ConfigError) as err:
        load_config({"data": {"volume_column": "frame", "slice_column": "frame"}})
    assert err.value.key == "data.slice_column"
    with pytest.raises(ConfigError) as err:
        load_config({"data": {"volume_column": ""}})
    assert err.value.key == "data.volume_column"


def test_set_overrides_read_values_as_yaml_and_refuse_an_item_without_a_value():
    overrides = parse_overrides(["calibrator.guidance_strength=3", " selection.fractions = [0.5, 1.0]", "data.group_column=null", "tracking.experiment=a=b"])
    assert overrides == {"calibrator.guidance_strength": 3, "selection.fractions": [0.5, 1.0], "data.group_column": None, "tracking.experiment": "a=b"}
    assert load_config(None, overrides).selection.fractions == (0.5, 1.0)
    with pytest.raises(ConfigError, match="KEY=VALUE") as err:
        parse_overrides(["calibrator.guidance_strength"])
    assert err.value.key == "calibrator.guidance_strength"
    with pytest.raises(ConfigError, match="not valid YAML") as err:
        parse_overrides(["selection.fractions=[0.5"])
    assert err.value.key == "selection.fractions"
