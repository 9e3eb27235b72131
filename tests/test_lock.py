"""Two runs pointed at one work dir: the second is refused with a message naming the holder."""

import subprocess
import sys
import time

import pytest

from caudo_ray.errors import StoreError
from caudo_ray.run.coordinator import Coordinator
from caudo_ray.run.prepare import prepare_run

pytestmark = pytest.mark.faults

HOLD = """
import sys, time
from caudo_ray.store import StoreLock
StoreLock(sys.argv[1]).acquire(owner="the other run")
print("locked", flush=True)
time.sleep(60)
"""


def test_second_run_on_a_locked_store_is_refused(tiny_cfg):
    prepared = prepare_run(tiny_cfg, progress=False)
    prepared.lock.release()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, prepared.workspace.store_url], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreError, match="in use by 'the other run'"):
            Coordinator(tiny_cfg, progress=False).run()
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its stale lock is taken over and the run goes through.
    time.sleep(0.1)
    result = Coordinator(tiny_cfg, progress=False).run()
    assert len(result.rounds) == tiny_cfg.rounds
