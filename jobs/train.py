"""Distributed training for `ray job submit`: Ray Train workers running DeepSpeed on the data shards.

    ray job submit --working-dir . -- python jobs/train.py --config configs/shakespeare-cpu.yaml train.workers=2

Prepares the data first if its manifest is missing or stale; re-submitting the same run resumes it.
"""

import sys

from lm.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
