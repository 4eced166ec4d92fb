"""Progress output shared by every job: :data:`Log`, the callback a job reports its progress lines to
(``print`` by default; tests pass a no-op or a list's ``append``). A leaf: it imports nothing of lm."""

from __future__ import annotations

from collections.abc import Callable

Log = Callable[[str], None]
