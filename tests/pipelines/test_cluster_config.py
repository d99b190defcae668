"""cluster.yaml against Ray's own cluster-config schema, after Ray fills in the provider defaults
(as `ray up` does before it touches AWS)."""

import os

import jsonschema
import pytest
import yaml

from tests.ray_helpers import ROOT


def _config():
    with open(os.path.join(ROOT, "cluster.yaml")) as f:
        return yaml.safe_load(f)


def test_cluster_yaml_validates_against_rays_schema():
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    config = prepare_config(_config())
    validate_config(config)
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    gpu = [n for n in nodes.values() if n["resources"].get("GPU", 0) >= 1]
    assert gpu and gpu[0]["max_workers"] > gpu[0]["min_workers"]  # the GPU group autoscales
    assert config["provider"]["type"] == "aws"
    setup = " ".join(config["setup_commands"])
    assert "AVER_REV=" in setup and "checkout" in setup  # installed at a pinned revision


def test_schema_rejects_a_broken_config():
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    broken = _config()
    broken["available_node_types"]["gpu_worker"]["resourcez"] = broken["available_node_types"]["gpu_worker"].pop("resources")
    with pytest.raises(jsonschema.ValidationError, match="resourcez"):
        validate_config(prepare_config(broken))
