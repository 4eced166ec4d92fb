"""lm.serve.cache: which requests get a key, exact matching, LRU eviction, counters, copies, threads."""

from __future__ import annotations

import threading

import pytest

from lm.serve.cache import ResponseCache

GREEDY = {"model": "lmforge", "prompt": "ROMEO:", "max_tokens": 8, "temperature": 0}


def test_only_deterministic_requests_get_a_key():
    cache = ResponseCache(4)
    assert cache.key("v1", GREEDY) is not None
    assert cache.key("v1", {**GREEDY, "temperature": 0.8, "seed": 3}) is not None
    assert cache.key("v1", {**GREEDY, "temperature": 0.8}) is None
    assert cache.key("v1", {**GREEDY, "temperature": 0.8, "seed": None}) is None
    no_temperature = {k: v for k, v in GREEDY.items() if k != "temperature"}
    assert cache.key("v1", no_temperature) is None  # OpenAI's default temperature is 1
    assert cache.key("v1", {**no_temperature, "seed": 0}) is not None  # seed 0 is a seed


def test_key_is_exact_and_canonical():
    cache = ResponseCache(4)
    k = cache.key("v1", GREEDY)
    assert cache.key("v1", dict(reversed(list(GREEDY.items())))) == k  # key order does not matter
    assert cache.key("v2", GREEDY) != k  # another model version
    assert cache.key("v1", {**GREEDY, "prompt": "ROMEO: "}) != k
    assert cache.key("v1", {**GREEDY, "stop": ["\n"]}) != k
    assert cache.key("v1", {**GREEDY, "temperature": 0.0}) == cache.key("v1", {**GREEDY, "temperature": 0.0})


def test_lru_eviction_and_counters():
    cache = ResponseCache(2)
    a, b, c = (cache.key("v", {**GREEDY, "prompt": p}) for p in "abc")
    assert cache.get(a) is None and (cache.hits, cache.misses) == (0, 1)
    cache.put(a, {"text": "A"})
    cache.put(b, {"text": "B"})
    assert cache.get(a) == {"text": "A"}  # a is now the most recently used
    cache.put(c, {"text": "C"})  # evicts b
    assert len(cache) == 2
    assert cache.get(b) is None and cache.get(c) == {"text": "C"} and cache.get(a) == {"text": "A"}
    assert (cache.hits, cache.misses) == (3, 2)
    assert cache.hit_rate == pytest.approx(3 / 5)
    assert cache.stats() == {"entries": 2, "max_entries": 2, "hits": 3, "misses": 2, "hit_rate": pytest.approx(0.6)}
    cache.put(a, {"text": "A2"})  # overwrite keeps the size
    assert len(cache) == 2 and cache.get(a) == {"text": "A2"}
    cache.clear()
    assert len(cache) == 0 and cache.get(a) is None


def test_values_are_copied():
    cache = ResponseCache(2)
    key = cache.key("v", GREEDY)
    value = {"choices": [{"text": "hi"}]}
    cache.put(key, value)
    value["choices"][0]["text"] = "changed"
    got = cache.get(key)
    got["choices"].append("more")
    assert cache.get(key) == {"choices": [{"text": "hi"}]}


def test_zero_entries_disables():
    cache = ResponseCache(0)
    assert not cache.enabled and cache.key("v", GREEDY) is None
    cache.put("k", 1)
    assert len(cache) == 0 and cache.get("k") is None and cache.hit_rate == 0.0
    with pytest.raises(ValueError, match="max_entries"):
        ResponseCache(-1)


def test_thread_safe_under_concurrent_use():
    cache = ResponseCache(16)
    keys = [cache.key("v", {**GREEDY, "prompt": str(i)}) for i in range(64)]
    errors: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for n in range(500):
                key = keys[(n * 7 + offset) % len(keys)]
                got = cache.get(key)
                assert got is None or got == {"key": key}
                cache.put(key, {"key": key})
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(cache) == 16
    assert cache.hits + cache.misses == 8 * 500
