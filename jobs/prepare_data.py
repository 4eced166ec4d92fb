"""The data pipeline for `ray job submit`: corpora in object storage → token shards + manifest.

    ray job submit --working-dir . -- python jobs/prepare_data.py --config configs/shakespeare-cpu.yaml
"""

import sys

from lm.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "prepare", *sys.argv[1:]]))
