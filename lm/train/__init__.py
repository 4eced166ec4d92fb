"""Training. ``optim`` (AdamW groups, LR schedule) and ``local`` (a plain single-process loop) are
Ray-free; the distributed Ray Train + DeepSpeed trainer builds on the same pieces.
"""
