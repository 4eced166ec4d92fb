"""Serving for `ray job submit`: deploy the model on Ray Serve behind the OpenAI-compatible API.

    ray job submit --working-dir . -- python jobs/serve.py --config configs/shakespeare-cpu.yaml
    ray job submit --working-dir . -- python jobs/serve.py --config configs/shakespeare-cpu.yaml --ask "ROMEO:"

Without --ask the job keeps the application up until it is stopped; `lm serve --render F` writes the
equivalent Serve config file for `serve deploy`.
"""

import sys

from lm.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
