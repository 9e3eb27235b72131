"""A run's work dir: every path inside it, in one place.

Layout::

    <work_dir>/
      config.yaml        the validated config the run uses
      split.json         exemplars / pool / val / test case ids
      store.zarr/        PseudoLabelStore (unless runtime.store_url points elsewhere)
      models/round_<r>.pt, models/final.pt   weights of each round and of the segmenter the run serves
      models/final_trained.pt                the final segmenter as trained (final.pt unless the drift guard
                                             kept an earlier round's)
      checkpoints/train_<r>.pt               training checkpoints (round ``rounds`` is the final segmenter)
      annotations/       answers to annotation queries, masks named <case_id>.<ext> (``caudo-ray annotate`` or by
                         hand); a run takes them in before each round's training and they join the exemplars
      annotations.jsonl  who gave each answer and when (``caudo-ray annotate``), moved into the store on intake
      annotations_replaced/   answers a later ``annotate --replace`` replaced, kept
      mlflow.db, mlartifacts/   default MLflow tracking store
      run.json           MLflow run id, so a resumed run logs into the run it started
      run.log            what was skipped and why, round summaries
      phantoms/          the embedded default data, generated when ``data.path`` is null
      dashboard.html     the run's label-quality dashboard
      ray_train/         Ray Train checkpoints of data-parallel training
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from caudo_ray.config import RunConfig

_ROUND_MODEL = "round_{}.pt"


@dataclass(frozen=True)
class Workspace:
    """Paths of one run's work dir, and where its store lives (``runtime.store_url``, default inside it)."""

    root: Path
    store_location: str | None = None

    @classmethod
    def of(cls, cfg: RunConfig) -> Workspace:
        return cls(Path(cfg.work_dir), cfg.runtime.store_url)

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def split_path(self) -> Path:
        return self.root / "split.json"

    @property
    def store_url(self) -> str:
        return self.store_location or str(self.root / "store.zarr")

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    def model_path(self, r: int) -> Path:
        return self.models_dir / _ROUND_MODEL.format(r)

    def next_round(self, rounds: int) -> int:
        """The first round whose models are not saved yet (``rounds``: the final segmenter; past it, one more):
        the first training an answer taken in now is part of."""
        saved = set(self.saved_rounds())
        first = next((r for r in range(rounds) if r not in saved), rounds)
        return rounds + 1 if first == rounds and self.trained_final_path.exists() else first

    def saved_rounds(self) -> list[int]:
        """Rounds whose models are saved, ascending."""
        found = []
        for path in self.models_dir.glob(_ROUND_MODEL.format("*")):
            number = path.stem.removeprefix("round_")
            if number.isdigit():
                found.append(int(number))
        return sorted(found)

    @property
    def final_model_path(self) -> Path:
        """The segmenter the run serves (``predict``, the MLflow model)."""
        return self.models_dir / "final.pt"

    @property
    def trained_final_path(self) -> Path:
        """The final segmenter as trained, which the drift guard may set aside for an earlier round's."""
        return self.models_dir / "final_trained.pt"

    def checkpoint_path(self, r: int) -> Path:
        """Round ``r``'s training checkpoint; the final segmenter's is round ``rounds``."""
        return self.root / "checkpoints" / f"train_{r}.pt"

    @property
    def annotations_dir(self) -> Path:
        return self.root / "annotations"

    @property
    def annotation_log_path(self) -> Path:
        return self.root / "annotations.jsonl"

    @property
    def replaced_annotations_dir(self) -> Path:
        return self.root / "annotations_replaced"

    @property
    def run_info_path(self) -> Path:
        return self.root / "run.json"

    @property
    def log_path(self) -> Path:
        return self.root / "run.log"

    @property
    def phantom_dir(self) -> Path:
        return self.root / "phantoms"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def artifacts_dir(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def dashboard_path(self) -> Path:
        return self.root / "dashboard.html"

    @property
    def ray_train_dir(self) -> Path:
        return self.root / "ray_train"

    def read_run_info(self) -> dict:
        return json.loads(self.run_info_path.read_text()) if self.run_info_path.exists() else {}

    def write_run_info(self, info: dict) -> None:
        tmp = self.run_info_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2))
        tmp.replace(self.run_info_path)
