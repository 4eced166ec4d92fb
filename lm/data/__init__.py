"""Corpora → documents → packed token shards.

Pure pieces (no Ray): ``sources`` (files → documents, bad input reported), ``clean``, ``dedup``
(MinHash maths; its Ray half runs the groupbys), ``split``, ``pack``. ``pipeline`` runs them on
Ray Data (``lm data prepare``); ``loader`` reads the shards back; ``documents`` streams cleaned
documents in one process (``lm tokenizer train``).
"""
