"""The committed gRPC stubs are exactly what the pinned generator makes from the .proto."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROTO = Path(__file__).resolve().parents[2] / "proto"


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    subprocess.run([str(PROTO / "gen.sh"), str(tmp_path)], check=True, env=env)
    for name in ("virtmig_pb2.py", "virtmig_pb2.pyi", "virtmig_pb2_grpc.py"):
        fresh = (tmp_path / name).read_bytes()
        committed = (PROTO / name).read_bytes()
        assert fresh == committed, f"proto/{name} is stale: run `make proto` and commit"
