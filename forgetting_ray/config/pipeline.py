"""The whole run: every stage's section, MLflow tracking, Ray resources and where the run folder is."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from .base import Section
from .data import DataConfig
from .eval import EvalConfig
from .finetune import ReferenceConfig, TrainingConfig
from .model import ModelConfig
from .score import ScoringConfig, SelectionConfig
from .tune import TuneConfig


class TrackingConfig(Section):
    enabled: bool = Field(True, description="Log to MLflow.")
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI; None = $MLFLOW_TRACKING_URI or a sqlite store in the run directory.",
    )
    experiment_name: str = Field("forgetting-ray", description="MLflow experiment name.")
    upload_models: bool = Field(
        False, description="Copy each export's weights into MLflow with its LoggedModel (large); by default the "
        "model records the export's URI and sha256 and MLflow holds no weights."
    )
    register_as: str | None = Field(
        None, description="Register the pipeline's answer (the configured strategy's export, or Tune's best trial) "
        "in the MLflow Model Registry under this name: a new version tagged with the export's sha256 (an export "
        "already registered keeps its version). None: nothing is registered."
    )
    system_metrics: bool = Field(
        False,
        description="Also log system metrics: the driver node's CPU, memory, disk, network and GPUs on the pipeline "
        "run (MLflow's monitor, system/*), and with each optimizer step the rank-0 training worker's CPU, memory "
        "and GPU memory (system/rank0_*).",
    )
    system_metrics_interval_s: float = Field(
        10.0, gt=0, description="Seconds between two samples of the driver node's system metrics."
    )


class ResourcesConfig(Section):
    ray_address: str | None = Field(
        None, description="Ray cluster address; None = start or join a local cluster."
    )
    num_workers: int = Field(1, gt=0, description="Ray Train workers.")
    use_gpu: bool = Field(False, description="Train on GPUs.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per Ray Train worker.")
    storage_path: str | None = Field(
        None, description="Ray Train storage (shared across nodes); None = <run_dir>/ray_storage."
    )
    cpu_stands_in_for_gpu: bool = Field(
        False,
        description="For tests and CPU-only rehearsals: a stage configured for GPUs (resources.use_gpu, "
        "scoring/eval num_gpus_per_actor) that sees no CUDA device runs on the CPU instead of failing, over gloo. "
        "Off: such a stage stops with an error naming the setting.",
    )
    gpu_node_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Extra Ray resources asked for per GPU by every process that holds one (training workers "
        "with resources.use_gpu, scoring/eval actors with num_gpus_per_actor), to send a job to one node type: "
        "{gpu_13b: 1} lands on cluster.yaml's A100 type, {'accelerator_type:A100': 0.001} on any node where "
        "Ray detected an A100. Empty: any GPU node.",
    )
    placement_timeout_s: float = Field(
        1800.0, gt=0,
        description="How long a stage waits for Ray to place its training workers, scoring/eval actors (until "
        "their models are loaded) or Tune trials before it stops, naming what was pending. On an autoscaling "
        "cluster this covers the autoscaler's node launches (cloud GPU nodes take minutes); a demand no node "
        "type can hold, or (on a cluster this run started) no alive node, is refused before it starts.",
    )


STORAGE_ENV = "FORGETTING_RAY_STORAGE"


class PipelineConfig(Section):
    run_dir: str = Field(
        "runs/default",
        description="Where every artifact of the run is kept: a folder (local, or an NFS/EFS mount every node "
        "sees) or a bucket URI (s3://, gs://, abfs://; S3-compatible endpoints through AWS_ENDPOINT_URL). A "
        f"relative path lands under ${STORAGE_ENV} when that is set (cluster.yaml sets it once per cluster).",
    )
    run_dir_lock_stale_s: float = Field(
        120.0, gt=0,
        description="A run holds run_dir with a lock it renews every quarter of this; another run on the same "
        "run_dir stops at once naming the holder (host, pid, start), and takes the lock over when the holder's "
        "process is gone (same host) or its lock has not been renewed for this many seconds.",
    )
    seed: int = Field(42, description="Global seed.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model.")
    data: DataConfig = Field(default_factory=DataConfig, description="Corpus and prepare stage.")
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig, description="Reference SFT.")
    scoring: ScoringConfig = Field(default_factory=ScoringConfig, description="Influence scoring.")
    selection: SelectionConfig = Field(default_factory=SelectionConfig, description="Global top-rho partition.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Forgetting fine-tune.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation suite.")
    tune: TuneConfig = Field(default_factory=TuneConfig, description="Ray Tune search.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Ray resources.")
    baselines: list[Literal["sft", "ignore"]] = Field(
        default_factory=lambda: ["sft"],
        description="Extra fine-tunes on the same data and steps, for comparison: 'sft' (standard SFT) "
        "and/or 'ignore' (positives only).",
    )
    eval_base_model: bool = Field(True, description="Also evaluate the untouched base model.")

    @model_validator(mode="after")
    def _relative_run_dir_under_cluster_storage(self) -> "PipelineConfig":
        root = os.environ.get(STORAGE_ENV)
        if root and "://" not in self.run_dir and not Path(self.run_dir).expanduser().is_absolute():
            self.run_dir = "/".join([root.rstrip("/"), self.run_dir.strip("/")])
        return self
