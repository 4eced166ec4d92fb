"""Model compression: pruning (lm.compress.prune); distillation is training with a teacher (lm.train.distill)."""
