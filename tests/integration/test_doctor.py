"""`forgetting-ray doctor` on a real local Ray cluster: a sound config passes, each broken setting
fails with a message naming what to change."""

from __future__ import annotations

import yaml

from forgetting_ray.cli import main

from conftest import FLAN_DIR


def _write_config(tmp_path, model_dir, **overrides) -> str:
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "model": {"name_or_path": str(model_dir)},
        "data": {"train_files": [str(FLAN_DIR / "qasc_train.tsv")], "max_length": 1024},
        "training": {"deepspeed": {"enabled": False}, "micro_batch_size": 2},
        "scoring": {"concurrency": 1, "num_cpus_per_actor": 0.5},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
        "tracking": {"enabled": False},
    }
    for dotted, value in overrides.items():
        node = cfg
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = tmp_path / "doctor.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _lines(capsys) -> dict[str, str]:
    out = capsys.readouterr().out
    return {line.split("]")[1].split(":")[0].strip(): line for line in out.splitlines() if line.startswith("[")} | {
        "_out": out}


def test_sound_config_passes_every_check(ray_cluster, tiny_llama, tmp_path, capsys):
    rc = main(["doctor", _write_config(tmp_path, tiny_llama)])
    lines = _lines(capsys)
    assert rc == 0, lines["_out"]
    for name in ("resources", "storage", "model", "masks", "memory plan", "job working dir"):
        assert lines[name].startswith("[PASS]"), lines["_out"]
    assert "writable from the driver and 0 worker node(s)" in lines["storage"]  # one node: the driver's
    assert "autoscaler" not in lines  # asked only with --request-resources
    assert "response tokens" in lines["masks"]


def test_each_problem_is_reported_with_a_fix(ray_cluster, tiny_llama, tmp_path, capsys):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where a folder should be")
    cfg = _write_config(
        tmp_path, tmp_path / "no-such-model",
        scoring__concurrency=8,  # 8 x 0.5 CPU on a 2-CPU cluster
        eval__concurrency=2,  # 2 x 1 CPU: nothing left for Ray Data's repartition tasks
        resources__storage_path=str(blocker / "storage"),
    )
    rc = main(["doctor", cfg])
    lines = _lines(capsys)
    assert rc == 1
    assert lines["resources"].startswith("[FAIL]") and "scoring actors take 4 of 2 CPUs" in lines["resources"]
    assert lines["storage"].startswith("[FAIL]") and "not writable" in lines["storage"]
    assert lines["model"].startswith("[FAIL]") and "no-such-model" in lines["model"]
    out = lines["_out"]
    assert "evaluation actors take 2 of 2 CPUs" in lines["resources"]
    assert "-> lower scoring/eval concurrency" in out
    assert "-> set run_dir (and resources.storage_path)" in out
    assert "-> point model.name_or_path" in out
    assert "fix: resources, storage, model" in out


def test_memory_plan_fails_when_the_model_cannot_fit(ray_cluster, tiny_llama, tmp_path, capsys):
    # full fine-tune of the tiny model at an absurd batch x length: activations exceed Ray's node memory
    cfg = _write_config(tmp_path, tiny_llama, training__lora={"enabled": False}, training__micro_batch_size=100000,
                        data__max_length=100000)
    rc = main(["doctor", cfg])
    lines = _lines(capsys)
    assert rc == 1
    assert lines["memory plan"].startswith("[FAIL]") and "RAM per node" in lines["memory plan"], lines["_out"]
    assert "see `forgetting-ray plan`" in lines["_out"]


def test_gpu_memory_is_read_from_the_cluster_not_assumed(ray_cluster, tiny_llama, tmp_path, capsys):
    """No built-in GPU size: on a cluster without GPU nodes the GPU plan check cannot judge and says so; a size
    given on the command line is used and named."""
    cfg = _write_config(tmp_path, tiny_llama, resources__use_gpu=True)
    main(["doctor", cfg])
    lines = _lines(capsys)
    assert lines["memory plan"].startswith("[WARN]") and "no GPU node is up" in lines["memory plan"], lines["_out"]
    main(["doctor", cfg, "--gpu-memory-gib", "0.001"])
    lines = _lines(capsys)
    assert lines["memory plan"].startswith("[FAIL]") and "GiB of a GPU (--gpu-memory-gib)" in lines["memory plan"]
    main(["doctor", cfg, "--gpu-memory-gib", "48"])
    assert "fits the 48.0 GiB of a GPU (--gpu-memory-gib)" in _lines(capsys)["memory plan"]


def test_request_resources_waits_for_the_stage_bundles_and_names_what_is_missing(ray_cluster, tiny_llama,
                                                                                 tmp_path, capsys):
    rc = main(["doctor", _write_config(tmp_path, tiny_llama), "--request-resources", "--wait", "5"])
    lines = _lines(capsys)
    assert rc == 0 and lines["autoscaler"].startswith("[PASS]"), lines["_out"]
    # stage by stage: 1 train worker x 1 CPU, then 1 scorer x 0.5 CPU beside Ray Data's CPU
    assert "training 1 x {CPU: 1}; scoring 1 x {CPU: 0.5} + 1 x {CPU: 1}" in lines["autoscaler"]
    assert "(request cleared)" in lines["autoscaler"]
    gpu = _write_config(tmp_path, tiny_llama, resources__use_gpu=True, resources__num_workers=2)
    rc = main(["doctor", gpu, "--request-resources", "--wait", "1"])
    lines = _lines(capsys)
    assert rc == 1 and lines["autoscaler"].startswith("[FAIL]"), lines["_out"]
    assert "cannot hold training's 2 x {CPU: 1, GPU: 1}" in lines["autoscaler"] and "max_workers" in lines["_out"]
