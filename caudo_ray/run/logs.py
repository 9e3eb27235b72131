"""The run's log file: every ``caudo_ray`` logger's lines of a process, also in ``<work_dir>/run.log``."""

from __future__ import annotations

import logging
from pathlib import Path


def attach_file_log(path: Path) -> None:
    """Send the ``caudo_ray`` loggers' lines of this process to ``path`` too (once per path)."""
    root = logging.getLogger("caudo_ray")  # the package's root logger: every module logs under it by __name__
    if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve() for h in root.handlers):
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO)
