"""Helpers of the tests that talk to a running Serve application (test_serve, test_continual)."""

import contextlib
import socket
import threading
import time

from lm.data.documents import iter_documents
from lm.modeldir import save_model_dir
from lm.storage import ObjectStore
from lm.tokenizer import train_tokenizer
from lm.train.weights import build_model

KEY = "sk-test-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def under_load(client, prompt: str, max_tokens: int, temperature: float, threads: int):
    """Requests sent back to back from ``threads`` threads while the block runs: yields the lists of
    system_fingerprints answered and of errors (any failure fails the caller's test)."""
    fingerprints, errors, stop = [], [], threading.Event()

    def load():
        while not stop.is_set():
            try:
                r = client.completions.create(model="lmforge", prompt=prompt, max_tokens=max_tokens,
                                              temperature=temperature)
                fingerprints.append(r.system_fingerprint)
            except Exception as err:
                errors.append(repr(err))

    workers = [threading.Thread(target=load) for _ in range(threads)]
    for t in workers:
        t.start()
    try:
        yield fingerprints, errors
    finally:
        stop.set()
        for t in workers:
            t.join()


def settles_on(fingerprints: list, version: str, timeout: float = 60) -> bool:
    """Whether the last 6 answers under load come from ``version`` within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fingerprints[-6:] == [version] * 6:
            return True
        time.sleep(0.3)
    return False


def model_dir(store: ObjectStore, cfg, uri: str, seed: int) -> str:
    """A randomly initialised tiny model with a real tokenizer (serving does not care how good it is)."""
    docs = (d.text for d, _ in zip(iter_documents(store, cfg.data, "train"), range(400), strict=False))
    tok = train_tokenizer(docs, cfg.tokenizer)
    model = build_model(cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": seed})}), tok.vocab_size)
    save_model_dir(store, uri, model, tok, cfg.generate, {"run": f"serve-test-{seed}"})
    return uri
