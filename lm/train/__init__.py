"""Training. :func:`lm.train.trainer.train` is the one entry point: it prepares the data if needed and trains
as ``train.trainer`` says, Ray Train + DeepSpeed (``trainer``, ``loop``) or the plain loop in this process
(``inprocess`` over ``local``). ``optim`` (AdamW groups, LR schedule), ``local`` and ``distill`` (training
with a teacher) are Ray-free; the distributed trainer builds on the same pieces.
"""
