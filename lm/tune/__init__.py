"""Hyperparameter search with Ray Tune over lm.train (``lm tune``, ``jobs/tune.py``).

``sweep`` runs the trials (each the real Ray Train + DeepSpeed training); ``results`` turns them into
``<run>/tune/{results.csv, curves.png, best.yaml}``. The search space lives in the config (``tune.space``,
lm.config.tune).
"""
