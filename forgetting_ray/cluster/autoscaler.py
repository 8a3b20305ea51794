"""What an autoscaling cluster can still add, read from Ray, and the packing that decides whether a demand can
ever be met.

Ray's autoscaler v2 publishes its node types in the GCS (``ray._private.state.state.get_cluster_config()``).
The v1 autoscaler (what `ray up` runs by default) publishes only its status -- the JSON `ray status` prints,
under the GCS key ``__autoscaling_status`` -- and reads its node types from the YAML its monitor was started
with (`ray up` writes it to ``~/ray_bootstrap_config.yaml`` on the head, with every type's resources filled
in). A driver on the head (every ``ray job submit`` job) reads that same file; a driver elsewhere sees no node
types and falls back to waiting for Ray's placement (``resources.placement_timeout_s``).

The packing helpers are pure: the tests hand them node shapes directly.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Bundle = dict[str, float]
# What the v1 monitor's command line names, and where `ray up` puts it on the head.
AUTOSCALING_CONFIG_FLAG = "--autoscaling-config"
BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")
STATUS_KEY = "__autoscaling_status"  # ray._private.ray_constants.DEBUG_AUTOSCALING_STATUS
_SHAPE_KEYS = ("CPU", "GPU")  # what a bundle's description leads with; other resources follow by name


@dataclass(frozen=True)
class NodeType:
    """One node type the autoscaler may launch: the resources of one node and how many it may run."""

    name: str
    resources: Bundle
    max_workers: int


# ------------------------------------------------------------------------------------------
# pure: packing bundles into nodes
# ------------------------------------------------------------------------------------------
def describe_bundle(bundle: Bundle) -> str:
    keys = [k for k in _SHAPE_KEYS if bundle.get(k)] + sorted(k for k in bundle if k not in _SHAPE_KEYS and bundle[k])
    return "{" + ", ".join(f"{k}: {bundle[k]:g}" for k in keys) + "}"


def describe_bundles(bundles: list[Bundle]) -> str:
    """``2 x {CPU: 1, GPU: 1} + 1 x {CPU: 1}``, identical bundles counted together, in first-seen order."""
    counts: dict[str, int] = {}
    for b in bundles:
        counts[describe_bundle(b)] = counts.get(describe_bundle(b), 0) + 1
    return " + ".join(f"{n} x {shape}" for shape, n in counts.items())


def _fits(bundle: Bundle, free: Bundle) -> bool:
    return all(free.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items() if v)


def _take(bundle: Bundle, free: Bundle) -> None:
    for k, v in bundle.items():
        free[k] = free.get(k, 0.0) - v


def _largest_first(bundles: list[Bundle]) -> list[Bundle]:
    return sorted(bundles, key=lambda b: (b.get("GPU", 0.0), b.get("CPU", 0.0), len(b)), reverse=True)


def pack(bundles: list[Bundle], nodes: list[Bundle]) -> bool:
    """True when every bundle fits on one of ``nodes`` (each node's total resources), largest bundles first."""
    free = [dict(n) for n in nodes]
    for b in _largest_first(bundles):
        node = next((f for f in free if _fits(b, f)), None)
        if node is None:
            return False
        _take(b, node)
    return True


class Infeasible(ValueError):
    """No mix of the alive nodes and the node types' launches can hold the demand."""


def nodes_to_launch(bundles: list[Bundle], alive: list[Bundle], types: list[NodeType],
                    running: dict[str, int] | None = None) -> dict[str, int]:
    """How many nodes of each type the autoscaler must add for ``bundles`` to fit beside the ``alive`` nodes
    (first fit, largest bundles first; a new node is of the smallest type that holds the bundle, GPUs kept
    for bundles that ask for them). ``running``: nodes of each type already up, which count against its
    ``max_workers``. Raises :class:`Infeasible` naming the bundle and the node types' shapes."""
    free = [dict(n) for n in alive]
    launched: dict[str, int] = {}
    running = running or {}
    for b in _largest_first(bundles):
        node = next((f for f in free if _fits(b, f)), None)
        if node is not None:
            _take(b, node)
            continue
        holders = [t for t in types if _fits(b, t.resources)]
        if not holders:
            raise Infeasible(f"no node type can ever hold {describe_bundle(b)}; the node types are "
                             + describe_node_types(types))
        room = [t for t in holders if running.get(t.name, 0) + launched.get(t.name, 0) < t.max_workers]
        if not room:
            raise Infeasible(f"{describe_bundles(bundles)} needs more nodes than max_workers allows of "
                             + ", ".join(f"{t.name} ({t.max_workers})" for t in holders))
        pick = min(room, key=lambda t: (t.resources.get("GPU", 0.0), t.resources.get("CPU", 0.0)))
        launched[pick.name] = launched.get(pick.name, 0) + 1
        node = dict(pick.resources)
        _take(b, node)
        free.append(node)
    return launched


def describe_node_types(types: list[NodeType]) -> str:
    """Every node type's shape, largest first: ``gpu_13b {CPU: 96, GPU: 8, gpu_13b: 8} x<=2, ...``."""
    ordered = sorted(types, key=lambda t: (t.resources.get("GPU", 0.0), t.resources.get("CPU", 0.0)), reverse=True)
    return ", ".join(f"{t.name} {describe_bundle(t.resources)} x<={t.max_workers}" for t in ordered) or "none"


def node_types_from_config(config: dict[str, Any]) -> list[NodeType]:
    """The worker node types of an autoscaler YAML (``available_node_types`` less the head's: the head is up
    already, and counted among the alive nodes)."""
    head = config.get("head_node_type")
    return [NodeType(name, {k: float(v) for k, v in (spec.get("resources") or {}).items()},
                     int(spec.get("max_workers", config.get("max_workers", 0))))
            for name, spec in (config.get("available_node_types") or {}).items() if name != head]


# ------------------------------------------------------------------------------------------
# Ray glue: what the running cluster's autoscaler says
# ------------------------------------------------------------------------------------------
def _v1_config_path() -> Path | None:
    """The YAML the v1 autoscaler on this node was started with, else `ray up`'s bootstrap copy."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        args = proc.info.get("cmdline") or []
        if not any(a.endswith("monitor.py") for a in args):
            continue
        for i, a in enumerate(args):
            if a.startswith(AUTOSCALING_CONFIG_FLAG + "="):
                return Path(a.split("=", 1)[1]).expanduser()
            if a == AUTOSCALING_CONFIG_FLAG and i + 1 < len(args):
                return Path(args[i + 1]).expanduser()
    bootstrap = BOOTSTRAP_CONFIG.expanduser()
    return bootstrap if bootstrap.exists() else None


def cluster_node_types() -> list[NodeType] | None:
    """The node types this cluster's autoscaler may launch; None without an autoscaler this process can read
    (a fixed cluster, or a driver off the head of a v1 cluster). Needs ``ray.init`` first."""
    from ray._private.state import state

    try:
        published = state.get_cluster_config()  # autoscaler v2
    except Exception:  # noqa: BLE001 -- an older GCS without the key
        published = None
    if published is not None and published.node_group_configs:
        return [NodeType(g.name, {k: float(v) for k, v in g.resources.items()}, int(g.max_count))
                for g in published.node_group_configs if g.max_count != 0]
    if autoscaler_status() is None:
        return None
    path = _v1_config_path()
    if path is None or not path.exists():
        return None
    import yaml

    try:
        return node_types_from_config(yaml.safe_load(path.read_text()) or {})
    except (OSError, yaml.YAMLError, TypeError, ValueError) as e:
        log.warning("could not read the autoscaler's node types from %s: %s", path, e)
        return None


def autoscaler_status() -> dict[str, Any] | None:
    """The v1 autoscaler's report (what `ray status` prints); None when no autoscaler has reported."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

    if not _internal_kv_initialized():
        return None
    raw = _internal_kv_get(STATUS_KEY)
    if not raw:
        return None
    try:
        return json.loads(raw).get("autoscaler_report")
    except ValueError:
        return None


def running_nodes_by_type() -> dict[str, int]:
    """Worker nodes up or launching, by type, from the autoscaler's report."""
    report = autoscaler_status() or {}
    counts = dict(report.get("active_nodes") or {})
    for _ip, node_type, *_ in report.get("pending_nodes") or []:
        counts[node_type] = counts.get(node_type, 0) + 1
    for node_type, n in (report.get("pending_launches") or {}).items():
        counts[node_type] = counts.get(node_type, 0) + int(n)
    return counts


def launching() -> str:
    """What the autoscaler is adding now, in words: ``launching 1 gpu_8b, starting 1 cpu_worker``."""
    report = autoscaler_status() or {}
    parts = [f"launching {n} {t}" for t, n in (report.get("pending_launches") or {}).items() if n]
    starting: dict[str, int] = {}
    for _ip, node_type, *_ in report.get("pending_nodes") or []:
        starting[node_type] = starting.get(node_type, 0) + 1
    parts += [f"starting {n} {t}" for t, n in starting.items()]
    failed = report.get("failed_nodes") or []
    if failed:
        parts.append(f"{len(failed)} node launch(es) failed (`ray status` says why)")
    return ", ".join(parts) or "nothing launching yet"


def request(bundles: list[Bundle]) -> None:
    """Ask the autoscaler to hold ``bundles`` (an empty list clears the request, so idle nodes can go)."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)

