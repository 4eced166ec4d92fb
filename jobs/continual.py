"""Continuous learning for `ray job submit`: new documents and served feedback → fine-tune the
production model → gate → promote (Serve follows) or reject; the registry is printed at the end.

    ray job submit --working-dir . -- python jobs/continual.py --config configs/tiny.yaml
    ray job submit --working-dir . -- python jobs/continual.py --config configs/tiny.yaml --watch

Running it again after an interruption resumes the open iteration (the ledger never takes an input twice).
"""

import sys

from lm.cli import main

if __name__ == "__main__":
    sys.exit(main(["continual", *sys.argv[1:]]))
