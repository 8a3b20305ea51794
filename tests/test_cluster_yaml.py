"""cluster.yaml is checked with Ray's own cluster-config schema, as `ray up` does."""

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_cluster_yaml_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config = prepare_config(raw)
    validate_config(config)  # raises jsonschema.ValidationError / ValueError when invalid
    types = config["available_node_types"]
    assert config["head_node_type"] == "head" and types["head"]["resources"] == {"CPU": 0}
    assert {"gpu_8b", "gpu_13b"} <= set(types)


def test_services_bound_to_localhost_and_setup_idempotent():
    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    head_cmds = " ".join(raw["head_start_ray_commands"] + raw["head_setup_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmds
    assert "mlflow server --host 127.0.0.1" in head_cmds
    for cmd in raw["setup_commands"] + raw["head_setup_commands"]:
        # every command either guards itself or is naturally repeatable (pip install, mkdir -p)
        assert any(g in cmd for g in ("||", "pip install", "mkdir -p", "' > ~/")), cmd  # '> file' overwrites


def test_the_bucket_is_set_in_one_place_and_every_node_starts_ray_with_it():
    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    text = (REPO / "cluster.yaml").read_text()
    setters = [c for c in raw["setup_commands"] if "export FORGETTING_RAY_STORAGE=" in c]
    assert len(setters) == 1 and text.count("FORGETTING_RAY_STORAGE=") == 1
    for cmd in raw["head_start_ray_commands"][-1:] + raw["worker_start_ray_commands"][-1:]:
        assert cmd.startswith("source ~/.forgetting-ray.env;") and "ray start" in cmd
