"""Security (issue 6): Ray's dashboard/job API on loopback behind token auth, checkpoints are data not code, no
file escapes the work dir, MLflow artifact paths sanitised."""

from __future__ import annotations

import http.client
import io
import ipaddress
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import REPO_ROOT, tiny_config
from PIL import Image
from test_jobs import ray_cluster  # noqa: F401  (fixture: a real head node with token auth, own ports)

from benchmarks.throughput import NoopEngine
from benchmarks.workload import untrained_models
from caudo_ray.config import save_config
from caudo_ray.deploy.from_run import segmenter_of
from caudo_ray.deploy.segmenter import SPEC_FILE, WEIGHTS_FILE, Segmenter
from caudo_ray.errors import DataError, ModelFileError, StoreError
from caudo_ray.inference import predict_folder
from caudo_ray.networks.bundle import RoundModels
from caudo_ray.store import PseudoLabelStore, export_round
from caudo_ray.tracking.tracker import Tracker, sqlite_tracking_uri
from caudo_ray.training.checkpoint import TrainingCheckpoint

pytestmark = pytest.mark.faults


# --- Ray ---------------------------------------------------------------------------------------------------------

_LOCAL_RAY = """
import json, os, sys, ray
from caudo_ray.distributed.cluster import init_ray
from caudo_ray.config import load_config
init_ray(load_config(None, {"work_dir": sys.argv[1], "runtime.num_workers": 1, "runtime.trainer_cpus": 0}), log_to_driver=False)
children = {}
for p in filter(str.isdigit, os.listdir("/proc")):
    try:
        children.setdefault(int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1]), []).append(int(p))
    except OSError:
        pass
family, todo = [], [os.getpid()]
while todo:
    kids = children.get(todo.pop(), [])
    family += kids
    todo += kids
listening = {}  # socket inode -> local address (hex, as /proc/net/tcp* writes it)
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    for line in open(table).readlines()[1:]:
        f = line.split()
        if f[3] == "0A":
            listening[f[9]] = f[1]
listen = []
for pid in family:
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\\0", b" ").decode()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:[") and link[8:-1] in listening:
                listen.append([listening[link[8:-1]], cmd[:300]])
    except OSError:
        pass
print(json.dumps({"webui_url": ray._private.worker._global_node.address_info.get("webui_url"), "listen": listen}))
ray.shutdown()
"""


def test_local_ray_of_a_run_serves_no_dashboard_or_job_api(tmp_path):
    """``init_ray`` (what ``caudo-ray run`` starts) runs no dashboard, so no job API listens on any address."""
    env = {
        **os.environ,
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        "PYTHONPATH": str(REPO_ROOT),
    }
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-c", _LOCAL_RAY, str(tmp_path)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not info["webui_url"]
    assert info["listen"], "no Ray process listening: the probe saw nothing"
    # Ray's head keeps a minimal dashboard process (gRPC for the GCS) even without the dashboard; no port of the
    # local cluster may answer a job API request from a client without the token. Each is probed where it listens.
    for address, cmd in info["listen"]:
        url = _url_of(address)
        assert _job_api_status(url) != 200, (url, cmd)


def _ip_of(address: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """IP and port of a socket's local address as /proc/net/tcp or tcp6 writes it: hex, each 32-bit word of the IP
    in host byte order (little-endian on x86 and arm64)."""
    host, port = address.split(":")
    words = [bytes.fromhex(host[i : i + 8])[::-1] for i in range(0, len(host), 8)]
    return ipaddress.ip_address(b"".join(words)), int(port, 16)


def _url_of(address: str) -> str:
    """``http://host:port`` that reaches a listening socket of ``address`` (``_ip_of``'s form); a socket bound to
    the wildcard address is reached through loopback."""
    ip, port = _ip_of(address)
    if ip.is_unspecified:
        ip = ipaddress.ip_address("127.0.0.1" if ip.version == 4 else "::1")
    return f"http://{ip if ip.version == 4 else f'[{ip}]'}:{port}"


def _listening_addresses(port: int) -> list[str]:
    """Local addresses (``_ip_of``'s form) of every listening TCP socket on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and int(f[1].split(":")[1], 16) == port:
                found.append(f[1])
    return found


def test_url_of_reads_proc_net_addresses():
    assert _url_of("0100007F:1F90") == "http://127.0.0.1:8080"
    assert _url_of("00000000:0050") == "http://127.0.0.1:80"  # 0.0.0.0: any address, loopback included
    assert _url_of("0201A8C0:0016") == "http://192.168.1.2:22"
    assert _ip_of("00000000:0050")[0].is_unspecified and not _ip_of("00000000:0050")[0].is_loopback
    assert _url_of("00000000000000000000000001000000:1F90") == "http://[::1]:8080"
    assert _url_of("00000000000000000000000000000000:1F90") == "http://[::1]:8080"


def _job_api_status(url: str, token: str | None = None) -> int | None:
    """HTTP status of ``GET <url>/api/jobs/``, or None when the port does not speak HTTP/1 at all."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{url}/api/jobs/", headers=headers), timeout=10) as reply:
            return reply.status
    except urllib.error.HTTPError as err:
        return err.code
    except (OSError, http.client.HTTPException):
        return None


def test_project_never_disables_ray_token_auth():
    sources = [
        p
        for d in ("caudo_ray", "jobs", "benchmarks", ".ci")
        for p in (REPO_ROOT / d).rglob("*")
        if p.is_file() and p.suffix in (".py", ".yaml", ".sh", "")
    ]
    sources += [REPO_ROOT / "Makefile", REPO_ROOT / "ray_cluster.yaml"]
    offenders = [
        str(p)
        for p in sources
        if p.is_file()
        and "disabled" in p.read_text(errors="ignore")
        and "RAY_AUTH_MODE" in p.read_text(errors="ignore")
    ]
    assert offenders == []


def _non_loopback_ip() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent; the kernel picks the outgoing interface
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def test_job_api_refuses_a_client_without_the_token_and_stays_on_loopback(ray_cluster):  # noqa: F811
    env, url = ray_cluster
    assert _job_api_status(url) in (401, 403)
    assert _job_api_status(url, token="not-the-token") in (401, 403)
    assert _job_api_status(url, token=Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()) == 200
    # Every socket listening on the job API's port is bound to a loopback address, whatever addresses the machine has.
    port = int(url.rsplit(":", 1)[1])
    bound = _listening_addresses(port)
    assert bound, f"nothing listens on the job API's port {port}: the probe saw nothing"
    for address in bound:
        assert _ip_of(address)[0].is_loopback, f"the job API listens on {_ip_of(address)[0]}"  # a wildcard is not


def test_job_api_is_unreachable_from_a_non_loopback_address(ray_cluster):  # noqa: F811
    ip = _non_loopback_ip()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect from; the bound-address check still ran")
    port = int(ray_cluster[1].rsplit(":", 1)[1])
    with pytest.raises(OSError), socket.create_connection((ip, port), timeout=5):
        pass


# --- checkpoints ---------------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this would call ``open(marker, "w")``: a file appears if the loader ever runs code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_checkpoints_are_refused_and_their_payload_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    work = tmp_path / "run"
    (work / "models").mkdir(parents=True)
    save_config(tiny_config(work), work / "config.yaml")
    evil = work / "models" / "final.pt"
    torch.save({"round": 0, "segmenter": _Payload(marker)}, evil)
    refused = f"{evil}: not a loadable"
    with pytest.raises(ModelFileError, match="weights_only|Unsupported global|WeightsUnpickler") as err:
        RoundModels.load(evil)
    assert str(err.value).startswith(refused)
    with pytest.raises(ModelFileError, match="weights_only|Unsupported global|WeightsUnpickler") as err:
        TrainingCheckpoint(evil, key="any").load()
    assert str(err.value).startswith(refused)
    (tmp_path / "in").mkdir()
    with pytest.raises(ModelFileError, match="weights_only|Unsupported global|WeightsUnpickler") as err:
        predict_folder(work, tmp_path / "in", tmp_path / "out", progress=False)
    assert err.value.source == str(evil)
    assert not marker.exists()


def _tampered_files(good: bytes) -> dict[str, bytes]:
    """A real model file altered the ways a copy goes wrong or is tampered with."""
    other = torch.nn.Linear(2, 2).state_dict()
    buf = io.BytesIO()
    torch.save(other, buf)  # a valid torch file of someone else's weights
    wrapped = io.BytesIO()
    torch.save({"round": 0, "segmenter": [1, 2]}, wrapped)  # the right keys around data that is not weights
    return {
        "garbage": os.urandom(512),
        "truncated": good[: len(good) // 2],
        "flipped": good[:100] + bytes(b ^ 0xFF for b in good[100:400]) + good[400:],
        "other_weights": buf.getvalue(),
        "not_weights": wrapped.getvalue(),
        "empty": b"",
    }


UNREADABLE = ("garbage", "truncated", "flipped", "empty")


@pytest.mark.parametrize("kind", ["garbage", "truncated", "flipped", "other_weights", "not_weights", "empty"])
def test_tampered_model_files_are_refused_naming_the_file(tmp_path, kind):
    good = untrained_models(tiny_config(tmp_path / "run"), 2).to_bytes()
    path = tmp_path / "final.pt"
    path.write_bytes(_tampered_files(good)[kind])
    with pytest.raises(ModelFileError) as err:
        RoundModels.load(path)
    assert err.value.source == str(path) and str(err.value).startswith(f"{path}: ")
    assert isinstance(err.value, DataError)  # the command line reports it and exits 1, like any bad input file
    if kind in UNREADABLE:  # a readable dict of other training is a checkpoint to ignore, not to refuse
        with pytest.raises(ModelFileError, match=str(path)):
            TrainingCheckpoint(path, key="any").load()


# --- files stay inside their folders -----------------------------------------------------------------------------


def _store(path: Path, ids: list[str]) -> PseudoLabelStore:
    return PseudoLabelStore.create(str(path), case_ids=ids, working_size=(32, 32), num_classes=2, config_hash="h")


@pytest.mark.parametrize("hostile", ["../../x", "/etc/passwd", "a/b", "..", ".hidden", "a\\..\\b"])
def test_store_refuses_case_ids_that_could_leave_a_folder(tmp_path, hostile):
    with pytest.raises(DataError, match="unsafe case id"):
        _store(tmp_path / "s.zarr", ["ok", hostile])


def test_export_from_a_tampered_store_cannot_write_outside_its_folder(tmp_path):
    """A store whose id array was edited on disk to ``../../escaped``: export refuses before writing."""
    store = _store(tmp_path / "s.zarr", ["a", "b"])
    image = np.random.default_rng(0).random((2, 32, 32), dtype=np.float32)
    store.write_cases(
        np.arange(2),
        images=image,
        truth=(image > 0.5).astype(np.uint8),
        geometries=[{"shape": [32, 32], "format": "png", "source": "x.png"}] * 2,
    )
    store.rounds.begin(0, {})
    result = NoopEngine(None, untrained_models(tiny_config(tmp_path), 2), torch.device("cpu")).label_batch(image)
    store.rounds.write(0, np.arange(2), result.initial, result.calibrated, result.scores)
    ids = zarr.open_group(str(tmp_path / "s.zarr"), mode="r+")["cases/ids"]
    ids[0] = "../../escaped"
    out = tmp_path / "deep" / "er" / "labels"
    with pytest.raises(StoreError, match="would leave"):
        export_round(PseudoLabelStore.open(str(tmp_path / "s.zarr")), 0, out)
    assert not list(tmp_path.rglob("escaped*"))


def test_predict_writes_only_inside_the_output_folder(tmp_path):
    work = tmp_path / "run"
    (work / "models").mkdir(parents=True)
    cfg = tiny_config(work)
    save_config(cfg, work / "config.yaml")
    untrained_models(cfg, 2).save(work / "models" / "final.pt")
    inputs = tmp_path / "a" / "b" / "in"
    inputs.mkdir(parents=True)
    picture = (np.random.default_rng(1).random((40, 40)) * 255).astype(np.uint8)
    for name in (
        "a b;x.png",
        "%2E%2E%2Fx.png",
        "x..png",
        "..%2F..%2Fx.png",
    ):  # the last is hidden: ignored
        Image.fromarray(picture).save(inputs / name, format="PNG")
    (inputs / "link.png").symlink_to(
        tmp_path / "a" / "b" / "target.png"
    )  # dangling: ignored, nothing written through it
    out = tmp_path / "a" / "b" / "out"
    written, skipped = predict_folder(work, inputs, out, progress=False)
    assert len(written) == 3 and not skipped
    assert all(p.resolve().parent == out.resolve() for p in written)
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["in", "out"]


# --- MLflow --------------------------------------------------------------------------------------------------------


def test_mlflow_artifact_paths_are_sanitised_through_a_real_tracker(tmp_path):
    root = tmp_path / "mlartifacts"
    tracker = Tracker(sqlite_tracking_uri(Path(tmp_path) / "mlflow.db"), "sec", run_name="t", artifact_root=root)
    tracker.log_dict({"x": 1}, "../../escape.json")
    tracker.log_dict({"x": 2}, "/etc/abs.json")
    tracker.log_text("t", "rounds/../../../up/x.txt")
    tracker.log_image(np.zeros((8, 8, 3), np.uint8), "overlays/round_0/../../../../img.png")
    tracker.finish("FINISHED")
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file() and p.name != "mlflow.db")
    assert files and all(f.startswith("mlartifacts/") for f in files), files
    listed = [a.path for a in tracker.client.list_artifacts(tracker.run_id)]
    assert all(".." not in p and not p.startswith("/") for p in listed)
    assert {"escape.json", "etc"} <= set(listed)


@pytest.mark.parametrize("tamper", ["weights_garbage", "weights_truncated", "weights_other_shape", "spec_format", "spec_not_json"])
def test_exported_segmenter_refuses_tampered_files_naming_them(tmp_path, tamper):
    cfg = tiny_config(tmp_path / "run")
    folder = segmenter_of(cfg, untrained_models(cfg, 2)).save(tmp_path / "segmenter")
    weights, spec = folder / WEIGHTS_FILE, folder / SPEC_FILE
    if tamper == "weights_garbage":
        weights.write_bytes(os.urandom(256))
    elif tamper == "weights_truncated":
        weights.write_bytes(weights.read_bytes()[:-64])
    elif tamper == "weights_other_shape":  # a readable file of another network's weights
        segmenter_of(cfg, untrained_models(cfg, 3)).save(tmp_path / "other")
        weights.write_bytes((tmp_path / "other" / WEIGHTS_FILE).read_bytes())
    elif tamper == "spec_format":
        spec.write_text(json.dumps({**json.loads(spec.read_text()), "format": "pickle"}))
    else:
        spec.write_text("{not json")
    with pytest.raises(ModelFileError) as err:
        Segmenter.load(folder)
    assert err.value.source == str(spec if tamper.startswith("spec") else weights)
