"""Hyperparameter search for `ray job submit`: Ray Tune trials, each a real Ray Train + DeepSpeed run.

    ray job submit --working-dir . -- python jobs/tune.py --config configs/tune/seed-grid.yaml
    ray job submit --working-dir . -- python jobs/tune.py --config configs/tune/seed-grid.yaml --resume

Writes <run>/tune/{results.csv, curves.png, best.yaml}; --resume continues an interrupted sweep.
"""

import sys

from lm.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
