"""The ``forgetting-ray`` command: one sub-command per stage, plus ``run`` for the whole pipeline.

Every sub-command takes a YAML config and dotted overrides, e.g.
``forgetting-ray train jobs/configs/llama-3.2-1b.yaml training.lr=2e-5``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from .config import PipelineConfig, config_reference_markdown, dump_config, load_config
from .console import adopt_console, close_log_file, current_log_file, log_to_file, run_relayed, setup_console
from .errors import UserError

log = logging.getLogger("forgetting_ray")


def _log_file(cfg: PipelineConfig) -> Path:
    """Every record of this run, Ray's and the libraries' included, in ``<run_dir>/logs/driver.log``."""
    from .store import run_root

    root = run_root(cfg.run_dir)
    try:
        return log_to_file(root / "logs")
    except OSError as e:  # the first write of a run: a read-only folder, or a file where run_dir should be
        from .cluster.run_dir import RunDirError

        raise RunDirError(f"run_dir {root} is not writable ({e.strerror or e}): set run_dir to a folder this user "
                          "can create and write") from None


def _keep_logs(since: float) -> None:
    """After a run (finished or failed): this job's Ray workers' logs beside ``driver.log``, under
    ``logs/workers/<time>/``, and for a bucket ``run_dir`` the logs folder in the bucket too."""
    from .cluster.logs import collect_worker_logs
    from .store import push

    path = current_log_file()
    if path is None:
        return
    folder = path.parent / "workers" / time.strftime("%Y%m%d-%H%M%S")
    try:
        files = collect_worker_logs(folder, since)
        if files:
            log.info("worker logs: %s (%d files)", folder, len(files))
        push(path.parent)
    except Exception as e:  # noqa: BLE001 - the run's own outcome stands; the logs are a convenience
        log.warning("the run's logs were not all kept: %s", e)


def _cmd_config(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    print(config_reference_markdown() if args.reference else dump_config(cfg), end="")
    return 0


def _run_until(stage: str | None) -> Callable[[PipelineConfig, argparse.Namespace], int]:
    """Stage commands run the pipeline up to that stage: earlier stages are cache hits when done."""

    def handler(cfg: PipelineConfig, args: argparse.Namespace) -> int:
        from .pipeline import run_pipeline, summarize, use_tiny_model

        _log_file(cfg)
        if getattr(args, "tiny", False):
            cfg = use_tiny_model(cfg)
        result = run_pipeline(cfg, until=stage)
        print(summarize(cfg, result))
        return 0

    return handler


def _cmd_eval(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    from pathlib import Path

    from .report.study import read_eval_samples, results_table
    from .stages.evaluate import format_table, run_eval
    from .store import run_root

    _log_file(cfg)
    model = args.model or cfg.model.name_or_path
    out = Path(args.out) if args.out else run_root(cfg.run_dir) / "eval" / Path(model).name
    result = run_eval(cfg, model, out, harness=args.harness)
    print(format_table(result))
    if set(result.headline) == set(result.samples):  # the mean with its interval over the documents
        print(results_table({Path(str(model)).name: read_eval_samples(result.out_dir, list(result.headline))}))
    print(f"results: {result.results_path}")
    return 0


def _cmd_submit(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    import subprocess

    from .submit import check_address, check_upload, format_command, submit_command

    check_address(args.address)
    size = check_upload(".", [".git"])
    log.info("working directory upload: %.1f MiB in %d files", size.bytes / 2**20, size.files)
    extra = ["--stage", args.stage] + (["--tiny"] if args.tiny else [])
    cmd = submit_command(args.address, args.config, overrides=args.overrides, extra=extra)
    if args.no_wait:
        cmd.insert(3, "--no-wait")
    print(format_command(cmd), flush=True)
    return subprocess.call(cmd)


def _cmd_tune(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    """``forgetting-ray tune CONFIG``: prepare -> reference -> score -> partition -> tune; prints the summary."""
    from .pipeline import run_pipeline, summarize, use_tiny_model
    from .stages.tune import STAGE, format_tune_summary

    _log_file(cfg)
    if args.tiny:
        cfg = use_tiny_model(cfg)
    cfg = cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"enabled": True})})
    result = run_pipeline(cfg, until=STAGE)
    print(format_tune_summary(result.outputs[STAGE]))
    print(summarize(cfg, result))
    return 0


def _cmd_doctor(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    from .doctor import FAIL, format_checks, run_doctor

    checks = run_doctor(cfg, gpu_memory_gib=args.gpu_memory_gib,
                        request_wait_s=args.wait if args.request_resources else None)
    print(format_checks(checks))
    failed = [c.name for c in checks if c.status == FAIL]
    print(f"\n{len(checks) - len(failed)} of {len(checks)} checks passed" + (f"; fix: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def _base_model_of_run(run: str) -> str | None:
    """The base model a run scored with (recorded by the score stage), for ``report`` without a config."""
    import json

    from .report.html import INFO_FILE, find_partition

    part = find_partition(run)
    info = json.loads((part / INFO_FILE).read_text())
    layout = part.parent.parent / "score" / str(info.get("score_key")) / "layout.json"
    return json.loads(layout.read_text()).get("base_model") if layout.is_file() else None


def _cmd_report(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    from .report.html import main_report

    if args.config is None and "model.name_or_path" not in " ".join(args.overrides):
        base = _base_model_of_run(args.run)
        if base:
            cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name_or_path": base})})
    samples = [s for s in args.samples.split(",") if s] if args.samples else None
    path = main_report(cfg, args.run, args.out, samples, n_random=args.n_random, seed=args.seed)
    print(f"report: {path}")
    return 0


def _cmd_sync(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    """Send to MLflow the writes a run kept while its tracking server did not answer."""
    from .store import run_root
    from .tracking import OUTBOX_FILE, Outbox, resolve_tracking_uri

    box = Outbox.of(str(run_root(args.run) / OUTBOX_FILE))
    if not box.pending():
        print(f"nothing to send: {box.path} holds no kept MLflow writes")
        return 0
    first = json.loads(box.path.read_text().splitlines()[0])
    uri = args.tracking_uri or resolve_tracking_uri(cfg.tracking.tracking_uri, args.run)
    exp = _experiment_of(uri, first["run_id"])
    before = box.pending()
    sent = box.send(uri, exp)
    print(f"sent {sent} of {before} kept MLflow writes to {uri}" + ("" if sent == before else f"; {box.pending()} stay"))
    return 0 if sent == before else 1


def _experiment_of(uri: str, run_id: str) -> str:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri).get_run(run_id).info.experiment_id


def _cmd_reproduce(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    from .reproduce import format_comparison, reproduce

    checks, inputs, into = reproduce(args.run, args.into)
    print(format_comparison(args.run, into, checks, inputs))
    return 0 if all(c.matches for c in checks) else 1


COMMANDS: dict[str, tuple[Callable[[PipelineConfig, argparse.Namespace], int], str]] = {
    "config": (_cmd_config, "print the resolved config (or --reference: the field reference)"),
    "run": (_run_until(None), "run every stage in order (each skipped when its output exists)"),
    "prepare": (_run_until("prepare"), "tokenize the corpus once into the token table and split off the reference subset"),
    "reference": (_run_until("reference"), "fine-tune the reference model on the reference subset (after prepare)"),
    "score": (_run_until("score"), "score every response token with base and reference models (Ray Data)"),
    "partition": (_run_until("partition"), "split the scored tokens into positive / negative by a global top-rho"),
    "train": (_run_until("train"), "forgetting fine-tune (and the configured baselines) on the partitioned table"),
    "tune": (_cmd_tune, "Ray Tune search over rho and the lambda schedule (ASHA; trials reuse the cached scores)"),
    "submit": (_cmd_submit, "check the cluster address and upload size, then `ray job submit` the pipeline"),
    "eval": (_cmd_eval, "evaluate a model (--model PATH, default the configured base) on the benchmark suite"),
    "doctor": (_cmd_doctor, "pre-flight checks: storage, resources, model, masks, memory plan, upload size"),
    "report": (_cmd_report, "self-contained HTML page of the scores and classes of a run (RUN = run or partition folder)"),
    "sync": (_cmd_sync, "send to MLflow the writes a run kept while its tracking server did not answer"),
    "reproduce": (_cmd_reproduce, "rerun a finished run from its run card into a new folder and compare every "
                  "stage's content hashes (exit 1 when one differs)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forgetting-ray", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == "report":
            p.add_argument("run", help="run directory (newest partition of selection.rho) or a partition folder")
        if name == "sync":
            p.add_argument("run", help="run_dir whose kept MLflow writes to send (the folder or bucket URI)")
            p.add_argument("--tracking-uri", help="the MLflow server (default: the config's, else $MLFLOW_TRACKING_URI)")
        if name == "reproduce":
            p.add_argument("run", help="run_dir of a finished run (a folder or a bucket URI)")
            p.add_argument("--into", help="where to rerun it (default <RUN>-reproduced; must not hold a run)")
        p.add_argument("config", nargs="?", default=None, help="YAML config file (defaults when omitted)")
        p.add_argument("overrides", nargs="*", help="dotted overrides such as training.lr=2e-5")
        if name == "config":
            p.add_argument("--reference", action="store_true", help="print every field with default and help")
        if name in ("run", "prepare", "reference", "score", "partition", "train", "tune"):
            p.add_argument("--tiny", action="store_true", help="use a random 2-layer model (quick check of the plumbing)")
        if name == "submit":
            p.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://127.0.0.1:8265")
            p.add_argument("--stage", default="run", help="last stage to run (default: all)")
            p.add_argument("--tiny", action="store_true", help="random 2-layer model")
            p.add_argument("--no-wait", action="store_true", help="return after submitting")
        if name == "eval":
            p.add_argument("--model", help="model folder, hub id or alias to evaluate")
            p.add_argument("--out", help="output folder for results.json")
            p.add_argument("--harness", choices=["native", "lm-eval"], default=None, help="evaluation backend")
        if name == "doctor":
            p.add_argument("--gpu-memory-gib", type=float, default=None,
                           help="GPU memory for the plan check (default: read from the cluster's GPUs by a Ray task)")
            p.add_argument("--request-resources", action="store_true",
                           help="first ask the autoscaler for each stage's bundles in turn, wait for each, then clear the request")
            p.add_argument("--wait", type=float, default=600.0, help="seconds to wait for each stage's requested resources")
        if name == "report":
            p.add_argument("--out", help="HTML file (default <run>/report/<partition key>.html)")
            p.add_argument("--samples", help="comma-separated sample_ids to show (default: random ones)")
            p.add_argument("--n-random", type=int, default=20, help="random samples when --samples is not given")
            p.add_argument("--seed", type=int, default=0, help="seed of the random sample choice")
    from .plan import add_plan_arguments

    add_plan_arguments(sub.add_parser("plan", help="per-GPU and per-node memory estimate of a fine-tune",
                                      description="per-GPU and per-node memory estimate of a fine-tune (ZeRO 0-3, "
                                      "LoRA or full, offload) for a preset YAML, built-in name or local HF folder"))
    return parser


RAY_COMMANDS = ("run", "prepare", "reference", "score", "partition", "train", "tune", "eval", "doctor", "reproduce")


def _starts_ray(argv: list[str]) -> bool:
    """Whether this command line may start Ray with a quiet console (``--verbose`` shows everything)."""
    words = [a for a in argv if not a.startswith("-")]
    return bool(words) and words[0] in RAY_COMMANDS and not {"-v", "--verbose", "-h", "--help"} & set(argv)


def _split_config_arg(args: argparse.Namespace) -> None:
    # `forgetting-ray prepare training.lr=1` (no file): the first positional is an override
    if args.config is not None and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        args.overrides.insert(0, args.config)
        args.config = None


def main(argv: list[str] | None = None) -> int:
    """The command; ``argv`` None (the installed script, ``python -m``): a quiet run of a command that may
    start Ray is relayed through the console's filter of Ray's native stderr (``console.run_relayed``)."""
    parser = build_parser()
    if argv is None:
        argv = sys.argv[1:]
        if not adopt_console() and _starts_ray(argv):
            return run_relayed([sys.executable, *(["-P"] if sys.flags.safe_path else []), "-m", "forgetting_ray.cli",
                                *argv])
    if "plan" in argv[:2]:  # not a pipeline-config command: its own flags, no overrides
        from .plan import main_plan

        return main_plan(argv[argv.index("plan") + 1:])
    # overrides may follow options (`run demo.yaml --tiny run_dir=x`), which argparse leaves unparsed
    args, rest = parser.parse_known_args(argv)
    stray = [a for a in rest if "=" not in a or a.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if rest:
        args.overrides = list(getattr(args, "overrides", None) or []) + rest
    setup_console(args.verbose)
    _split_config_arg(args)
    started = time.time()
    try:
        cfg = load_config(args.config, args.overrides)
        handler, _ = COMMANDS[args.command]
        return handler(cfg, args)
    except UserError as e:  # bad input: the message says what to change; no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a failure: its tail here (a worker's traceback included), all of it in the log file
        logging.getLogger("failure").info("the run failed", exc_info=True)  # the file only (quiet console)
        tail = "".join(traceback.format_exception(e)).rstrip().splitlines()[-25:]
        path = current_log_file()
        print("\n".join(tail) + (f"\nfull log: {path}" if path else ""), file=sys.stderr)
        return 1
    finally:
        _keep_logs(started)
        close_log_file()  # the next command in this process (a test session) starts its own


if __name__ == "__main__":
    sys.exit(main())
