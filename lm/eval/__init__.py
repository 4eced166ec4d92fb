"""Evaluation: how good is a model directory, how far above a count-based baseline, and better than another?

    lm eval [--model URI] [--split val | --text URI] [--compare URI] -c configs/tiny.yaml

Modules: ``metrics`` (token sums → loss, perplexity, bits per byte, top-1 accuracy; pure torch) ·
``ngram`` (the interpolated Kneser-Ney baseline; numpy) · ``sets`` (eval sets → packed rows; the
built-in prompt sets) · ``distributed`` (the same sums on Ray Data actors) · ``generation`` (BLEU,
ROUGE, label choice → precision / recall / F1, samples) · ``compare`` (a verdict against thresholds) ·
``report`` (report.json, report.md, PNGs, TensorBoard curves) · ``evaluate`` (the whole evaluation) ·
``likelihood`` (log-likelihood requests with lmforge's Transformer, split as lm-evaluation-harness splits
them) · ``harness`` (``lm eval --harness``: lm-evaluation-harness on the model directory or an endpoint).
"""
