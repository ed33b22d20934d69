"""Ray job entrypoint: `specialists run` inside a Ray job, with the same flags.

    ray job submit --working-dir . -- python -m jobs.run --config configs/synthetic.yaml --out /abs/runs/syn

Ray sets RAY_ADDRESS for a job's driver, so the specialists join the cluster
the job was submitted to (no ray.address needed). Give --out as an absolute
path on the head node: a job runs inside a temporary copy of --working-dir,
and a relative run directory would be deleted with it.
"""

from __future__ import annotations

import sys

from specialists.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
