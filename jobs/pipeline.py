"""The main job for `ray job submit`: parse the config, run lmforge's lifecycle.

    ray job submit --working-dir . -- python jobs/pipeline.py --config configs/shakespeare-cpu.yaml
"""

import sys

from lm.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
