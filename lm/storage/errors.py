"""Storage errors: the two exception types every storage operation raises. :class:`StorageError` names the
URI and what to check (missing bucket, access denied, unreachable endpoint, read-only URI);
:class:`StorageNotFound` is the "no file or object there" case and is also a ``FileNotFoundError``."""

from __future__ import annotations


class StorageError(Exception):
    """A storage operation failed; the message names the URI and what to check."""


class StorageNotFound(StorageError, FileNotFoundError):
    """No file or object at the URI."""
