"""Entrypoint for a Ray job evaluating one model on the benchmark suite:

    ray job submit --working-dir . -- python jobs/eval.py --config CONFIG --model PATH
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from forgetting_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--model", required=True, help="exported model folder, hub id or alias")
    p.add_argument("--harness", choices=["native", "lm-eval"], default=None)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    extra = ["--model", a.model] + (["--harness", a.harness] if a.harness else [])
    sys.exit(main(["eval", a.config, *a.overrides, *extra]))
