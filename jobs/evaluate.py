"""Evaluation for `ray job submit`: metrics, the n-gram baseline, generation scores and the report.

    ray job submit --working-dir . -- python jobs/evaluate.py --config configs/shakespeare-cpu.yaml eval.backend=ray
    ray job submit --working-dir . -- python jobs/evaluate.py -c configs/shakespeare-cpu.yaml --compare s3://b/runs/old/model

Arguments are those of `lm eval` (--model, --split, --text, --compare, overrides); exit status 1 when a
comparison fails its thresholds (eval.compare).
"""

import sys

from lm.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
