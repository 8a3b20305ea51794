"""Entrypoint for a Ray job running the whole pipeline on a cluster:

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/pipeline.py --config jobs/configs/llama-3.2-1b.yaml [section.field=value ...]

The working directory upload honours .gitignore and .rayignore (no venv, runs or caches);
`forgetting-ray submit` checks its size before submitting.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the uploaded working dir

from forgetting_ray.cli import main  # noqa: E402


def parse(argv: list[str]) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="pipeline YAML (see jobs/configs/)")
    p.add_argument("--stage", default="run", choices=["run", "prepare", "reference", "score", "partition", "train"],
                   help="stop after this stage (default: the whole pipeline)")
    p.add_argument("--tiny", action="store_true", help="random 2-layer model instead of the configured one")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.lr=2e-5")
    a = p.parse_args(argv)
    return [a.stage, a.config, *a.overrides, *(["--tiny"] if a.tiny else [])]


if __name__ == "__main__":
    sys.exit(main(parse(sys.argv[1:])))
