"""cluster.yaml is checked with Ray's own cluster-config schema, as `ray up` does, and its commands that can run
here run the way Ray runs them; k8s/rayjob.yaml is checked against KubeRay's CRD field names and, through Ray's
KubeRay config reader, against cluster.yaml's node types."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import time
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
COMMAND_LISTS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                 "head_start_ray_commands", "worker_start_ray_commands")


def cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def all_commands(raw: dict) -> list[str]:
    cmds = [c for key in COMMAND_LISTS for c in raw.get(key, [])]
    for node_type in raw["available_node_types"].values():
        cmds += [c for key in COMMAND_LISTS for c in node_type.get(key, [])]
    return cmds


def the_install_line(raw: dict) -> str:
    (line,) = [c for c in all_commands(raw) if "pip install" in c and "torch" in c]
    return line


def pins(words: list[str]) -> dict[str, str]:
    """name (extras kept) -> exact version, for every `name==version` among ``words``."""
    return {m[1]: m[2] for w in words if (m := re.fullmatch(r"([A-Za-z0-9_.\-\[\],]+)==([0-9][^\s;]*)", w))}


def project_dependencies() -> list[Requirement]:
    return [Requirement(d) for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]]


def constraints() -> dict[str, str]:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    return pins([ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")])


def test_cluster_yaml_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(cluster())
    validate_config(config)  # raises jsonschema.ValidationError / ValueError when invalid
    types = config["available_node_types"]
    assert config["head_node_type"] == "head" and types["head"]["resources"] == {"CPU": 0}
    assert {"gpu_8b", "gpu_13b"} <= set(types)


def test_services_bound_to_localhost_and_setup_idempotent():
    raw = cluster()
    head_cmds = " ".join(raw["head_start_ray_commands"] + raw["head_setup_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmds
    assert "mlflow server --host 127.0.0.1" in head_cmds
    for cmd in raw["setup_commands"] + raw["head_setup_commands"]:
        # every command either guards itself or is naturally repeatable (pip install, mkdir -p)
        assert any(g in cmd for g in ("||", "pip install", "mkdir -p", "' > ~/")), cmd  # '> file' overwrites


def test_the_bucket_is_set_in_one_place_and_every_node_starts_ray_with_it():
    raw = cluster()
    text = (REPO / "cluster.yaml").read_text()
    setters = [c for c in raw["setup_commands"] if "export FORGETTING_RAY_STORAGE=" in c]
    assert len(setters) == 1 and text.count("FORGETTING_RAY_STORAGE=") == 1
    for cmd in raw["head_start_ray_commands"][-1:] + raw["worker_start_ray_commands"][-1:]:
        assert cmd.startswith("source ~/.forgetting-ray.env;") and "ray start" in cmd


def test_one_install_with_exact_pins_of_the_tested_stack():
    raw = cluster()
    line = the_install_line(raw)  # the only command that installs torch: no second torch build
    words = shlex.split(line)
    assert "||" not in line, "a fallback would install without the constraints"
    assert words[words.index("-c") + 1] == "~/forgetting-ray/constraints.txt" and "boto3" in words
    got = pins(words)
    (ray_pin,) = [k for k in got if k.startswith("ray[")]
    # the versions this repository is tested with (the local venv), so the cluster runs what the tests ran
    assert got[ray_pin] == version("ray") == "2.60.0"
    assert got["torch"] == version("torch").split("+")[0] == constraints()["torch"]
    assert got["deepspeed"] == version("deepspeed")
    deps = {canonicalize_name(r.name): r for r in project_dependencies()}
    assert set(Requirement(ray_pin).extras) == set(deps["ray"].extras)
    for name in ("ray", "torch", "deepspeed"):
        assert deps[name].specifier.contains(got[ray_pin if name == "ray" else name]), name
    # one venv, made once, from an interpreter the project supports
    assert [c for c in all_commands(raw) if "-m venv" in c] and all(
        "python3.11 -m venv" in c for c in all_commands(raw) if "-m venv" in c)


def test_rsync_follows_gitignore():
    raw = cluster()
    assert ".gitignore" in raw["rsync_filter"]
    assert {".venv", "runs", ".git"} <= set(raw["rsync_exclude"])


def test_node_types_image_profiles_and_the_a100_route():
    types = cluster()["available_node_types"]
    images = {t["node_config"].get("ImageId") for t in types.values()}
    assert len(images) == 1 and "ubuntu-22.04" in images.pop()  # one system everywhere, not Ray's 18.04 default
    for name, t in types.items():
        if name == "head":
            continue
        assert t["min_workers"] == 0, name
        assert t["node_config"].get("IamInstanceProfile"), f"{name}: Ray gives its own profile to the head only"
    r13, r8 = types["gpu_13b"]["resources"], types["gpu_8b"]["resources"]
    assert r13["gpu_13b"] == r13["GPU"] > 0 and "gpu_13b" not in r8


def test_each_preset_lands_on_a_node_type_that_holds_it_and_13b_on_the_a100s():
    """What the autoscaler would launch for each preset's training workers, read from cluster.yaml's node types
    as a stage does on the head: 8B on the L40S type, 13B (resources.gpu_node_resources) on the A100 type."""
    from forgetting_ray.cluster.autoscaler import nodes_to_launch, node_types_from_config
    from forgetting_ray.cluster.capacity import worker_bundle
    from forgetting_ray.config import load_config

    types = node_types_from_config(cluster())
    head = [{"CPU": 0.0}]
    launches = {}
    for preset in ("llama-3.1-8b", "llama-2-13b"):
        res = load_config(f"jobs/configs/{preset}.yaml").resources
        launches[preset] = nodes_to_launch([worker_bundle(res)] * res.num_workers, head, types)
    assert launches == {"llama-3.1-8b": {"gpu_8b": 1}, "llama-2-13b": {"gpu_13b": 1}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_ray_runs_it(cmd: str, home: Path, **env: str) -> subprocess.CompletedProcess:
    """``cmd`` the way Ray's SSH command runner runs it on a node: `bash --login -c -i '...'` (Ray's own
    wrapping), itself started by a login shell's `-c` as sshd does."""
    from ray.autoscaler._private.command_runner import _with_interactive

    full_env = {"HOME": str(home), "PATH": os.environ["PATH"], "LANG": "C.UTF-8", **env}
    return subprocess.run(" ".join(_with_interactive(cmd)), shell=True, env=full_env, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def node_home(tmp_path):
    """A fresh node's home after the first two setup commands (the env file and .bashrc sourcing it)."""
    home = tmp_path / "home"
    home.mkdir()
    for cmd in cluster()["setup_commands"][:2]:
        assert _as_ray_runs_it(cmd, home).returncode == 0, cmd
    assert "FORGETTING_RAY_STORAGE" in (home / ".forgetting-ray.env").read_text()
    return home


MLFLOW_SHIM = """#!{python}
# stands in for `mlflow server`: records its arguments and its pid, answers /health
import http.server, os, sys
args = sys.argv[1:]
with open(os.path.join(os.environ["HOME"], "mlflow-calls.txt"), "a") as f:
    f.write(f"{{os.getpid()}} {{' '.join(args)}}\\n")
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(args[args.index("--port") + 1])), Health).serve_forever()
"""


def test_mlflow_start_line_does_not_match_itself_and_starts_once(node_home):
    import sys

    raw = cluster()
    (line,) = [c for c in raw["head_start_ray_commands"] if "mlflow server" in c]
    port = _free_port()
    line = line.replace("5000", str(port))  # this machine's 5000 may be taken
    shim = node_home / "venv" / "bin" / "mlflow"
    shim.parent.mkdir(parents=True)
    shim.write_text(MLFLOW_SHIM.format(python=sys.executable))
    shim.chmod(0o755)
    calls = node_home / "mlflow-calls.txt"

    def started() -> list[list[str]]:
        return [ln.split() for ln in calls.read_text().splitlines()] if calls.exists() else []

    # the check this line replaces: under Ray's wrapping it finds its own shell, with no server running
    canary = _as_ray_runs_it('pgrep -f "mlflow server" >/dev/null && echo found', node_home)
    assert "found" in canary.stdout
    try:
        first = _as_ray_runs_it(line, node_home)
        assert first.returncode == 0, first.stdout + first.stderr
        assert len(started()) == 1
        args = started()[0][1:]
        assert args[:5] == ["server", "--host", "127.0.0.1", "--port", str(port)]
        bucket = re.search(r"FORGETTING_RAY_STORAGE=(\S+)", (node_home / ".forgetting-ray.env").read_text())[1]
        assert args[args.index("--artifacts-destination") + 1] == f"{bucket}/mlflow-artifacts"
        assert args[args.index("--backend-store-uri") + 1] == f"sqlite:///{node_home}/mlflow/mlflow.db"
        assert int((node_home / "mlflow" / "server.pid").read_text()) == int(started()[0][0])

        second = _as_ray_runs_it(line, node_home)  # `ray up` again: the server answers, nothing new starts
        assert second.returncode == 0 and len(started()) == 1

        os.kill(int(started()[0][0]), signal.SIGTERM)  # the server died (or the head was stopped)
        time.sleep(0.2)
        third = _as_ray_runs_it(line, node_home)
        assert third.returncode == 0 and len(started()) == 2
    finally:
        for pid, *_ in started():
            try:
                os.kill(int(pid), signal.SIGTERM)
            except ProcessLookupError:
                pass


def test_hf_token_lands_private_or_is_skipped(node_home):
    (line,) = [c for c in cluster()["setup_commands"] if "hf-token" in c]
    py = node_home / "venv" / "bin" / "python"  # stands in for the venv's python asking SSM
    py.parent.mkdir(parents=True)
    py.write_text('#!/bin/sh\n[ "$FAKE_SSM" = ok ] && echo hf_test_value && exit 0\n'
                  'echo "AccessDeniedException" >&2; exit 1\n')
    py.chmod(0o755)
    token = node_home / ".cache" / "huggingface" / "token"

    ok = _as_ray_runs_it(line, node_home, FAKE_SSM="ok")
    assert ok.returncode == 0 and token.read_text() == "hf_test_value\n"
    assert token.stat().st_mode & 0o077 == 0

    denied = _as_ray_runs_it(line, node_home)
    assert denied.returncode == 0 and "public models only" in denied.stdout
    assert token.read_text() == "hf_test_value\n" and not (token.parent / "token.new").exists()


# ---------------------------------------------------------------------------------------------------------
# k8s/rayjob.yaml
# ---------------------------------------------------------------------------------------------------------
# Field names of KubeRay's published CRDs, apiVersion ray.io/v1 (KubeRay 1.x: ray-operator/config/crd/bases/
# ray.io_rayjobs.yaml, whose spec.rayClusterSpec is ray.io_rayclusters.yaml's spec), and of the core/v1 pod
# template, service account and volume claim they embed: the subset a manifest here may use. ANY: a map whose
# keys are the user's (labels, node selectors, resource quantities, rayStartParams); None: a leaf.
ANY = "any"


def fields(*names: str, **nested) -> dict:
    return {**dict.fromkeys(names), **nested}


METADATA = fields("name", "namespace", "labels", "annotations", labels=ANY, annotations=ANY)
ENV = fields("name", "value", valueFrom=fields(secretKeyRef=fields("name", "key", "optional"),
                                                configMapKeyRef=fields("name", "key", "optional"),
                                                fieldRef=fields("fieldPath")))
PROBE = fields("initialDelaySeconds", "periodSeconds", "timeoutSeconds", "failureThreshold", "successThreshold",
               exec=fields("command"), httpGet=fields("path", "port", "host"), tcpSocket=fields("port"))
CONTAINER = fields("name", "image", "imagePullPolicy", "command", "args", "workingDir",
                   env=[ENV], envFrom=ANY, ports=[fields("containerPort", "name", "protocol")],
                   resources=fields(requests=ANY, limits=ANY),
                   volumeMounts=[fields("name", "mountPath", "readOnly", "subPath")],
                   startupProbe=PROBE, readinessProbe=PROBE, livenessProbe=PROBE, securityContext=ANY, lifecycle=ANY)
POD_TEMPLATE = fields(metadata=METADATA, spec=fields(
    "serviceAccountName", "priorityClassName", "terminationGracePeriodSeconds",
    containers=[CONTAINER], initContainers=[CONTAINER], nodeSelector=ANY, affinity=ANY, imagePullSecrets=ANY,
    tolerations=[fields("key", "operator", "value", "effect", "tolerationSeconds")],
    securityContext=fields("fsGroup", "runAsUser", "runAsGroup", "runAsNonRoot"),
    volumes=[fields("name", emptyDir=fields("medium", "sizeLimit"),
                    persistentVolumeClaim=fields("claimName", "readOnly"),
                    secret=fields("secretName"), configMap=fields("name"))]))
HEAD_GROUP_SPEC = fields("serviceType", "enableIngress", rayStartParams=ANY, template=POD_TEMPLATE, headService=ANY)
WORKER_GROUP_SPEC = fields("groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "idleTimeoutSeconds",
                           "suspend", rayStartParams=ANY, template=POD_TEMPLATE,
                           scaleStrategy=fields("workersToDelete"))
RAY_CLUSTER_SPEC = fields(
    "rayVersion", "enableInTreeAutoscaling", "suspend", "managedBy",
    autoscalerOptions=fields("upscalingMode", "idleTimeoutSeconds", "image", "imagePullPolicy", "version",
                             resources=fields(requests=ANY, limits=ANY), env=[ENV], envFrom=ANY,
                             securityContext=ANY, volumeMounts=ANY),
    headGroupSpec=HEAD_GROUP_SPEC, workerGroupSpecs=[WORKER_GROUP_SPEC], headServiceAnnotations=ANY,
    gcsFaultToleranceOptions=ANY)
RAYJOB = fields("apiVersion", "kind", metadata=METADATA, spec=fields(
    "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished",
    "activeDeadlineSeconds", "backoffLimit", "suspend", "entrypointNumCpus", "entrypointNumGpus",
    "entrypointResources", "managedBy",
    rayClusterSpec=RAY_CLUSTER_SPEC, clusterSelector=ANY, submitterPodTemplate=POD_TEMPLATE,
    submitterConfig=fields("backoffLimit"), deletionStrategy=ANY))
SERVICE_ACCOUNT = fields("apiVersion", "kind", metadata=METADATA)
PVC = fields("apiVersion", "kind", metadata=METADATA, spec=fields(
    "accessModes", "storageClassName", "volumeMode", resources=fields(requests=ANY)))
SCHEMAS = {"RayJob": RAYJOB, "ServiceAccount": SERVICE_ACCOUNT, "PersistentVolumeClaim": PVC}


def unknown_fields(doc, schema, path="") -> list[str]:
    if schema == ANY:
        return []
    if isinstance(schema, list):
        return [p for i, item in enumerate(doc) for p in unknown_fields(item, schema[0], f"{path}[{i}]")]
    if schema is None:
        return [] if not isinstance(doc, dict) else [f"{path} (a leaf holds a map)"]
    if not isinstance(doc, dict):
        return [f"{path} (expected a map)"]
    return [p for k, v in doc.items()
            for p in ([f"{path}.{k}"] if k not in schema else unknown_fields(v, schema[k], f"{path}.{k}"))]


def rayjob_docs() -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all((REPO / "k8s" / "rayjob.yaml").read_text())}


def test_rayjob_uses_only_crd_fields():
    docs = rayjob_docs()
    assert set(docs) == set(SCHEMAS)
    job = docs["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    for kind, doc in docs.items():
        assert unknown_fields(doc, SCHEMAS[kind]) == [], kind
    spec = job["spec"]["rayClusterSpec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())  # the CRD types them as strings


def test_rayjob_is_cluster_yaml_on_kuberay():
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    docs, raw = rayjob_docs(), cluster()
    job = docs["RayJob"]
    spec = job["spec"]["rayClusterSpec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    # what Ray's autoscaler reads from the RayCluster KubeRay makes of it (validated with Ray's schema)
    derived = _derive_autoscaling_config_from_ray_cr(
        {"metadata": {"name": "forgetting-ray", "namespace": "default"}, "spec": spec})
    kinds = derived["available_node_types"]
    assert kinds.pop("headgroup")["resources"]["CPU"] == 0
    workers = {k: v for k, v in raw["available_node_types"].items() if k != raw["head_node_type"]}
    assert set(kinds) == {name.replace("_", "-") for name in workers}
    for name, t in workers.items():
        k = kinds[name.replace("_", "-")]
        assert k["min_workers"] == t["min_workers"] == 0 and k["max_workers"] == t["max_workers"], name
        custom = {r: n for r, n in t["resources"].items() if r not in ("CPU", "memory")}
        assert {r: k["resources"].get(r) for r in custom} == custom, name
    assert derived["idle_timeout_minutes"] == raw["idle_timeout_minutes"]
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] == group["replicas"] == 0, group["groupName"]

    # service-account access to the bucket: IRSA on the one account every Ray pod runs as
    account = docs["ServiceAccount"]
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    templates = [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]
    assert {t["spec"]["serviceAccountName"] for t in templates} == {account["metadata"]["name"]}

    # the same storage setting and the same pins as cluster.yaml
    (setter,) = [c for c in raw["setup_commands"] if "export FORGETTING_RAY_STORAGE=" in c]
    bucket = re.search(r"FORGETTING_RAY_STORAGE=(\S+)", setter)[1]
    for t in templates:
        env = {e["name"]: e.get("value") for e in t["spec"]["containers"][0]["env"]}
        assert env["FORGETTING_RAY_STORAGE"] == bucket
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    packages = runtime_env["pip"]["packages"]
    assert pins(packages) == pins(shlex.split(the_install_line(raw))) | {"mlflow": constraints()["mlflow"]}
    ray_version = pins(packages)[next(k for k in pins(packages) if k.startswith("ray["))]
    assert spec["rayVersion"] == ray_version
    images = {c["image"] for t in templates for c in t["spec"]["containers"]}
    assert images == {f"rayproject/ray:{ray_version}-py311-cu128"}
    listed = {canonicalize_name(Requirement(p).name) for p in packages}
    assert {canonicalize_name(r.name) for r in project_dependencies()} <= listed  # no dependency left out
    assert runtime_env["working_dir"].startswith(bucket + "/") and runtime_env["working_dir"].endswith(".zip")
    assert job["spec"]["entrypoint"].startswith("python jobs/pipeline.py --config jobs/configs/")
