"""Magnitude pruning of a model directory for `ray job submit` (one process; no Ray work inside).

    ray job submit --working-dir . -- python jobs/prune.py -c configs/shakespeare-cpu.yaml \
        --model s3://b/runs/x/model --out s3://b/runs/x/pruned-heads-25 --sparsity 0.25 --method heads

Arguments are those of `lm prune` (--model, --out, --sparsity, --method, --scope, --finetune-steps,
--data, overrides); exit status 2 on a bad request.
"""

import sys

from lm.cli import main

if __name__ == "__main__":
    sys.exit(main(["prune", *sys.argv[1:]]))
