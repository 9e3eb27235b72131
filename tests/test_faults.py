"""Faults a long run survives: a calibration worker, the driver or the trainer killed; a corrupt store chunk.

Each fault is injected for real (SIGKILL of an actor's or a command's process, flipped bytes in a chunk file) and
the outcome compared with an uninterrupted run of the same config, bit for bit: training is seeded and DDIM
calibration is deterministic on CPU.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    ONE_ROUND,
    REPO_ROOT,
    SCORE_ATOL,
    SCORE_RTOL,
    assert_labels_close,
    assert_selection_close,
    tiny_config,
)
from mlflow import MlflowClient
from test_cli import write_config
from test_coordinator import FailingExecutor, _chunk_mtimes, assert_complete_run

from caudo_ray.config import load_config, save_config
from caudo_ray.errors import StoreError
from caudo_ray.rounds.executor import TrainContext
from caudo_ray.run.coordinator import Coordinator
from caudo_ray.run.prepare import prepare_run
from caudo_ray.store import PseudoLabelStore
from caudo_ray.tracking import names
from caudo_ray.workspace import Workspace

pytestmark = pytest.mark.faults

# Metrics that are results (perf/* are timings and differ between any two runs).
RESULT_METRICS = [
    names.PSEUDO_DICE_INITIAL,
    names.PSEUDO_DICE_CALIBRATED,
    names.SELECTED,
    names.RELIABILITY_MEAN,
    names.AGREEMENT_MEAN,
    names.VAL_DICE,
]


@pytest.fixture(scope="module")
def clean(clean_one_round):
    """The uninterrupted one-round run every fault is compared with (conftest, shared by the fault modules)."""
    return clean_one_round


def assert_same_results(store: PseudoLabelStore, reference: PseudoLabelStore, rounds: int) -> None:
    """Label maps, scores and selections equal to float32 rounding (conftest: a case labelled in another batch
    composition, e.g. a re-queued or recomputed batch, gets differently ordered float reductions)."""
    assert store.case_ids == reference.case_ids
    for r in range(rounds):
        a, b = store.rounds.read(r), reference.rounds.read(r)
        assert_labels_close(a["initial"], b["initial"], f"round {r} initial")
        assert_labels_close(a["calibrated"], b["calibrated"], f"round {r} calibrated")
        for name, values in a["scores"].items():
            np.testing.assert_allclose(values, b["scores"][name], rtol=SCORE_RTOL, atol=SCORE_ATOL, err_msg=f"round {r} {name}")
        assert_selection_close(store.rounds.selected(r), reference.rounds.selected(r), b["scores"]["reliability"])


def assert_same_metrics(a: dict[str, list[tuple[int, float]]], b: dict[str, list[tuple[int, float]]]) -> None:
    """The same result metrics at the same steps, values to float32 rounding (see assert_same_results)."""
    assert a.keys() == b.keys()
    for name, series in a.items():
        assert [step for step, _ in series] == [step for step, _ in b[name]], name
        np.testing.assert_allclose([v for _, v in series], [v for _, v in b[name]], rtol=SCORE_RTOL, atol=SCORE_ATOL, err_msg=name)


def result_metrics(tracking_uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    client = MlflowClient(tracking_uri=tracking_uri)
    names = RESULT_METRICS + [k for k in client.get_run(run_id).data.metrics if k.startswith("final/")]
    return {n: sorted((m.step, m.value) for m in client.get_metric_history(run_id, n)) for n in names}


def done_files(store_url: str, r: int) -> int:
    """Batches of round ``r`` written done so far, counted from the ``done`` chunk files (cheap enough to poll)."""
    folder = Path(store_url) / "rounds" / str(r) / "done" / "c"
    return len(os.listdir(folder)) if folder.is_dir() else 0


def _chunk_of(store: PseudoLabelStore, i: int) -> list[int]:
    """The usable cases of round 0's chunk that holds case ``i``."""
    size = store.rounds.chunk_size(0)
    start = i // size * size
    return [j for j in range(start, min(start + size, store.num_cases)) if store.usable_mask()[j]]


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------------------------- 1. worker death


def test_killed_calibration_worker_is_replaced_and_its_batches_requeued(ray_session, clean, tmp_path):
    """SIGKILL one of two workers while it has batches in flight: the round completes, each case labelled once."""
    from caudo_ray.distributed.executor import RayExecutor

    class KillingExecutor(RayExecutor):
        """Kills worker 0's process when the coordinator hands out the ``kill_at``-th batch of the round."""

        kill_at = 4

        def label(self, r, models, batches):
            self.labelled = []
            for stats in super().label(r, models, self._killing(batches)):
                self.labelled.extend(stats.indices.tolist())
                yield stats

        def _killing(self, batches):
            for n, indices in enumerate(batches):
                if n == 0:  # the pool exists by now; ask before any batch queues up behind the call
                    self.victim = ray_session.get(self._workers[0].pid.remote())
                if n == self.kill_at:  # worker 0 has max_in_flight batches queued
                    os.kill(self.victim, signal.SIGKILL)
                yield indices

    cfg_ray = {
        "runtime.use_ray": True,
        "runtime.cpus_per_worker": 1,
        "runtime.trainer_cpus": 0,
        "runtime.batch_size": 2,
    }
    cfg = tiny_config(tmp_path / "run", **ONE_ROUND, **cfg_ray)
    executors = []
    result = Coordinator(
        cfg,
        executor_factory=lambda ctx: executors.append(KillingExecutor(ctx)) or executors[-1],
        progress=False,
    ).run()

    executor = executors[0]
    store = assert_complete_run(cfg, result)
    usable = np.flatnonzero(store.usable_mask())
    assert sorted(executor.labelled) == usable.tolist()  # every case reported exactly once
    assert executor.restarts >= 1  # batches of the dead worker were re-queued
    assert_same_results(store, PseudoLabelStore.open(clean[1].store_url), cfg.rounds)


# ----------------------------------------------------------------------------------------------- 2. driver death


def test_killed_driver_resumes_without_recomputing_done_cases(clean, tmp_path):
    """SIGKILL `caudo-ray run --no-ray` mid-round; the same command again resumes and ends where a clean run does.

    ``--no-ray``: the resume path is the coordinator's and the same with either executor; a Ray driver would add a
    local cluster start (10-25 s each on 2 loaded cores) to each of the two invocations without testing more of it.
    """
    config = write_config(tmp_path / "run.yaml", tmp_path / "run", **{"runtime.batch_size": 1})
    cfg = load_config(config)
    assert cfg.method_hash() == clean[0].method_hash()
    command = [
        str(REPO_ROOT / ".venv" / "bin" / "caudo-ray"),
        "run",
        "--no-ray",
        "--quiet",
        "--config",
        str(config),
    ]
    store_url = Workspace.of(cfg).store_url

    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300  # generous: the start alone takes minutes when the cores are shared
        while done_files(store_url, 0) < 3 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(driver.pid, signal.SIGKILL)
    finally:
        driver.wait()
    assert driver.returncode == -signal.SIGKILL  # killed, not finished

    store = PseudoLabelStore.open(store_url)
    usable = store.usable_mask()
    done_before = np.flatnonzero(store.rounds.done(0) & usable)
    assert 0 < len(done_before) < usable.sum() and store.rounds.committed() == []
    mtimes = _chunk_mtimes(store_url, 0, done_before)

    rerun = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    labelled, kept = map(
        int,
        re.search(r"round 0: labelling (\d+) cases, keeping (\d+) already done", rerun.stderr).groups(),
    )
    assert (labelled, kept) == (usable.sum() - len(done_before), len(done_before))
    assert _chunk_mtimes(store_url, 0, done_before) == mtimes  # the kept cases were not rewritten

    store = PseudoLabelStore.open(store_url)
    assert store.rounds.committed() == [0]
    assert_same_results(store, PseudoLabelStore.open(clean[1].store_url), cfg.rounds)
    info = Workspace.of(cfg).read_run_info()
    assert MlflowClient(tracking_uri=info["tracking_uri"]).get_run(info["run_id"]).info.status == "FINISHED"
    assert_same_metrics(result_metrics(info["tracking_uri"], info["run_id"]), result_metrics(clean[1].tracking_uri, clean[1].run_id))
    assert not (Path(cfg.work_dir) / "checkpoints").exists() or not any((Path(cfg.work_dir) / "checkpoints").iterdir())


# ----------------------------------------------------------------------------------------------- 3. trainer death

TRAIN = """
import sys, torch
torch.set_num_threads(1)
from caudo_ray.config import load_config
from caudo_ray.rounds.executor import TrainContext
cfg = load_config(sys.argv[1])
TrainContext(cfg, sys.argv[2], int(sys.argv[3])).train(0, None)
"""


def test_killed_trainer_resumes_from_its_last_checkpoint(tmp_path, caplog):
    """SIGKILL a process training round 0 after a checkpoint: training resumes there and ends on the same weights."""
    cfg = tiny_config(
        tmp_path / "run",
        **{
            "segmenter.iterations": 60,
            "calibrator.autoencoder_iterations": 30,
            "calibrator.denoiser_iterations": 30,
        },
        **{"runtime.checkpoint_every": 5},
    )
    prepared = prepare_run(cfg, progress=False)
    prepared.lock.release()
    save_config(cfg, tmp_path / "train.yaml")
    path = Workspace.of(cfg).checkpoint_path(0)
    trainer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            TRAIN,
            str(tmp_path / "train.yaml"),
            prepared.workspace.store_url,
            str(prepared.num_classes),
        ]
    )
    try:
        deadline = time.monotonic() + 300  # generous: the start alone takes minutes when the cores are shared
        while not path.exists() and trainer.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        # Killed mid-training, after a checkpoint: not before one (nothing to resume) nor after training ended.
        assert path.exists() and trainer.poll() is None, (path.exists(), trainer.returncode)
        os.kill(trainer.pid, signal.SIGKILL)
    finally:
        trainer.wait()
    assert trainer.returncode == -signal.SIGKILL
    saved = torch.load(path, weights_only=True)  # a checkpoint is data: it loads without unpickling code
    assert saved["iteration"] > 0

    ctx = TrainContext(cfg, prepared.workspace.store_url, prepared.num_classes)
    with caplog.at_level(logging.INFO, logger="caudo_ray"):
        resumed = ctx.train(0, None)
    assert f"{saved['phase']} iteration {saved['iteration']}" in caplog.text  # from the checkpoint, not from 0

    path.unlink()
    uninterrupted = ctx.train(0, None)
    for name in ("segmenter", "calibrator"):
        a, b = getattr(resumed, name), getattr(uninterrupted, name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{name}.{key}")


def test_killed_trainer_actor_is_restarted_and_resumes_its_round(ray_session, tmp_path):
    """SIGKILL the Ray trainer actor after its first checkpoint: Ray restarts it, training resumes, the run ends
    with the same labels and selection as an uninterrupted run."""
    from caudo_ray.distributed.executor import RayExecutor

    overrides = {
        **ONE_ROUND,
        "segmenter.iterations": 60,
        "calibrator.autoencoder_iterations": 30,
        "calibrator.denoiser_iterations": 30,
        "runtime.checkpoint_every": 5,
    }

    class KillingExecutor(RayExecutor):
        """Kills the trainer's process once round 0's first training checkpoint is on disk."""

        def train(self, r, previous, *, with_calibrator=True):
            self._start_trainer()
            if r == 0:
                victim = ray_session.get(self._trainer.pid.remote())
                path = Workspace.of(self.ctx.cfg).checkpoint_path(0)

                def kill_after_checkpoint():
                    deadline = time.monotonic() + 120
                    while not path.exists() and time.monotonic() < deadline:
                        time.sleep(0.01)
                    self.killed_at = torch.load(path, weights_only=True)["iteration"] if path.exists() else None
                    os.kill(victim, signal.SIGKILL)

                self.killer = threading.Thread(target=kill_after_checkpoint)
                self.killer.start()
            return super().train(r, previous, with_calibrator=with_calibrator)

    cfg = tiny_config(tmp_path / "run", **overrides, **{"runtime.use_ray": True, "runtime.trainer_cpus": 1, "runtime.cpus_per_worker": 1})
    executors = []
    result = Coordinator(cfg, executor_factory=lambda ctx: executors.append(KillingExecutor(ctx)) or executors[-1], progress=False).run()
    executors[0].killer.join()
    assert executors[0].killed_at  # killed mid-training, after a checkpoint
    store = assert_complete_run(cfg, result)
    # The restarted trainer said in the run's log where it resumed: not from iteration 0.
    resumed = re.findall(r"resuming training from \S+: (\w+) iteration (\d+)", (Path(cfg.work_dir) / "run.log").read_text())
    assert resumed and int(resumed[0][1]) > 0, resumed

    reference = Coordinator(tiny_config(tmp_path / "clean", **overrides), progress=False).run()
    assert_same_results(store, PseudoLabelStore.open(reference.store_url), cfg.rounds)


# ----------------------------------------------------------------------------------------------- 4. store integrity


def test_corrupt_chunk_is_reported_with_its_case_and_recomputed_on_resume(clean, tmp_path, caplog):
    cfg = tiny_config(tmp_path / "run", **ONE_ROUND, **{"runtime.batch_size": 4})
    with pytest.raises(KeyboardInterrupt):
        Coordinator(
            cfg,
            executor_factory=lambda ctx: FailingExecutor(ctx, fail_round=0, k=2),
            progress=False,
        ).run()
    store = PseudoLabelStore.open(Workspace.of(cfg).store_url)
    done_before = np.flatnonzero(store.rounds.done(0) & store.usable_mask())
    victims = _chunk_of(store, int(done_before[-1]))  # the last batch written: a corrupt chunk costs its batch
    ids = [store.case_ids[i] for i in victims]
    flip_bytes(Path(store.url) / "rounds" / "0" / "labels" / "c" / str(victims[0] // store.rounds.chunk_size(0)) / "0" / "0" / "0")

    with pytest.raises(StoreError, match=f"case {re.escape(ids[0])} .*holding cases {victims[0]}..{victims[-1]}"):
        store.rounds.read(0, done_before)
    assert store.rounds.verify(0) == victims

    with caplog.at_level(logging.INFO, logger="caudo_ray"):
        resumed = Coordinator(cfg, progress=False).run()
    assert f"round 0: {len(victims)} stored cases are corrupt and will be recomputed with the rest of their chunks ({len(victims)} cases): {ids}" in caplog.text
    assert resumed.recomputed == int(store.usable_mask().sum()) - len(done_before) + len(victims)
    assert_same_results(
        PseudoLabelStore.open(resumed.store_url),
        PseudoLabelStore.open(clean[1].store_url),
        cfg.rounds,
    )


def test_corrupt_chunk_of_a_committed_round_is_recomputed_on_rerun(clean, tmp_path, caplog):
    cfg = tiny_config(tmp_path / "run", **ONE_ROUND)
    finished = Coordinator(cfg, progress=False).run()
    store = PseudoLabelStore.open(finished.store_url)
    assert store.rounds.is_committed(0)
    victim = int(np.flatnonzero(store.rounds.selected(0))[0])  # a selected case: the final segmenter trained on it
    victims = _chunk_of(store, victim)
    ids = [store.case_ids[i] for i in victims]
    flip_bytes(Path(store.url) / "rounds" / "0" / "labels" / "c" / str(victim // store.rounds.chunk_size(0)) / "0" / "0" / "0")

    with caplog.at_level(logging.INFO, logger="caudo_ray"):
        rerun = Coordinator(cfg, progress=False).run()
    assert f"round 0: {len(victims)} stored cases are corrupt and will be recomputed with the rest of their chunks ({len(victims)} cases): {ids}" in caplog.text
    assert rerun.recomputed == len(victims)
    repaired = PseudoLabelStore.open(rerun.store_url)
    assert repaired.rounds.is_committed(0) and repaired.rounds.verify(0) == []
    assert_same_results(repaired, PseudoLabelStore.open(clean[1].store_url), cfg.rounds)
