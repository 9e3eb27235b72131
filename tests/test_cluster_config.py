"""ray_cluster.yaml, and its commented on-prem variant, pass Ray's own cluster-config validation."""

import re
from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "ray_cluster.yaml"


def _validated(config: dict) -> dict:
    config = prepare_config(config)
    validate_config(config)
    return config


def test_cloud_cluster_config_is_valid():
    config = _validated(yaml.safe_load(CLUSTER_YAML.read_text()))
    assert "gpu_worker" in config["available_node_types"]
    assert any("pip install" in c and "-e ." in c for c in config["setup_commands"])
    # The dashboard stays on the head's loopback.
    assert all("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"] if "ray start" in c)
    # Token authentication on every node (Ray 2.60 enables it by itself only for local clusters), all with the
    # same token file.
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in config[key] if "ray start" in c]
    assert len(starts) == 2 and all(c.startswith("RAY_AUTH_MODE=token ") for c in starts)
    assert any(target.endswith("/.ray/auth_token") for target in config["file_mounts"])


def test_on_prem_variant_is_valid():
    text = CLUSTER_YAML.read_text()
    block = "# provider:" + text.split("# On-prem variant", 1)[1].split("# provider:", 1)[1]
    onprem = yaml.safe_load("\n".join(re.sub(r"^# ?", "", line) for line in block.splitlines()))
    config = yaml.safe_load(text)
    config.update(provider=onprem["provider"], auth=onprem["auth"])
    del config["available_node_types"], config["head_node_type"]
    config = _validated(config)
    assert config["provider"]["type"] == "local"
