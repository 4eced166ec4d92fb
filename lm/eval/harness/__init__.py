"""EleutherAI lm-evaluation-harness in ``lm eval``: ``lm eval --harness TASK[,TASK…] [--endpoint URL]``.

Modules: ``data`` (the shipped tasks' data from held-out speeches, their YAMLs; ``tasks/`` holds the
YAML templates) · ``run`` (the harness on a model directory through its HF backend, or on a running
lmforge endpoint through ``local-completions``; every request re-scored by lmforge's own Transformer).
The harness itself is the ``harness`` extra (``pip install -e '.[harness]'``), imported only when used.
"""
