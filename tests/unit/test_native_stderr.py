"""Ray's C++ notes in the driver (written to file descriptor 2 directly) go to the log file; everything else,
a traceback at exit included, still reaches the terminal (lm.native_stderr), in a process of its own."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from lm.native_stderr import quiet

NOTE = b"[2026-12-04 14:26:31,415 W 5 5] network_util.cc:330: Failed to determine local IP, falling back\n"
BENIGN = (b"[2026-12-04 14:26:41,394 E 5 5] core_worker.cc:2465: Actor with class name: 'MapWorker(TokenizeActor)' "
          b"and ID: '4b92' has constructor arguments in the object store and max_restarts > 0.\n")
GENUINE = b"[2026-12-04 14:26:42,000 E 5 5] raylet_client.cc:60: The raylet died unexpectedly\n"


def test_ray_notes_go_to_the_log_file_and_the_rest_to_the_terminal(tmp_path):
    assert quiet(NOTE) and quiet(BENIGN) and not quiet(GENUINE) and not quiet(b"Traceback (most recent call last):")
    log = tmp_path / "run.log"
    script = textwrap.dedent(f"""
        import logging, os
        logging.basicConfig(filename={str(log)!r}, level=logging.INFO, format="%(name)s: %(message)s")
        from lm.native_stderr import route_native_stderr
        route_native_stderr()
        for line in ({NOTE!r}, b"a plain line\\n", {BENIGN!r}, {GENUINE!r}, b"50%|#####     | no newline"):
            os.write(2, line)
        raise RuntimeError("a real failure")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    terminal, logged = done.stderr, log.read_bytes()
    assert done.returncode == 1
    assert b"a plain line\n" in terminal and GENUINE in terminal and b"no newline" in terminal
    assert b"RuntimeError: a real failure" in terminal  # the traceback printed as the process ends
    assert b"network_util" not in terminal and b"constructor arguments" not in terminal
    assert logged.count(b"lmforge.native: [2026-12-04") == 2 and b"network_util" in logged
