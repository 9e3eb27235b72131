"""The pseudo-label store on Zarr v3: layout (chunks of a batch), cases and exemplars, round lifecycle, export, lock."""

from caudo_ray.store.export import export_round, export_volume
from caudo_ray.store.layout import DEFAULT_SCORE_NAMES, NO_TRUTH, SCHEMA_VERSION, chunk_batches
from caudo_ray.store.lock import StoreLock
from caudo_ray.store.rounds import RoundRecords
from caudo_ray.store.store import PseudoLabelStore, StoreNotFoundError

__all__ = [
    "DEFAULT_SCORE_NAMES",
    "NO_TRUTH",
    "SCHEMA_VERSION",
    "PseudoLabelStore",
    "RoundRecords",
    "StoreLock",
    "StoreNotFoundError",
    "chunk_batches",
    "export_round",
    "export_volume",
]
