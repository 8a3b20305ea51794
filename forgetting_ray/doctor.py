"""`forgetting-ray doctor CONFIG`: pre-flight checks before spending GPU hours.

Each check returns PASS, WARN or FAIL with what to change; the command exits non-zero on a FAIL.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .cluster import autoscaler
from .cluster.autoscaler import Bundle, Infeasible
from .cluster.capacity import (
    alive_node_cpus,
    alive_node_resources,
    describe_nodes,
    describe_pool_problem,
    pool_bundles,
    starves_ray_data,
    worker_bundle,
)
from .cluster.devices import cluster_gpus, smallest_gpu_gib
from .cluster.session import default_storage_path, init_ray
from .config import PipelineConfig
from .data.readers import read_records, resolve_inputs
from .data.render import Renderer
from .models import load_tokenizer, resolve_model_path
from .plan import plan
from .store import is_uri, join_storage, probe_storage
from .submit import SubmitError, check_upload

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""


def _probe_storage(path: str, token: str) -> dict:
    """Runs on one node: write a probe object under ``path`` (folder or URI) and list the probes other nodes wrote."""
    import socket

    import pyarrow.fs as pafs

    folder = join_storage(path, ".doctor", token)
    try:
        probe_storage(folder)
        fs, root = pafs.FileSystem.from_uri(folder if is_uri(folder) else Path(folder).as_uri())
        with fs.open_output_stream(f"{root}/{socket.gethostname()}-{os.getpid()}") as out:
            out.write(b"ok")
        seen = sorted(Path(i.path).name for i in fs.get_file_info(pafs.FileSelector(root)))
        return {"host": socket.gethostname(), "ok": True, "seen": seen}
    except OSError as e:
        return {"host": socket.gethostname(), "ok": False, "error": str(e)}


def _working_nodes(ray) -> list[dict]:
    """Alive nodes that take tasks (a head started with CPU 0 runs only the driver)."""
    return [n for n in ray.nodes() if n["Alive"] and (n["Resources"].get("CPU", 0) or n["Resources"].get("GPU", 0))]


def check_storage(cfg: PipelineConfig) -> Check:
    """The driver and every node that does work write a probe into ``run_dir`` and the Ray Train storage
    (folder or object-storage URI), then one node must see them all: a local folder that only looks shared
    fails here, not hours into a run."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    paths = list(dict.fromkeys([cfg.run_dir, cfg.resources.storage_path or default_storage_path(cfg.run_dir)]))
    fix = "set run_dir (and resources.storage_path) to a bucket URI or a folder (NFS/EFS mount) every node can write"
    here = ray.get_runtime_context().get_node_id()
    workers = [n["NodeID"] for n in _working_nodes(ray) if n["NodeID"] != here]
    nodes = [here, *workers]
    token = uuid.uuid4().hex[:8]
    probe = ray.remote(num_cpus=0)(_probe_storage)
    for path in paths:
        results = [_probe_storage(path, token)] + ray.get([
            probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(path, token)
            for n in workers
        ])
        failed = [r for r in results if not r["ok"]]
        if failed:
            return Check("storage", FAIL, f"{path} not writable on {failed[0]['host']}: {failed[0]['error']}", fix)
        seen = set(_probe_storage(path, token)["seen"])
        if len(seen) < len(nodes):  # one probe per process: the driver's, one per worker node
            return Check("storage", FAIL, f"{path} is not shared: the driver sees {len(seen)} of the "
                         f"{len(nodes)} nodes' probes", fix)
    if not workers and cfg.resources.ray_address:
        return Check("storage", WARN, f"{', '.join(paths)} writable from the driver; no worker node is up to "
                     "check (an autoscaling cluster at min_workers 0)", "rerun with --request-resources")
    return Check("storage", PASS, f"{', '.join(paths)} writable from the driver and {len(workers)} worker node(s)")


def check_resources(cfg: PipelineConfig) -> Check:
    import ray

    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    s, r = cfg.scoring, cfg.resources
    score_cpu, score_gpu = s.concurrency * s.num_cpus_per_actor, s.concurrency * s.num_gpus_per_actor
    train_cpu, train_gpu = r.num_workers * r.cpus_per_worker, (r.num_workers if r.use_gpu else 0)
    problems = []
    # the same per-node rule the scoring and eval stages enforce before they start their pools
    nodes = alive_node_cpus(ray)
    if starves_ray_data(s, nodes):
        problems.append(describe_pool_problem("scoring", s, nodes))
    ev = cfg.eval
    if ev.enabled and ev.backend == "ray" and starves_ray_data(ev, nodes):
        problems.append(describe_pool_problem("eval", ev, nodes))
    if score_gpu > gpus:
        problems.append(f"scoring asks {score_gpu:g} GPUs, the cluster has {gpus:g}")
    if train_cpu > cpus:
        problems.append(f"training asks {train_cpu:g} CPUs, the cluster has {cpus:g}")
    if train_gpu > gpus:
        problems.append(f"training asks {train_gpu:g} GPUs, the cluster has {gpus:g}")
    if problems:
        return Check("resources", FAIL, "; ".join(problems),
                     "lower scoring/eval concurrency or num_cpus_per_actor, resources.num_workers, or add nodes")
    return Check("resources", PASS, f"cluster {cpus:g} CPU / {gpus:g} GPU; scoring {score_cpu:g}/{score_gpu:g}, "
                                   f"training {train_cpu:g}/{train_gpu:g}")


def check_model(cfg: PipelineConfig) -> Check:
    from transformers import AutoConfig


    try:
        path = resolve_model_path(cfg.model)
        mcfg = AutoConfig.from_pretrained(path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
        tok = load_tokenizer(cfg.model)
    except Exception as e:  # noqa: BLE001 - any load failure is the finding
        return Check("model", FAIL, f"{cfg.model.name_or_path}: {type(e).__name__}: {e}",
                     "point model.name_or_path at a local HF folder (config.json, *.safetensors, tokenizer)")
    if len(tok) > mcfg.vocab_size:
        return Check("model", FAIL, f"tokenizer has {len(tok)} tokens, the model's embedding {mcfg.vocab_size}",
                     "use the model's own tokenizer (model.tokenizer)")
    return Check("model", PASS, f"{mcfg.model_type}, vocab {mcfg.vocab_size}, template "
                                f"{'chat' if getattr(tok, 'chat_template', None) else 'tulu'}")


def check_masks(cfg: PipelineConfig, sample: int = 64) -> Check:
    try:
        files = resolve_inputs(cfg.data.train_files)
        renderer = Renderer(load_tokenizer(cfg.model), cfg.data.template, cfg.data.max_length)
        rendered = [renderer.render(rec) for rec in read_records(files, cfg.data, limit=sample)]
    except Exception as e:  # noqa: BLE001
        return Check("masks", FAIL, f"{type(e).__name__}: {e}", "fix the data files or data.template / data.column_map")
    if not rendered:
        return Check("masks", FAIL, "no records in data.train_files", "point data.train_files at the corpus")
    empty = sum(r.n_response == 0 for r in rendered)
    frac = sum(r.n_response for r in rendered) / max(1, sum(len(r.input_ids) for r in rendered))
    if empty == len(rendered):
        return Check("masks", FAIL, "no response token in any sampled record",
                     "check data.template and the chat template's assistant turns")
    status = WARN if empty else PASS
    return Check("masks", status, f"{len(rendered)} records sampled, {frac:.0%} response tokens, {empty} without any",
                 "raise data.max_length" if empty else "")


def check_memory_plan(cfg: PipelineConfig, gpu_memory_gib: float | None = None) -> Check:
    import ray


    nodes = [n for n in ray.nodes() if n["Alive"]]
    ft, r = cfg.training, cfg.resources
    gpus_per_node = int(max((n["Resources"].get("GPU", 0) for n in nodes), default=0))
    workers_per_node = min(r.num_workers, gpus_per_node) if r.use_gpu and gpus_per_node else r.num_workers
    num_nodes = max(1, -(-r.num_workers // max(1, workers_per_node)))
    ds = ft.deepspeed
    try:
        est = plan(resolve_model_path(cfg.model), num_nodes=num_nodes, gpus_per_node=max(1, workers_per_node),
                   lora=ft.lora.enabled, zero_stage=ds.zero_stage if ds.enabled else 0,
                   offload="all" if ds.offload_params else "optimizer" if ds.offload_optimizer else "none",
                   micro_batch_size=ft.micro_batch_size, seq_len=cfg.data.max_length, lora_r=ft.lora.r,
                   lora_targets=ft.lora.target_modules, gradient_checkpointing=ft.gradient_checkpointing,
                   attention=cfg.model.attn_implementation)
    except Exception as e:  # noqa: BLE001 - an unplannable model is a finding, not a crash
        return Check("memory plan", WARN, f"no estimate for {cfg.model.name_or_path}: {type(e).__name__}: {e}", "")
    # on CPU there is no CUDA context / NCCL buffer allowance
    per_worker = (est.gpu_total_bytes - (0 if r.use_gpu else est.gpu_runtime_bytes)) / 2**30
    node_ram = min((n["Resources"].get("memory", 0) for n in nodes), default=0) / 2**30
    summary = (f"{per_worker:.1f} GiB per worker ({est.params / 1e6:.3g}M params, {est.trainable_params / 1e6:.3g}M "
               f"trained, ZeRO-{est.zero_stage}, offload {est.offload}), {est.cpu_per_node_bytes / 2**30:.1f} GiB "
               f"host RAM per node")
    fix = ("enable gradient_checkpointing, LoRA, a higher ZeRO stage or offload, lower micro_batch_size / "
           "data.max_length, or add GPUs (see `forgetting-ray plan`)")
    if r.use_gpu:
        if gpu_memory_gib:
            limit, source = gpu_memory_gib, "--gpu-memory-gib"
        else:
            read = smallest_gpu_gib(cluster_gpus(ray))
            if read is None:
                return Check("memory plan", WARN, f"{summary}; no GPU node is up to read the GPUs' memory from",
                             "rerun when the GPU nodes are up (or with --request-resources), or pass --gpu-memory-gib")
            limit, source = read
        if not est.fits(limit):
            return Check("memory plan", FAIL, f"{summary}: over the {limit:.1f} GiB of a GPU ({source})", fix)
        summary += f"; fits the {limit:.1f} GiB of a GPU ({source})"
        host_need = est.cpu_per_node_bytes / 2**30
    else:  # on CPU the "device" memory is host memory too
        host_need = est.cpu_per_node_bytes / 2**30 + per_worker * workers_per_node
    if node_ram and host_need > node_ram:
        return Check("memory plan", FAIL, f"{summary}: needs {host_need:.1f} GiB RAM per node, Ray has "
                     f"{node_ram:.1f}", fix)
    return Check("memory plan", PASS, summary)


def check_upload_size(cfg: PipelineConfig) -> Check:
    try:
        size = check_upload(".", [".git"])
    except SubmitError as e:
        return Check("job working dir", FAIL, str(e), "add large paths to .rayignore")
    return Check("job working dir", PASS, f"{size.bytes / 2**20:.1f} MiB in {size.files} files")


CHECKS: list[Callable[..., Check]] = [
    check_resources, check_storage, check_model, check_masks, check_memory_plan, check_upload_size,
]


def stage_bundles(cfg: PipelineConfig) -> dict[str, list[Bundle]]:
    """Each stage's resource bundles, in the order the pipeline runs them (one stage at a time): the Ray Train
    workers of the reference and the fine-tunes, the scoring actors, the evaluation actors (each pool with the
    CPU Ray Data's own tasks need)."""
    out = {"training": [worker_bundle(cfg.resources)] * cfg.resources.num_workers,
           "scoring": pool_bundles(cfg.scoring, cfg.resources)}
    if cfg.eval.enabled and cfg.eval.backend == "ray":
        out["eval"] = pool_bundles(cfg.eval, cfg.resources)
    return out


def check_node_types(cfg: PipelineConfig) -> Check | None:
    """On an autoscaling cluster: its node types, and for each stage what the autoscaler would launch (or that
    no node type can ever hold it). None on a cluster without node types to read."""
    import ray

    types = autoscaler.cluster_node_types()
    if types is None:
        return None
    alive = alive_node_resources(ray)
    running = autoscaler.running_nodes_by_type()
    verdicts, failed = [], []
    for stage, bundles in stage_bundles(cfg).items():
        try:
            launch = autoscaler.nodes_to_launch(bundles, alive, types, running)
        except Infeasible as e:
            failed.append(f"{stage}: {e}")
            continue
        verdicts.append(f"{stage} " + (", ".join(f"+{n} {t}" for t, n in launch.items()) or "fits the alive nodes"))
    detail = f"node types {autoscaler.describe_node_types(types)}; " + "; ".join(failed or verdicts)
    if failed:
        return Check("node types", FAIL, detail, "add a node type that holds the stage, raise its max_workers, or "
                     "lower the stage's resources")
    return Check("node types", PASS, detail)


def request_stage_resources(cfg: PipelineConfig, wait_s: float, poll_s: float = 5.0) -> Check:
    """Ask the autoscaler for each stage's bundles in turn (the stages run one after the other, so their
    bundles are never needed together) and wait up to ``wait_s`` for each; the request is cleared at the end,
    so the nodes idle out when nothing uses them."""
    import time

    import ray

    held = []
    try:
        for stage, bundles in stage_bundles(cfg).items():
            autoscaler.request(bundles)
            deadline = time.monotonic() + wait_s
            while not autoscaler.pack(bundles, alive_node_resources(ray)):
                if time.monotonic() >= deadline:
                    return Check("autoscaler", FAIL, f"after {wait_s:g} s the cluster ({describe_nodes(ray)}) "
                                 f"cannot hold {stage}'s {autoscaler.describe_bundles(bundles)}; autoscaler "
                                 f"{autoscaler.launching()}", "check the node types and max_workers in "
                                 "cluster.yaml, the cloud quota, or `ray status` for pending nodes; a longer "
                                 "--wait for slow GPU instances")
                time.sleep(poll_s)
            held.append(f"{stage} {autoscaler.describe_bundles(bundles)}")
    finally:
        autoscaler.request([])
    return Check("autoscaler", PASS, f"the cluster held, stage by stage: {'; '.join(held)} (request cleared)")


def run_doctor(cfg: PipelineConfig, gpu_memory_gib: float | None = None, *,
               request_wait_s: float | None = None) -> list[Check]:
    """The checks; with ``request_wait_s`` the autoscaler is first asked for the stages' bundles (and the
    checks then see the nodes it added)."""
    init_ray(cfg.resources.ray_address)
    first = [check for check in [check_node_types(cfg)] if check is not None]
    if request_wait_s is not None:
        first.append(request_stage_resources(cfg, request_wait_s))
    return first + [fn(cfg, gpu_memory_gib) if fn is check_memory_plan else fn(cfg) for fn in CHECKS]


def format_checks(checks: list[Check]) -> str:
    lines = []
    for c in checks:
        lines.append(f"[{c.status}] {c.name}: {c.detail}")
        if c.status != PASS and c.fix:
            lines.append(f"        -> {c.fix}")
    return "\n".join(lines)
