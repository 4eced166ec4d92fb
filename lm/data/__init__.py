"""Corpora → documents → token streams.

Pure pieces (no Ray): ``documents`` (stream documents out of sources in object storage) and
``split`` (the deterministic train/validation assignment). The Ray Data pipeline builds on them.
"""
