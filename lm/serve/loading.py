"""Loading a model directory for serving, in one place: the replica's own engine (lm.serve.model_server)
and the engine process's (lm.serve.engine_process) both come from :func:`load_engine`.

    engine = load_engine(store, "s3://b/runs/x/model", quantize=None, max_batch_size=16)
"""

from __future__ import annotations

from lm.serve.engine import Engine
from lm.storage import ObjectStore


def load_engine(store: ObjectStore, uri: str, quantize: str | None, max_batch_size: int) -> Engine:
    """The model directory at ``uri`` (lm.modeldir) in eval mode, ``quantize="int8"``: its Linear layers
    quantized (lm.serve.quantize), on an Engine batching up to ``max_batch_size`` rows."""
    from lm.modeldir import load_model_dir

    loaded = load_model_dir(store, uri)
    model = loaded.model.eval()
    if quantize == "int8":
        from lm.serve.quantize import quantize_int8

        model = quantize_int8(model)
    return Engine(model, loaded.tokenizer, max_batch_size=max_batch_size)
