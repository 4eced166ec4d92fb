"""Redaction of personal data and secrets: each match becomes a typed placeholder, counted (pure; no Ray).

Used by the data pipeline (``data.pii``, through lm.data.quality) and by Serve's feedback capture
(lm.serve.feedback: prompts, completions and corrections are redacted before they are buffered or written).

    text, counts = redact("mail bob@example.com from 10.0.0.1", PII_KINDS)
    # "mail <EMAIL> from <IP_ADDRESS>", Counter({"email": 1, "ip": 1})

Kinds, applied in this order (secrets first, so a key inside a URL or an e-mail-like string goes whole):

* ``secret``: private-key blocks, passwords in URLs (``scheme://user:<PASSWORD>@host``), bearer / basic
  authorization values, API keys of common forms (``sk-…`` (OpenAI, Anthropic and lmforge's own keys,
  ``sk-`` + 32 URL-safe characters), ``AKIA…``/``ASIA…`` (AWS), ``ghp_…``/``github_pat_…``, ``xox?-…``
  (Slack), ``AIza…`` (Google), ``hf_…``, ``sk_live_…``/``rk_live_…`` (Stripe), JWTs), and the values of
  ``password=`` / ``api_key:`` / ``secret=`` / ``token=`` assignments;
* ``email``; ``card``: 13-19 digits (spaces or dashes between) that pass the Luhn check;
* ``ip``: IPv4 (each octet 0-255) and IPv6 (validated by :mod:`ipaddress`);
* ``phone``: 9-15 digits with a leading ``+``, a ``(area)`` or at least two separators between groups.

Known limits: a phone number written as one run of digits is not found (it cannot be told from an id);
a list of small numbers grouped like a phone number ("100 200 300 400") is redacted as one.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections import Counter
from collections.abc import Iterable, Sequence

PII_KINDS = ("secret", "email", "card", "ip", "phone")
PLACEHOLDERS = {"secret": "<SECRET>", "api_key": "<API_KEY>", "private_key": "<PRIVATE_KEY>",
                "password": "<PASSWORD>", "email": "<EMAIL>", "card": "<CARD_NUMBER>", "ip": "<IP_ADDRESS>",
                "phone": "<PHONE_NUMBER>"}

_PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY"
                          r"(?: BLOCK)?-----|\Z)", re.DOTALL)
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s:/@]+):([^\s/@]+)@")
_AUTH_HEADER = re.compile(r"(?i)\b(bearer|basic)(\s+)([A-Za-z0-9._~+/-]{8,}=*)")
_API_KEYS = re.compile("|".join([
    r"\bsk-(?:proj-|ant-(?:api\d+-)?)?[A-Za-z0-9_-]{12,}",  # OpenAI, Anthropic, lmforge (sk- + token_urlsafe)
    r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA)[0-9A-Z]{16}\b",  # AWS access key ids
    r"\bgh[pousr]_[A-Za-z0-9]{30,}", r"\bgithub_pat_[A-Za-z0-9_]{30,}",  # GitHub
    r"\bxox[abposr]-[A-Za-z0-9-]{10,}",  # Slack
    r"\bAIza[0-9A-Za-z_-]{35}",  # Google
    r"\bhf_[A-Za-z0-9]{30,}",  # Hugging Face
    r"\b[sr]k_(?:live|test)_[A-Za-z0-9]{16,}",  # Stripe
    r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",  # JWT
]))
_ASSIGNED = re.compile(r"(?i)\b((?:[a-z0-9]+[_-])*(password|passwd|pwd|secret|api[_-]?key|access[_-]?key|"
                       r"secret[_-]?key|token|auth)\b[\"']?\s*([:=])\s*[\"']?)([^\s\"',;&]{4,})")
_ASSIGNED_KEYS = ("passw", "pwd", "secret", "key", "token", "auth")
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_IPV4 = re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
                   r"(?!\d|\.\d)")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{0,4}|(?:\d{1,3}\.){3}\d{1,3})(?![\w:])")
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]\d{2,5}){1,4}(?![\w]|[.-]\d)")


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum of a string of digits (what every payment card number passes)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _digits(text: str) -> str:
    return "".join(c for c in text if c.isdigit())


def _is_phone(match: str) -> bool:
    digits = _digits(match)
    if not 9 <= len(digits) <= 15:
        return False
    separators = sum(1 for c in match if c in " .-")
    return match.startswith("+") or "(" in match or separators >= 2


def _is_ipv6(match: str) -> bool:
    try:
        ipaddress.IPv6Address(match)
    except ValueError:
        return False
    return True


def _sub(pattern: re.Pattern, text: str, counts: Counter, kind: str, placeholder: str, check=None) -> str:
    """Replace each match of ``pattern`` that passes ``check`` by ``placeholder``, counting under ``kind``."""
    def replace(m: re.Match) -> str:
        if check is not None and not check(m.group(0)):
            return m.group(0)
        counts[kind] += 1
        return placeholder
    return pattern.sub(replace, text)


def redact_secrets(text: str, counts: Counter, known_digests: Iterable[str] = ()) -> str:
    """Secrets (see the module docstring) → ``<PRIVATE_KEY>``, ``<PASSWORD>``, ``<API_KEY>``, ``<SECRET>``;
    ``known_digests``: SHA-256 hex digests of keys to find whatever their form (a server's own API keys)."""
    lowered = text.lower()  # each pattern only where its marker occurs: most texts hold none
    if "private key" in lowered:
        text = _sub(_PRIVATE_KEY, text, counts, "secret", PLACEHOLDERS["private_key"])
    if "://" in text:
        text = _URL_PASSWORD.sub(lambda m: (counts.update(secret=1), f"{m.group(1)}:{PLACEHOLDERS['password']}@")[1],
                                 text)
    if known := set(known_digests):
        text = _sub(re.compile(r"[A-Za-z0-9._~+/=-]{16,}"), text, counts, "secret", PLACEHOLDERS["api_key"],
                    check=lambda t: hashlib.sha256(t.encode()).hexdigest() in known)
    text = _sub(_API_KEYS, text, counts, "secret", PLACEHOLDERS["api_key"])

    def header(m: re.Match) -> str:
        if m.group(3).startswith("<") or _wordlike(m.group(3)):
            return m.group(0)
        counts["secret"] += 1
        return f"{m.group(1)}{m.group(2)}{PLACEHOLDERS['secret']}"

    def assigned(m: re.Match) -> str:
        # prose ("a token: the ring", "the secret: nobody") is left alone: after a colon the value must not
        # be a plain word, and bare token / auth only count as token=… / auth=… (query strings, settings)
        key, sep, value = m.group(2).lower(), m.group(3), m.group(4)
        if value.startswith("<") or (sep == ":" and (_wordlike(value) or m.group(1)[:len(key)].lower() in
                                                     ("token", "auth"))):
            return m.group(0)
        counts["secret"] += 1
        return m.group(1) + PLACEHOLDERS["secret"]
    if "bearer" in lowered or "basic" in lowered:
        text = _AUTH_HEADER.sub(header, text)
    if any(k in lowered for k in _ASSIGNED_KEYS) and ("=" in text or ":" in text):
        text = _ASSIGNED.sub(assigned, text)
    return text


def _wordlike(value: str) -> bool:
    """A plain word (all letters, lower case or capitalised): prose, not a credential."""
    value = value.strip(".,;:!?-")
    return value.isalpha() and (value.islower() or value.istitle() or value.isupper())


def redact(text: str, kinds: Sequence[str] = PII_KINDS, known_digests: Iterable[str] = ()) -> tuple[str, Counter]:
    """``text`` with every match of ``kinds`` replaced by its placeholder, and the number replaced per kind."""
    if unknown := set(kinds) - set(PII_KINDS):
        raise ValueError(f"unknown redaction kinds {sorted(unknown)}; expected some of {list(PII_KINDS)}")
    counts: Counter = Counter()
    if "secret" in kinds:
        text = redact_secrets(text, counts, known_digests)
    if "email" in kinds and "@" in text:
        text = _sub(_EMAIL, text, counts, "email", PLACEHOLDERS["email"])
    if not any(c.isdigit() for c in text):
        return text, counts  # cards, IP addresses and phone numbers all have digits
    if "card" in kinds:
        text = _sub(_CARD, text, counts, "card", PLACEHOLDERS["card"], check=lambda m: luhn_ok(_digits(m)))
    if "ip" in kinds:
        text = _sub(_IPV4, text, counts, "ip", PLACEHOLDERS["ip"])
        if "::" in text or text.count(":") >= 7:
            text = _sub(_IPV6, text, counts, "ip", PLACEHOLDERS["ip"], check=_is_ipv6)
    if "phone" in kinds:
        text = _sub(_PHONE, text, counts, "phone", PLACEHOLDERS["phone"], check=_is_phone)
    return text, counts
