"""Model compression: pruning (lm.compress.prune) and distillation (lm.compress.distill)."""
