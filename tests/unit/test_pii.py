"""PII and secret redaction (lm.data.pii): each kind, its placeholders and counts, what it leaves alone,
and decontamination's n-gram table (lm.data.decontam)."""

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from lm.data.decontam import NgramTable, mark_contaminated, ngram_hashes, ngram_rows
from lm.data.pii import PII_KINDS, luhn_ok, redact

ROOT = Path(__file__).resolve().parents[2]


def only(text: str, kind: str) -> tuple[str, dict]:
    out, counts = redact(text, [kind])
    return out, dict(counts)


def test_emails():
    assert only("write to bob.smith+news@mail.example.co.uk today", "email") == (
        "write to <EMAIL> today", {"email": 1})
    assert only("not an email: a@b or @handle", "email")[1] == {}


def test_ip_addresses_v4_and_v6():
    assert only("from 192.168.1.20 and 2001:db8::8a2e:370:7334.", "ip") == (
        "from <IP_ADDRESS> and <IP_ADDRESS>.", {"ip": 2})
    assert only("at 12:30:45, version 1.2.3.4.5, 300.1.1.1, ROMEO: Hark", "ip")[1] == {}


def test_phone_numbers():
    text = "call +1 415 555 0132, (415) 555-0132, 415-555-0132 or +44 20 7946 0958"
    out, counts = only(text, "phone")
    assert out == "call <PHONE_NUMBER>, <PHONE_NUMBER>, <PHONE_NUMBER> or <PHONE_NUMBER>" and counts == {"phone": 4}
    assert only("on 2024-01-15, in 1990-2000, act 3 scene 2, 3.14159", "phone")[1] == {}


def test_card_numbers_need_the_luhn_check():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    out, counts = only("card 4111 1111 1111 1111, not 4111-1111-1111-1112 nor id 1234567890123", "card")
    assert out == "card <CARD_NUMBER>, not 4111-1111-1111-1112 nor id 1234567890123" and counts == {"card": 1}


@pytest.mark.parametrize("secret", [
    "sk-3f9cAbCdEfGhIjKlMnOpQrStUvWxYz01",  # lmforge's own (sk- + token_urlsafe(24)) and OpenAI's
    "sk-proj-AbCdEfGhIjKlMnOpQrSt1234567890",
    "sk-ant-api03-AbCdEfGhIjKlMnOpQrSt123456",
    "AKIAIOSFODNN7EXAMPLE",
    "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
    "xoxb-1234567890-abcdefghij",
    "AIzaSyA1234567890abcdefghijklmnopqrstuv",
    "hf_abcdefghijklmnopqrstuvwxyzABCDEFGH",
    "sk_live_abcdefghijklmnop1234",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
])
def test_api_keys_of_common_forms(secret):
    out, counts = only(f"my key is {secret} ok", "secret")
    assert out == "my key is <API_KEY> ok" and counts == {"secret": 1}


def test_bearer_tokens_private_keys_and_passwords():
    assert only("Authorization: Bearer abc.def-ghi_jkl123", "secret")[0] == "Authorization: Bearer <SECRET>"
    block = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\nabc==\n-----END RSA PRIVATE KEY-----\nafter"
    assert only(block, "secret") == ("<PRIVATE_KEY>\nafter", {"secret": 1})
    assert only("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1r (cut)", "secret")[0] == "<PRIVATE_KEY>"
    assert only("postgres://admin:hunter2@db.example.com:5432/x", "secret")[0] == (
        "postgres://admin:<PASSWORD>@db.example.com:5432/x")
    out, counts = only("password=hunter2 aws_secret_access_key = wJalrXUtnFEMI/K7MDENG ?token=abc123&x=1", "secret")
    assert out == "password=<SECRET> aws_secret_access_key = <SECRET> ?token=<SECRET>&x=1" and counts == {"secret": 3}


def test_known_keys_are_found_whatever_their_form():
    key = "Zq8-not-a-common-format-key-77"
    digest = hashlib.sha256(key.encode()).hexdigest()
    assert redact(f"use {key} please", ["secret"], [digest])[0] == "use <API_KEY> please"
    assert redact(f"use {key} please", ["secret"])[0] == f"use {key} please"


def test_prose_is_left_alone():
    prose = ("Give me some token: remembrance. We must talk in secret:--nurse, come back. The basic principles "
             "of a token of love, at 10 o'clock in act 2.")
    assert redact(prose) == (prose, {})
    for name in ("tinyshakespeare", "sonnets"):
        with gzip.open(ROOT / f"lm/corpora/{name}.txt.gz", "rt") as f:
            text = f.read()
        assert redact(text)[1] == {}, name


def test_all_kinds_together_and_unknown_kinds():
    text = "mail a@b.example.com, key sk-AbCdEfGhIjKlMnOpQrSt12, ip 10.0.0.1, tel +1 415 555 0132"
    out, counts = redact(text, PII_KINDS)
    assert out == "mail <EMAIL>, key <API_KEY>, ip <IP_ADDRESS>, tel <PHONE_NUMBER>"
    assert counts == {"email": 1, "secret": 1, "ip": 1, "phone": 1}
    with pytest.raises(ValueError, match="ssn"):
        redact(text, ["ssn"])


# ---------------------------------------------------------------------------------------- decontamination

HELD_OUT = "the quick brown fox jumps over the lazy dog while the farmer watches from his old red barn door"


def test_ngram_hashes_are_stable_and_ignore_case_and_punctuation():
    a = ngram_hashes(HELD_OUT, 13)
    assert len(a) == len(HELD_OUT.split()) - 12 and a.dtype == np.uint64
    assert np.array_equal(a, ngram_hashes(HELD_OUT.upper().replace(" ", ", "), 13))
    assert len(ngram_hashes("too few words", 13)) == 0
    assert a[0] == ngram_hashes(" ".join(HELD_OUT.split()[:13]), 13)[0]  # no state across calls


def test_a_shared_13_gram_contaminates_and_12_words_do_not():
    table = NgramTable.of([ngram_hashes(HELD_OUT, 13)], 13)
    words = HELD_OUT.split()
    assert table.contaminated("Intro text. " + " ".join(words[3:16]).upper() + "! And more.")
    assert not table.contaminated("Intro text. " + " ".join(words[3:15]) + " and more words here today")
    assert not NgramTable.of([], 13).contaminated(HELD_OUT)


def test_ray_data_udfs_of_decontamination():
    import pyarrow as pa

    rows = ngram_rows({"text": np.array([HELD_OUT, HELD_OUT, "short"], dtype=object)}, 13)
    assert len(rows["h"]) == len(set(ngram_hashes(HELD_OUT, 13).tolist()))
    table = NgramTable(rows["h"], 13)
    batch = pa.table({"text": [HELD_OUT, HELD_OUT, "unrelated text"], "split": ["train", "val", "train"]})
    assert mark_contaminated(batch, table).column("reason").to_pylist() == ["contaminated", "", ""]


# ------------------------------------------------------------------------------------------ feedback capture

def test_feedback_records_are_redacted_before_they_are_buffered_or_written(tmp_path):
    from lm.config import load_config
    from lm.serve.feedback import FeedbackLog, redact_record
    from lm.storage import ObjectStore

    store = ObjectStore(load_config(None, [f"storage.root={tmp_path}"]).storage)
    own_key = "sk-test-0123456789"  # the server's own key (tests/integration/serving.py's)
    log = FeedbackLog(store, f"{tmp_path}/fb", writer="w", known_digests=[hashlib.sha256(own_key.encode()).hexdigest()])
    log.add({"type": "completion", "id": "cmpl-1", "model_version": "v000001",
             "prompts": [f"I am ann@example.org, call +1 415 555 0132; my key {own_key}"],
             "completions": ["Sure, AKIAIOSFODNN7EXAMPLE and Bearer abcdef.123456789"], "temperature": 0.0})
    log.add({"type": "feedback", "id": "cmpl-1", "rating": 1, "correction": "Write to bob@example.com"})
    assert "ann@" not in str(log._buffer) and own_key not in str(log._buffer)  # not even in memory
    text = store.read_text(log.flush())
    for secret in ("ann@example.org", "415 555 0132", own_key, "AKIAIOSFODNN7EXAMPLE", "abcdef.123456789", "bob@"):
        assert secret not in text
    completion, feedback = (json.loads(line) for line in text.splitlines())
    assert completion["prompts"] == ["I am <EMAIL>, call <PHONE_NUMBER>; my key <API_KEY>"]
    assert completion["completions"] == ["Sure, <API_KEY> and Bearer <SECRET>"]
    assert completion["redacted"] == {"email": 1, "phone": 1, "secret": 3}
    assert (completion["id"], completion["model_version"], completion["temperature"]) == ("cmpl-1", "v000001", 0.0)
    assert feedback["correction"] == "Write to <EMAIL>" and feedback["rating"] == 1
    # PII kinds are configurable (serve.feedback.redact); secrets are always redacted
    kept = redact_record({"type": "completion", "prompts": ["ann@example.org sk-abcdefghijklmnop"]}, [])
    assert kept["prompts"] == ["ann@example.org <API_KEY>"] and kept["redacted"] == {"secret": 1}
    assert redact_record({"type": "completion", "prompts": ["hello"]}) == {"type": "completion", "prompts": ["hello"]}


def test_supervised_records_are_redacted_and_counted(tmp_path):
    from functools import partial

    from lm.config import load_config
    from lm.config.quality import PIIConfig
    from lm.data.sft import read_records
    from lm.data.sources import plan_files, read_file_task
    from lm.storage import ObjectStore

    (tmp_path / "qa.jsonl").write_text(json.dumps({"prompt": "Mail me at ann@example.org",
                                                   "response": "Done: 10.0.0.7"})
                                       + "\n" + json.dumps({"prompt": "Hi", "response": "Hello"}) + "\n")
    cfg = load_config(None, ["data.format=sft", f"data.sources=[{{name: qa, uri: '{tmp_path}'}}]"])
    store = ObjectStore(cfg.storage)
    files = plan_files(store, cfg.data)
    read = partial(read_file_task, filesystem_factory=store.pyarrow_filesystem, clean=cfg.data.clean,
                   max_file_bytes=2**20)
    batch = {k: [f[k] for f in files] for k in files[0]}

    def rows(pii):
        return [dict(zip(b, values, strict=True)) for b in read_records(
            batch, read=read, sft=cfg.data.sft, clean=cfg.data.clean, split={"val_fraction": 0.0}, pii=pii)
            for values in zip(*b.values(), strict=True)]

    first, second = rows(cfg.data.pii)
    assert "ann@" not in first["text"] and "<EMAIL>" in first["prompt"] and first["reply"].startswith(" Done: <IP_")
    assert (first["redacted_email"], first["redacted_ip"], second["redacted_email"]) == (1, 1, 0)
    assert "ann@example.org" in rows(PIIConfig(enabled=False))[0]["prompt"]
