"""Entrypoint for a Ray job running the Tune search over rho and the lambda schedule:

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/tune.py --config jobs/configs/llama-3.2-1b.yaml [tune.num_samples=16 ...]

Earlier stages (prepare, reference, score) run first when their outputs are missing, and are
reused when present: every trial only re-partitions and trains.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the uploaded working dir

from forgetting_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="pipeline YAML (see jobs/configs/)")
    p.add_argument("--tiny", action="store_true", help="random 2-layer model instead of the configured one")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. tune.num_samples=16")
    a = p.parse_args()
    sys.exit(main(["tune", a.config, *a.overrides, *(["--tiny"] if a.tiny else [])]))
