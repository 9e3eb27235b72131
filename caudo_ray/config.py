"""Typed run configuration, loaded from YAML and validated once at the edge.

Every section is a dataclass whose fields are the knobs of one component. ``load_config`` turns a YAML file
(or a dict) into a :class:`RunConfig`, refusing unknown keys, wrong types and impossible values with a
:class:`ConfigError` that names the offending key (``calibrator.guidance_strength: must be >= 0``).
Nothing downstream re-validates.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# A registered model's name: safe in a models:/ URI, a file name and a MONAI bundle name.
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""

    def __init__(self, key: str, problem: str):
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}" if key else problem)


TARGET_LABELS = ("filled", "ring")  # what of a phantom's target is labelled
QUERY_STRATEGIES = ("reliability", "random", "entropy", "diverse")  # annotation query strategies (selection.py)


@dataclass
class PhantomConfig:
    """Embedded default data: ultrasound-like phantoms written as a dataset folder."""

    num_labelled: int = 48
    num_unlabelled: int = 64
    size: tuple[int, int] = (96, 96)
    num_classes: int = 2
    num_groups: int = 16
    seed: int = 0
    speckle: float = 1.0  # share of the intensity modulated by speckle: 1 raw coherent speckle, 0 none
    rim_width: float = 0.08  # the target's bright rim, least width as a fraction of its radius
    target_width: tuple[float, float] = (0.15, 0.60)  # range of the target's long axis, fraction of the frame width
    # Unlabelled look-alikes per frame (a range): rings shaped like the target with a rim decoy_contrast times as
    # bright. Phantoms where self-training drifts, for testing what guards against it.
    decoys: tuple[int, int] = (0, 0)
    decoy_contrast: float = 1.3
    decoy_size: tuple[float, float] = (0.5, 1.0)  # a decoy's long axis relative to the target's
    target_label: str = "filled"  # filled: the whole target is class 1; ring: only its rim (a thin structure)

    def validate(self, key: str) -> None:
        _positive(f"{key}.num_labelled", self.num_labelled)
        if not 0.0 <= self.speckle <= 1.0:
            raise ConfigError(f"{key}.speckle", f"needs 0 <= speckle <= 1, got {self.speckle}")
        if not 0.0 < self.rim_width <= 0.5:
            raise ConfigError(f"{key}.rim_width", f"needs 0 < rim_width <= 0.5, got {self.rim_width}")
        lo, hi = self.target_width
        if not 0.05 <= lo <= hi <= 0.9:
            raise ConfigError(f"{key}.target_width", f"needs 0.05 <= low <= high <= 0.9, got {list(self.target_width)}")
        _non_negative(f"{key}.num_unlabelled", self.num_unlabelled)
        _positive(f"{key}.num_groups", self.num_groups)
        _size(f"{key}.size", self.size, minimum=16)
        if self.num_classes not in (2, 3):
            raise ConfigError(f"{key}.num_classes", "phantoms have 2 (binary) or 3 (head + inner structure) classes")
        if not 0 <= self.decoys[0] <= self.decoys[1]:
            raise ConfigError(f"{key}.decoys", f"needs 0 <= low <= high, got {list(self.decoys)}")
        _positive_float(f"{key}.decoy_contrast", self.decoy_contrast)
        if not 0 < self.decoy_size[0] <= self.decoy_size[1]:
            raise ConfigError(f"{key}.decoy_size", f"needs 0 < low <= high, got {list(self.decoy_size)}")
        if self.target_label not in TARGET_LABELS:
            raise ConfigError(f"{key}.target_label", f"must be one of {', '.join(TARGET_LABELS)}, got {self.target_label!r}")


@dataclass
class DataConfig:
    """Where the cases come from and how they are brought to the working size."""

    path: str | None = None  # dataset folder; None means phantoms generated into the work dir
    group_column: str | None = "group"  # meta.csv column for group-wise splits; None: each file its own group
    working_size: tuple[int, int] = (64, 64)
    num_classes: int | None = None  # None: discovered from the masks
    nifti_axis: int = 2  # axis along which 3D volumes are cut into 2D slices
    # Images larger than this many pixels are refused from their header, before decoding (a decompression bomb
    # or a wrong file); 50 M pixels is above any 2D scan's size (a mammogram is ~15 M).
    max_pixels: int = 50_000_000
    # false: a grayscale modality, where a colour picture is the wrong modality and is refused; true: colour
    # pictures are expected and read as luminance.
    color: bool = False
    # meta.csv columns naming the 3D volume of each 2D slice file and the slice's integer position in it, so test
    # metrics can stack a volume's slices in order; used only when both are present. NIfTI volumes need neither.
    volume_column: str | None = "volume"
    slice_column: str | None = "slice"
    # meta.csv column giving each file's pixel size in mm (square pixels), for files that carry none (PNG, JPEG),
    # times spacing_scale (a column for another resolution than the files'); HD95 is then in mm. NIfTI and
    # DICOM carry their own spacing.
    spacing_column: str | None = None
    spacing_scale: float = 1.0
    phantom: PhantomConfig = field(default_factory=PhantomConfig)

    def validate(self, key: str) -> None:
        _size(f"{key}.working_size", self.working_size, minimum=16)
        for dim in self.working_size:
            if dim % 16:
                raise ConfigError(f"{key}.working_size", f"each side must be a multiple of 16, got {list(self.working_size)}")
        if self.num_classes is not None and self.num_classes < 2:
            raise ConfigError(f"{key}.num_classes", f"must be >= 2 (background + at least one class), got {self.num_classes}")
        if self.nifti_axis not in (0, 1, 2):
            raise ConfigError(f"{key}.nifti_axis", f"must be 0, 1 or 2, got {self.nifti_axis}")
        _positive(f"{key}.max_pixels", self.max_pixels)
        for name in ("volume_column", "slice_column", "spacing_column"):
            if getattr(self, name) is not None and not getattr(self, name).strip():
                raise ConfigError(f"{key}.{name}", "must name a meta.csv column, or be null")
        _positive_float(f"{key}.spacing_scale", self.spacing_scale)
        if self.volume_column is not None and self.volume_column == self.slice_column:
            raise ConfigError(f"{key}.slice_column", f"must differ from {key}.volume_column ({self.volume_column!r})")
        self.phantom.validate(f"{key}.phantom")


@dataclass
class SplitConfig:
    """Group-wise split of the labelled cases into the labelled set (exemplars), pool, validation and test.

    The sets come from ``datalist`` when given, else from meta.csv's ``column`` when the data set has it, else
    from a seeded group-wise draw by ``val_fraction`` / ``test_fraction`` (which a predefined split ignores).
    The labelled set is chosen one way only: ``exemplars`` (case ids), ``labelled_groups`` (every labelled
    slice of these groups: "1 case" = one patient), ``num_labelled_groups`` (that many training groups drawn
    by seed), or else ``num_exemplars`` cases drawn by seed (default 1: one slice, the one-shot setting).
    """

    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    exemplars: list[str] | None = None  # case ids; None: drawn by seed
    num_exemplars: int = 1
    labelled_groups: list[str] | None = None  # group ids (patients): all their labelled cases are exemplars
    num_labelled_groups: int | None = None  # that many training groups drawn by seed, all their cases labelled
    # meta.csv column naming each file's set (train / val / test, or training / validation); null, or a data set
    # without the column: the seeded split.
    column: str | None = "split"
    # Medical Segmentation Decathlon datalist JSON (training / validation / test lists), relative to the data
    # folder; it takes precedence over the split column.
    datalist: str | None = None

    def validate(self, key: str) -> None:
        _fraction(f"{key}.val_fraction", self.val_fraction, allow_zero=True)
        _fraction(f"{key}.test_fraction", self.test_fraction, allow_zero=False)
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError(
                f"{key}.test_fraction",
                f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:g} leaves no pool",
            )
        _positive(f"{key}.num_exemplars", self.num_exemplars)
        if self.exemplars is not None and not self.exemplars:
            raise ConfigError(f"{key}.exemplars", "must name at least one case id, or be omitted")
        if self.labelled_groups is not None:
            if not self.labelled_groups:
                raise ConfigError(f"{key}.labelled_groups", "must name at least one group, or be omitted")
            if len(set(self.labelled_groups)) != len(self.labelled_groups):
                raise ConfigError(f"{key}.labelled_groups", f"groups repeat: {self.labelled_groups}")
        if self.num_labelled_groups is not None:
            _positive(f"{key}.num_labelled_groups", self.num_labelled_groups)
        ways = [name for name in ("exemplars", "labelled_groups", "num_labelled_groups") if getattr(self, name) is not None]
        if len(ways) > 1:
            raise ConfigError(f"{key}.{ways[1]}", f"contradicts {key}.{ways[0]}: choose the labelled set one way")
        # num_exemplars always has a value (1); only another count beside a chosen way is a contradiction.
        if ways and self.num_exemplars != 1:
            raise ConfigError(f"{key}.num_exemplars", f"{self.num_exemplars} contradicts {key}.{ways[0]}: choose the labelled set one way")
        for name in ("column", "datalist"):
            if getattr(self, name) is not None and not getattr(self, name).strip():
                raise ConfigError(f"{key}.{name}", "must not be empty; use null to leave it out")


@dataclass
class SegmenterConfig:
    """MONAI UNet and its training schedule."""

    # Five levels: the bottleneck sees the whole frame at 128x128, which a one-shot segmenter needs to tell the
    # target from look-alike tissue (HC18, 3 exemplars, exemplar-only test Dice 0.66 -> 0.74 over four levels).
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    num_res_units: int = 1
    iterations: int = 300  # round 0, on the exemplar views
    finetune_iterations: int = 200  # each later round, warm-started
    batch_size: int = 8
    learning_rate: float = 2e-3
    # Exemplar views are zoomed (log-uniformly, apparent size of the target) over scale_range, but never so far
    # that the target's share of the frame leaves target_area_limits: a small exemplar then also teaches large
    # targets, a large one small targets, and none is blown up past the frame or shrunk to a few pixels. A range
    # fixed in the frame's terms instead (targets always zoomed to cover 5-80% of it) suited HC18 (+10 points
    # exemplar-only, fast profile) and broke ACDC, where it zoomed hearts 4x past any real size (-8 points);
    # docs/method.md.
    scale_range: tuple[float, float] = (0.4, 2.5)
    target_area_limits: tuple[float, float] | None = (0.01, 0.8)
    exemplar_weight: float = 1.0  # loss weight of exemplar views relative to a fully reliable pseudo label
    exemplar_fraction: float = 0.25  # share of each batch given to exemplar views once pseudo labels join

    def validate(self, key: str) -> None:
        if len(self.channels) < 2 or len(self.strides) != len(self.channels) - 1:
            raise ConfigError(f"{key}.strides", "needs exactly len(channels) - 1 entries")
        _positive(f"{key}.iterations", self.iterations)
        _non_negative(f"{key}.finetune_iterations", self.finetune_iterations)
        _positive(f"{key}.batch_size", self.batch_size)
        _positive_float(f"{key}.learning_rate", self.learning_rate)
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ConfigError(f"{key}.scale_range", f"needs 0 < low <= high, got {list(self.scale_range)}")
        if self.target_area_limits is not None:
            lo, hi = self.target_area_limits
            if not 0 < lo <= hi <= 1:
                raise ConfigError(f"{key}.target_area_limits", f"needs 0 < low <= high <= 1, got {list(self.target_area_limits)}")
        _non_negative(f"{key}.exemplar_weight", self.exemplar_weight)
        _fraction(f"{key}.exemplar_fraction", self.exemplar_fraction, allow_zero=False)


@dataclass
class CalibratorConfig:
    """Label autoencoder, conditional denoiser and the deterministic DDIM calibration."""

    enabled: bool = True  # false: plain self-training on the segmenter's own labels (the ablation baseline)
    latent_channels: int = 4
    downsample: int = 4  # latent is working_size / downsample
    block_out_channels: tuple[int, ...] = (32, 64)
    autoencoder_iterations: int = 300  # round 0 only: later rounds keep the autoencoder
    denoiser_iterations: int = 600  # round 0
    # Each later round, warm-started; 0 (the default): the round-0 calibrator serves every round unchanged.
    denoiser_finetune_iterations: int = 0
    # From round 1, also train on the previous round's selected calibrated labels (and their images). Off by
    # default: it teaches the denoiser the pseudo labels' own errors (HC18, round 1: pseudo-label Dice -2.2
    # points after calibration, against +2.2 without; benchmarks/ablations.py); see docs/method.md.
    pseudo_pairs: bool = False
    batch_size: int = 16
    learning_rate: float = 1e-3
    train_timesteps: int = 1000
    inference_steps: int = 6  # DDIM steps over the full schedule; a calibration runs ceil(s * steps) each way
    # s: how far (t* = s T) the initial label is inverted. All the way: only there does the label prior act (HC18
    # round 0, w = 3: pseudo-label Dice +0.003 at s = 0.9, +0.010 at s = 1).
    calibration_strength: float = 1.0
    guidance_strength: float = 2.0  # w: eps = eps_u + w (eps_c - eps_u)
    # Classifier-free guidance dropout during training; 0.2 rather than the usual 0.1, because calibration
    # inverts along the unconditional model and that model must be good too.
    guidance_dropout: float = 0.2
    # How much of the calibrator's change a label keeps (calibration.sampling.gate_calibration): a case whose
    # initial reliability is <= gate[0] every change, >= gate[1] only where the segmenter is unsure, linear in
    # between; null applies every change. It bounds what a calibrator with a wrong prior does to good labels.
    gate: tuple[float, float] | None = (0.5, 0.8)
    # Where the segmenter's labels of the image and of its mirror agree, keep them: the calibrator arbitrates only
    # the pixels the two views dispute (calibration.sampling.arbitrate). On the test phantoms the gated calibration
    # alone lowered the segmenter's own labels by 2.8 Dice points, arbitrated by 0.1.
    arbitrate: bool = True
    # Calibration may reshape a structure but not add or erase one (calibration.sampling.keep_class_presence):
    # whether a class is in the image stays the segmenter's call. On ACDC the one-patient calibrator drew left
    # ventricles into slices whose label had none, and such flips were most of its loss (docs/method.md).
    keep_class_presence: bool = True
    # Keep a case's initial label when its calibrated label scores lower on the label-free reliability: the
    # calibration must convince the same judge that ranks the labels. With keep_class_presence, these are the two
    # rules that kept every ACDC round's calibration from lowering its labels (docs/benchmarks.md, "Where
    # calibration loses on ACDC"); HC18 is unchanged.
    revert_if_less_reliable: bool = True
    # Pixels where the calibrator's unguarded proposal differs from the label a round keeps teach the next round
    # nothing (rounds.steps.training_inputs): the rules above stop a one-exemplar prior from rewriting a label, and
    # the veto still lets it say where the label is doubtful.
    veto: bool = False

    def validate(self, key: str) -> None:
        _positive(f"{key}.latent_channels", self.latent_channels)
        if self.downsample not in (1, 2, 4, 8):
            raise ConfigError(f"{key}.downsample", f"must be 1, 2, 4 or 8, got {self.downsample}")
        _positive(f"{key}.autoencoder_iterations", self.autoencoder_iterations)
        _positive(f"{key}.denoiser_iterations", self.denoiser_iterations)
        _non_negative(f"{key}.denoiser_finetune_iterations", self.denoiser_finetune_iterations)
        _positive(f"{key}.batch_size", self.batch_size)
        _positive_float(f"{key}.learning_rate", self.learning_rate)
        _positive(f"{key}.train_timesteps", self.train_timesteps)
        _positive(f"{key}.inference_steps", self.inference_steps)
        if self.inference_steps > self.train_timesteps:
            raise ConfigError(f"{key}.inference_steps", f"must be <= train_timesteps ({self.train_timesteps}), got {self.inference_steps}")
        if not 0.0 < self.calibration_strength <= 1.0:
            raise ConfigError(f"{key}.calibration_strength", f"must be in (0, 1], got {self.calibration_strength}")
        if self.guidance_strength < 0:
            raise ConfigError(f"{key}.guidance_strength", f"must be >= 0, got {self.guidance_strength}")
        _fraction(f"{key}.guidance_dropout", self.guidance_dropout, allow_zero=True)
        if self.gate is not None and not 0.0 <= self.gate[0] <= self.gate[1] <= 1.0:
            raise ConfigError(f"{key}.gate", f"needs 0 <= low <= high <= 1, got {list(self.gate)}")


@dataclass
class SelectionConfig:
    """Curriculum of pseudo labels kept for training, and annotation queries."""

    fractions: tuple[float, ...] = (0.5, 0.75, 1.0)  # fraction of the pool selected after round r
    num_queries: int = 10
    # How the queries are chosen (labelling/selection.py): least reliable first, a seeded random draw, highest
    # segmenter entropy first, or least reliable with no two of one group (exam, patient). The default is the one
    # benchmarks/active.py measured best over HC18 and ACDC together (docs/benchmarks.md, "Active learning"):
    # reliability-ranked queries led on HC18 by 2 points and trailed on ACDC by 15.
    query_strategy: str = "random"

    def validate(self, key: str) -> None:
        if not self.fractions:
            raise ConfigError(f"{key}.fractions", "needs at least one fraction")
        for i, frac in enumerate(self.fractions):
            _fraction(f"{key}.fractions[{i}]", frac, allow_zero=False)
        _non_negative(f"{key}.num_queries", self.num_queries)
        if self.query_strategy not in QUERY_STRATEGIES:
            raise ConfigError(f"{key}.query_strategy", f"must be one of {', '.join(QUERY_STRATEGIES)}, got {self.query_strategy!r}")


@dataclass
class AnnotationsConfig:
    """Which answers to annotation queries a run accepts (``caudo-ray annotate``, files in ``annotations/``)."""

    # An answer with no foreground: refused unless a query may rightly hold none (a slice past the organ).
    allow_empty: bool = False

    def validate(self, key: str) -> None:
        """Nothing beyond the type, which loading checks (``_coerce``)."""


@dataclass
class RuntimeConfig:
    """How the work is spread over Ray; none of it changes results."""

    use_ray: bool = True
    address: str | None = None  # None: start a local Ray; "auto" or host:port joins a cluster
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    threads_per_worker: int = 1
    trainer_cpus: float = 1.0
    trainer_gpus: float = 0.0
    num_train_workers: int = 1  # >1: data-parallel training through Ray Train
    batch_size: int = 16  # cases per calibration batch
    max_in_flight: int = 2  # batches in flight per worker (backpressure)
    # Training checkpoints (segmenter, autoencoder, denoiser) every this many iterations; 0 disables them.
    checkpoint_every: int = 50
    dashboard_host: str = "127.0.0.1"
    # Pseudo-label store: a path or an fsspec URL (s3://bucket/run/store.zarr) every node can open;
    # None: <work_dir>/store.zarr. Where the store lives never changes results.
    store_url: str | None = None
    # The store's single-writer lock: its holder renews a heartbeat every third of this; a holder on another host
    # whose heartbeat is older is taken for dead and its lock taken over (hosts' clocks must agree within it).
    lock_lease_s: float = 60.0
    # Node labels ("key=value") calibration workers prefer: placed on nodes carrying all of them while any is
    # alive, elsewhere once none is (a lost node's workers restart on the survivors). Empty: anywhere.
    worker_labels: list[str] = field(default_factory=list)
    # Mixed precision of labelling on a GPU: auto (bf16 on CUDA, off on CPU) | off | bf16 | fp16.
    autocast: str = "auto"

    def validate(self, key: str) -> None:
        _positive(f"{key}.num_workers", self.num_workers)
        _non_negative(f"{key}.cpus_per_worker", self.cpus_per_worker)
        _non_negative(f"{key}.gpus_per_worker", self.gpus_per_worker)
        _positive(f"{key}.threads_per_worker", self.threads_per_worker)
        _non_negative(f"{key}.trainer_cpus", self.trainer_cpus)
        _non_negative(f"{key}.trainer_gpus", self.trainer_gpus)
        _positive(f"{key}.num_train_workers", self.num_train_workers)
        _positive(f"{key}.batch_size", self.batch_size)
        _positive(f"{key}.max_in_flight", self.max_in_flight)
        _non_negative(f"{key}.checkpoint_every", self.checkpoint_every)
        _positive_float(f"{key}.lock_lease_s", self.lock_lease_s)
        for i, label in enumerate(self.worker_labels):
            name, _, value = label.partition("=")
            if not name or not value:
                raise ConfigError(f"{key}.worker_labels[{i}]", f"must read key=value, got {label!r}")
        if self.autocast not in ("auto", "off", "bf16", "fp16"):
            raise ConfigError(f"{key}.autocast", f"must be auto, off, bf16 or fp16, got {self.autocast!r}")


@dataclass
class TrackingConfig:
    """MLflow: by default a sqlite store inside the work dir."""

    tracking_uri: str | None = None
    experiment: str = "caudo-ray"
    run_name: str | None = None
    num_overlays: int = 8  # fixed sample of cases whose overlays are logged every round
    # The final segmenter is logged as an MLflow Model and registered under this name (a new version per run);
    # None logs the model without registering it.
    model_name: str | None = "caudo-ray-segmenter"
    round_models: bool = False  # also log each round's segmenter as an MLflow Model (segmenter_round_<r>), unregistered
    # Class names of the exported models (MLflow Model, MONAI bundle), background first; None: background,
    # class_1, class_2, ...
    label_names: list[str] | None = None
    # Rebuild the dashboard page after every committed round, so a run of hours can be watched while it goes
    # (a few seconds a round); off, the page is built once, when the run ends.
    dashboard_every_round: bool = True

    def validate(self, key: str) -> None:
        _non_negative(f"{key}.num_overlays", self.num_overlays)
        if self.model_name is not None and not _MODEL_NAME.fullmatch(self.model_name):
            raise ConfigError(
                f"{key}.model_name", f"must be letters, digits, '.', '_' or '-' (at most 100), got {self.model_name!r}"
            )
        if self.label_names is not None:
            if len(self.label_names) < 2:
                raise ConfigError(f"{key}.label_names", "needs background and at least one class")
            if len(set(self.label_names)) != len(self.label_names) or not all(n.strip() for n in self.label_names):
                raise ConfigError(f"{key}.label_names", f"needs distinct, non-empty names, got {self.label_names}")


@dataclass
class SearchDimConfig:
    """One dimension of a Tune search: exactly one of ``grid``, ``choice`` or ``range``."""

    grid: list[float] | None = None  # every value, crossed with the other grid dimensions
    choice: list[float] | None = None  # one value drawn per sample
    range: tuple[float, float] | None = None  # [low, high], drawn uniformly per sample (integers for step counts)

    def validate(self, key: str, *, low: float, high: float, integer: bool = False, open_low: bool = False) -> None:
        given = [name for name in ("grid", "choice", "range") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ConfigError(key, f"needs exactly one of grid, choice or range, got {given or 'none'}")
        name = given[0]
        values = list(getattr(self, name))
        if not values:
            raise ConfigError(f"{key}.{name}", "needs at least one value")
        if name == "range" and values[0] > values[1]:
            raise ConfigError(f"{key}.range", f"needs low <= high, got {values}")
        for i, v in enumerate(values):
            where = f"{key}.{name}[{i}]"
            if integer and v != int(v):
                raise ConfigError(where, f"must be a whole number, got {v}")
            if v > high or v < low or (open_low and v == low):
                raise ConfigError(where, f"must be in {'(' if open_low else '['}{low:g}, {high:g}], got {v}")


@dataclass
class TuneConfig:
    """``caudo-ray tune``: search over guidance strength w, calibration strength s and DDIM steps (Ray Tune, ASHA)."""

    guidance_strength: SearchDimConfig = field(default_factory=lambda: SearchDimConfig(grid=[0.0, 1.0, 2.0, 4.0]))
    calibration_strength: SearchDimConfig = field(default_factory=lambda: SearchDimConfig(grid=[0.6, 1.0]))
    inference_steps: SearchDimConfig = field(default_factory=lambda: SearchDimConfig(grid=[6]))
    num_samples: int = 1  # repeats of the grid; each repeat draws its own choice/range values
    objective: str = "auto"  # auto (val_dice when a validation split exists, else proxy) | val_dice | proxy
    eval_cases: int = 64  # validation cases (or pool sample for the proxy) each trial labels
    eval_batch_size: int = 16  # cases per evaluation step: ASHA's time unit
    max_t: int | None = None  # evaluation steps of a full trial; None: all of eval_cases
    grace_period: int = 1
    reduction_factor: float = 2.0
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0  # a fraction shares a GPU between trials
    max_concurrent_trials: int = 2
    seed: int = 0  # pool sample and random draws

    def validate(self, key: str) -> None:
        self.guidance_strength.validate(f"{key}.guidance_strength", low=0.0, high=float("inf"))
        self.calibration_strength.validate(f"{key}.calibration_strength", low=0.0, high=1.0, open_low=True)
        self.inference_steps.validate(f"{key}.inference_steps", low=1, high=float("inf"), integer=True)
        _positive(f"{key}.num_samples", self.num_samples)
        if self.objective not in ("auto", "val_dice", "proxy"):
            raise ConfigError(f"{key}.objective", f"must be auto, val_dice or proxy, got {self.objective!r}")
        _positive(f"{key}.eval_cases", self.eval_cases)
        _positive(f"{key}.eval_batch_size", self.eval_batch_size)
        if self.max_t is not None:
            _positive(f"{key}.max_t", self.max_t)
        _positive(f"{key}.grace_period", self.grace_period)
        if not self.reduction_factor > 1:
            raise ConfigError(f"{key}.reduction_factor", f"must be > 1, got {self.reduction_factor}")
        _positive_float(f"{key}.cpus_per_trial", self.cpus_per_trial)
        _non_negative(f"{key}.gpus_per_trial", self.gpus_per_trial)
        _positive(f"{key}.max_concurrent_trials", self.max_concurrent_trials)


@dataclass
class ConsistencyConfig:
    """Online weak-to-strong consistency on the unlabelled pool (UniMatch, Yang et al., CVPR 2023).

    Caudo's rounds train with it, anchored to the calibrated labels and guarded per class (the four switches
    below, all on by default; docs/method.md measures each). The ``consistency`` baseline trains with it alone
    and without caudo's guards (:meth:`peer`). The other defaults are UniMatch's ACDC setting
    (``more-scenarios/medical``) where one applies.
    """

    enabled: bool = True  # caudo's loop also trains with online consistency on the pool
    unlabelled_batch_size: int = 8  # pool images per iteration (and as many more to CutMix from)
    threshold: float = 0.95  # weak-view confidence below which a pixel teaches nothing
    # Scale the threshold per class by the class's mean confidence over the iteration's weak views, relative to
    # the most confident class (FreeMatch's self-adaptive class thresholds, from the batch alone): a class the
    # teacher is still unsure of teaches from its less confident pixels instead of from none, so background,
    # confident first, does not take over the pool.
    class_thresholds: bool = True
    # In caudo's rounds, a pool pixel teaches only where the teacher's weak-view label equals the previous
    # round's calibrated label of that image (warped alike): the calibrated labels, not the teacher's confidence
    # alone, decide what the pool teaches, so the teacher cannot reinforce what calibration disputes. Round 0
    # has no such labels and trains without the pool.
    anchored: bool = True
    # Round 0 also learns from the pool (unanchored: it has no calibrated labels yet, but with the class guards),
    # as the peer does from its first iteration, instead of from the exemplars alone.
    round0_pool: bool = False
    # Share the pool CE's weight among classes as the reference labels share the pixels (the anchor labels when
    # anchored, else the teacher's argmax over every pixel), not as the confident pixels do: a class the teacher
    # is eroding keeps few confident pixels, and without this the background's confident pixels outvote it
    # round after round (anchored, ACDC patient055: right ventricle 0.228 -> 0.114 test Dice).
    class_balance: bool = True
    strong_weight: float = 0.5  # weight of the mean loss of the two strong (CutMix) views
    feature_weight: float = 0.5  # weight of the feature-perturbation branch
    feature_dropout: float = 0.5  # Dropout2d probability on the encoder features of that branch
    cutmix_prob: float = 0.5  # per strong view
    # Weak views: geometry only, small ranges (flip always half the views; shift up to 10% of each side).
    weak_rotate_deg: float = 15.0
    weak_zoom: tuple[float, float] = (0.85, 1.2)  # drawn log-uniformly
    # Share of the iterations over which the pool terms' weight ramps up (exp(-5 (1 - t)^2)); 0, as UniMatch,
    # weights them fully from the start. At a short budget an untrained teacher's confident all-background labels
    # can lock the network into predicting background on the pool (phantoms, 4 labelled, 800 iterations, batches
    # of 4 pool images, earlier exemplar augmentation: Dice 0.004 against 0.64 exemplar-only on one of four
    # seeds); a ramp over the first 0.2 of training avoided it.
    rampup: float = 0.0

    def peer(self) -> ConsistencyConfig:
        """The settings of the ``consistency`` baseline: UniMatch as published, trained on the pool from the start.

        Caudo's guards are off: anchoring needs calibrated labels the baseline does not have, and the peer is the
        reference caudo is measured against, so it stays the published method.
        """
        return dataclasses.replace(self, enabled=True, anchored=False, class_balance=False, class_thresholds=False)

    def online_in_round(self, r: int) -> bool:
        """Whether caudo's round ``r`` trains by online consistency: every round, or from round 1 when anchored
        (unless ``round0_pool``)."""
        return self.enabled and (r > 0 or not self.anchored or self.round0_pool)

    def in_round(self, r: int) -> ConsistencyConfig:
        """The settings round ``r`` trains with: round 0 has no calibrated labels to anchor to."""
        return dataclasses.replace(self, anchored=False) if r == 0 else self

    def validate(self, key: str) -> None:
        _positive(f"{key}.unlabelled_batch_size", self.unlabelled_batch_size)
        _fraction(f"{key}.rampup", self.rampup, allow_zero=True)
        _fraction(f"{key}.threshold", self.threshold, allow_zero=True)
        _non_negative(f"{key}.strong_weight", self.strong_weight)
        _non_negative(f"{key}.feature_weight", self.feature_weight)
        _fraction(f"{key}.feature_dropout", self.feature_dropout, allow_zero=True)
        if self.feature_dropout == 1.0:
            raise ConfigError(f"{key}.feature_dropout", "must be < 1: a dropout of 1 removes every feature")
        _fraction(f"{key}.cutmix_prob", self.cutmix_prob, allow_zero=True)
        if not 0 <= self.weak_rotate_deg <= 180:
            raise ConfigError(f"{key}.weak_rotate_deg", f"must be in [0, 180], got {self.weak_rotate_deg}")
        lo, hi = self.weak_zoom
        if not 0 < lo <= hi:
            raise ConfigError(f"{key}.weak_zoom", f"needs 0 < low <= high, got {list(self.weak_zoom)}")


@dataclass
class GuardConfig:
    """The label-free drift guard (``caudo_ray.rounds.guard``): stop at a segmenter that does worse on augmented
    exemplar views than the best one before it, and keep that one."""

    enabled: bool = True
    # How much lower a segmenter's exemplar-view Dice, its mean over the classes, may be than the best earlier one's.
    tolerance: float = 0.05
    # How much lower it may be on any one class: wider, since a round that learns the pool trades some of one
    # class's fit to the exemplar for the others' (docs/method.md, "The drift guard").
    class_tolerance: float = 0.15

    def validate(self, key: str) -> None:
        _fraction(f"{key}.tolerance", self.tolerance, allow_zero=True)
        _fraction(f"{key}.class_tolerance", self.class_tolerance, allow_zero=True)


@dataclass
class RunConfig:
    """A whole self-training run."""

    work_dir: str = "runs/demo"
    rounds: int = 3
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    calibrator: CalibratorConfig = field(default_factory=CalibratorConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    annotations: AnnotationsConfig = field(default_factory=AnnotationsConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    consistency: ConsistencyConfig = field(default_factory=ConsistencyConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)

    def validate(self, key: str = "") -> None:
        _positive("rounds", self.rounds)
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError("device", f"must be auto, cpu or cuda, got {self.device!r}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate(f.name)

    def fraction_for_round(self, r: int) -> float:
        """Curriculum fraction after round ``r`` (the last one repeats)."""
        fracs = self.selection.fractions
        return fracs[min(r, len(fracs) - 1)]

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def method_hash(self) -> str:
        """Hash of everything that changes results; runtime, tracking and tune knobs are left out.

        A store written under one method hash is refused by a run with another, so resumed work never mixes
        labels from different settings. ``annotations`` says which answers are accepted; the answers themselves
        are data, recorded in the store.
        """
        d = self.to_dict()
        for key in ("runtime", "tracking", "tune", "annotations", "work_dir", "device"):
            d.pop(key)
        d["selection"].pop("query_strategy")  # which cases a person is asked about changes no label
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def load_config(source: str | Path | dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Build and validate a :class:`RunConfig` from a YAML file, a dict, or the defaults.

    Args:
        source: a YAML path, a mapping, or None for the defaults.
        overrides: dotted keys applied on top, e.g. ``{"calibrator.guidance_strength": 2.0}``.

    Raises:
        ConfigError: naming the first offending key.
    """
    if source is None:
        raw: dict[str, Any] = {}
    elif isinstance(source, dict):
        raw = dict(source)
    else:
        path = Path(source)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError("", f"config file {path} does not exist") from None
        except yaml.YAMLError as exc:
            raise ConfigError("", f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError("", f"config file {path} must hold a mapping at top level, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    cfg = _build(RunConfig, raw, "")
    cfg.validate()
    return cfg


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Dotted-key overrides from ``KEY=VALUE`` strings (the command line's ``--set``), values read as YAML.

    ``["calibrator.guidance_strength=3", "selection.fractions=[0.5, 1.0]"]`` gives
    ``{"calibrator.guidance_strength": 3, "selection.fractions": [0.5, 1.0]}``, ready for :func:`load_config`.

    Raises:
        ConfigError: naming the item without ``=``, or one whose value is not valid YAML.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(item, "--set takes KEY=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(key.strip(), f"--set value {value!r} is not valid YAML ({exc})") from None
    return out


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(dotted, f"{part} is not a section")
    node[parts[-1]] = value


def _build(cls: type, raw: Any, key: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(key, f"must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for name in raw:
        if name not in names:
            where = f"{key}.{name}" if key else str(name)
            raise ConfigError(where, f"unknown key (known: {', '.join(sorted(names))})")
    kwargs = {name: _coerce(hints[name], value, f"{key}.{name}" if key else name) for name, value in raw.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"must be a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(key, f"must have {len(args)} entries, got {len(value)}")
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        return origin(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {value!r}")
        return value
    raise ConfigError(key, f"unsupported type {tp}")  # pragma: no cover - guards new field types


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _positive(key: str, value: int) -> None:
    if value <= 0:
        raise ConfigError(key, f"must be > 0, got {value}")


def _non_negative(key: str, value: float) -> None:
    if value < 0:
        raise ConfigError(key, f"must be >= 0, got {value}")


def _positive_float(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(key, f"must be > 0, got {value}")


def _fraction(key: str, value: float, *, allow_zero: bool) -> None:
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value <= 1):
        raise ConfigError(key, f"must be in {'[0' if allow_zero else '(0'}, 1], got {value}")


def _size(key: str, value: tuple[int, int], minimum: int) -> None:
    if any(v < minimum for v in value):
        raise ConfigError(key, f"each side must be >= {minimum}, got {list(value)}")
