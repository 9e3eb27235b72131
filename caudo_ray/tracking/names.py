"""Every name a run writes to MLflow and a dashboard reads back: metrics, params, tags and artifact paths.

Stable across versions (dashboards and users' queries read them by name); documented in docs/architecture.md
("Tracking") and docs/tune.md.
"""

# Per-round metrics of a self-training run (step = round).
PSEUDO_DICE_INITIAL = "round/pseudo_dice_initial"
PSEUDO_DICE_CALIBRATED = "round/pseudo_dice_calibrated"
CALIBRATION_GAIN = "round/calibration_gain"
SELECTED = "round/selected"
SELECTED_FRACTION = "round/selected_fraction"
RELIABILITY_MEAN = "round/reliability_mean"
RELIABILITY_P10 = "round/reliability_p10"
RELIABILITY_P50 = "round/reliability_p50"
RELIABILITY_SPEARMAN = "round/reliability_spearman"
AGREEMENT_MEAN = "round/agreement_mean"
ACCEPTED_FRACTION = "round/calibration_accepted"  # share of cases whose calibrated label passed the reliability test
CHANGED_FRACTION = "round/changed_fraction"
ANNOTATIONS = "round/annotations"  # answered queries the round's segmenter trained on
VAL_DICE = "val/dice"
# The round's segmenter's validation HD95, in millimetres where every validation case has a spacing (NIfTI,
# DICOM, meta.csv), else in working-size pixels: a run logs one of the two.
VAL_HD95_MM = "val/hd95_mm"
VAL_HD95_PX = "val/hd95_px"
FINAL_VAL_PREFIX = "final/val_"  # the final segmenter's validation metrics, final/val_dice ...
CASES_PER_S = "perf/cases_per_s"
INFER_S_PER_CASE = "perf/infer_s_per_case"
DDIM_S_PER_CASE = "perf/ddim_s_per_case"
SCORE_S_PER_CASE = "perf/score_s_per_case"
STORE_S_PER_CASE = "perf/store_write_s_per_case"
TRAIN_S = "perf/train_s"
CALIBRATOR_TRAIN_S = "perf/calibrator_train_s"  # the part of train_s spent on the calibrator
SKIPPED = "data/skipped"
# The drift guard (rounds.guard): each segmenter's mean exemplar-view Dice, step = its round (rounds: the final one);
# its per-class readings are logged beside it as guard/exemplar_dice_class<c>.
GUARD_EXEMPLAR_DICE = "guard/exemplar_dice"

# Round summary keys (rounds.steps.select_and_commit) -> metric names.
SUMMARY_METRICS = {
    "pseudo_dice_initial": PSEUDO_DICE_INITIAL,
    "pseudo_dice_calibrated": PSEUDO_DICE_CALIBRATED,
    "calibration_gain": CALIBRATION_GAIN,
    "selected": SELECTED,
    "selected_fraction": SELECTED_FRACTION,
    "reliability_mean": RELIABILITY_MEAN,
    "reliability_p10": RELIABILITY_P10,
    "reliability_p50": RELIABILITY_P50,
    "reliability_spearman": RELIABILITY_SPEARMAN,
    "agreement_mean": AGREEMENT_MEAN,
    "accepted_fraction": ACCEPTED_FRACTION,
    "annotations": ANNOTATIONS,
}
PERF_METRICS = {
    "cases_per_s": CASES_PER_S,
    "infer_s_per_case": INFER_S_PER_CASE,
    "ddim_s_per_case": DDIM_S_PER_CASE,
    "score_s_per_case": SCORE_S_PER_CASE,
    "store_write_s_per_case": STORE_S_PER_CASE,
    "train_s": TRAIN_S,
    "calibrator_train_s": CALIBRATOR_TRAIN_S,
}

# Tags.
TAG_KIND = "caudo_ray.kind"  # "tune" on a Tune search's parent run, "dashboard" on a report run
KIND_TUNE = "tune"  # the parent run
KIND_TRIAL = "tune_trial"  # each nested child run
KIND_DASHBOARD = "dashboard"
TAG_WORK_DIR = "caudo_ray.work_dir"
TAG_METHOD_HASH = "caudo_ray.method_hash"
TAG_GUARD_KEPT = "caudo_ray.guard.kept"  # the segmenter the run serves: its round (rounds: the final one)
TAG_GUARD_STOPPED = "caudo_ray.guard.stopped_at"  # the segmenter the guard found worse, where the rounds stopped
TAG_OBJECTIVE = "caudo_ray.objective"
TAG_STOPPED_EARLY = "caudo_ray.tune.stopped_early"
TAG_PARENT = "mlflow.parentRunId"
TAG_SOURCES = "caudo_ray.dashboard_sources"  # on a report run: the run ids it was built from
TAG_DASHBOARD_RUN = "caudo_ray.dashboard_run_id"  # on a source run: its latest report run
TAG_NOTE = "mlflow.note.content"  # the run's description in the MLflow UI (markdown)
# The final segmenter's MLflow Model (caudo_ray.deploy.mlflow_model): on the run, where it went; on the logged
# model and its registered version, what it is.
TAG_MODEL_URI = "caudo_ray.model_uri"  # run: models:/<model_id>
TAG_MODEL_NAME = "caudo_ray.registered_model"  # run: tracking.model_name
TAG_MODEL_VERSION = "caudo_ray.registered_version"  # run: the version registered
TAG_EXEMPLARS = "caudo_ray.exemplars"  # model: JSON list of the exemplar case ids
TAG_VAL_DICE = "caudo_ray.val_dice"  # model: the final segmenter's validation Dice ("none" without validation)

# Artifacts.
ROUND_SUMMARY = "rounds/round_{r}/summary.json"
CASE_TABLE = "rounds/round_{r}/cases.json"
OVERLAY = "overlays/round_{r}/{case_id}.png"
GALLERY_DIR = "gallery/round_{r}"
GALLERY_GROUPS = ("most_changed", "least_reliable")
CURVES_DIR = "curves"
MODEL_DIR = "model"
SKIPPED_FILES = "data/skipped.json"
ANSWERED_QUERIES = "annotations/answered.json"  # the answers a run took in: who, when, the round each joined
DASHBOARD_DIR = "dashboard"  # report run: dashboard/index.html, dashboard/figures/<key>.png

# Ray Tune searches (docs/tune.md).
PARAM_GUIDANCE = "calibrator.guidance_strength"
PARAM_STRENGTH = "calibrator.calibration_strength"
PARAM_STEPS = "calibrator.inference_steps"
SEARCH_PARAMS = (PARAM_GUIDANCE, PARAM_STRENGTH, PARAM_STEPS)
BEST_PREFIX = "best."
OBJECTIVE_VAL_DICE = "val_dice"
OBJECTIVE_PROXY = "proxy"
METRIC_OBJECTIVE = "tune/objective"  # child, per evaluation step
METRIC_PROXY = "tune/proxy"  # child: running mean reliability of the calibrated labels
METRIC_VAL_DICE = "tune/val_dice"  # child, objective val_dice: running mean Dice on the validation cases
METRIC_POOL_DICE = "tune/pool_dice"  # child, objective proxy: hidden-truth Dice of the pool sample, where it exists
METRIC_INITIAL_DICE = "tune/initial_dice"  # child: the same cases' Dice before calibration
METRIC_BEST = "tune/best_objective"  # parent
METRIC_TRIALS = "tune/trials"  # parent
METRIC_STOPPED_EARLY = "tune/stopped_early"  # parent: trials ASHA stopped
METRIC_SHARED_TRAIN_S = "perf/shared_train_s"  # parent: training the shared weights took this long (once)
METRIC_TRAIN_SAVED_S = "perf/tune_train_saved_s"  # parent: training time the trials did not spend
METRIC_WALL_S = "perf/tune_wall_s"  # parent: the search, end to end
