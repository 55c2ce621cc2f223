import filecmp
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_committed_grpc_stubs_match_the_protos(tmp_path):
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_protos.sh"), str(tmp_path)], check=True, cwd=ROOT)
    for name in ("worker_pb2.py", "worker_pb2_grpc.py"):
        assert filecmp.cmp(tmp_path / "specrouter" / "v1" / name, ROOT / "specrouter" / "v1" / name, shallow=False), name
