"""Regenerate the committed `protos/peer_pb2*.py[i]` from `protos/peer.proto`, or check they are current.

Run from anywhere: `python -m protos.codegen [--check]`. Output depends on the grpcio-tools version.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent  # imports read `from protos import peer_pb2`
PROTO = "protos/peer.proto"
GENERATED = ("protos/peer_pb2.py", "protos/peer_pb2_grpc.py", "protos/peer_pb2.pyi")


def generate(out_dir: Path, *, root: Path = ROOT) -> list[Path]:
    """Compile `root/protos/peer.proto` into `out_dir/protos/`; return the generated files."""
    out_dir = Path(out_dir)
    (out_dir / "protos").mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{root}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--pyi_out={out_dir}",
        str(root / PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {root / PROTO}")
    return [out_dir / name for name in GENERATED]


def stale_files(*, root: Path = ROOT) -> list[str]:
    """The generated files under `root` that are missing or differ from a fresh build of the proto."""
    with tempfile.TemporaryDirectory(prefix="corolla-codegen-") as tmp:
        generate(Path(tmp), root=root)
        stale = []
        for name in GENERATED:
            committed = root / name
            if not committed.is_file() or committed.read_bytes() != (Path(tmp) / name).read_bytes():
                stale.append(name)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protos.codegen", description=__doc__)
    parser.add_argument(
        "--check",
        action="store_true",
        help="fail when the committed files differ from freshly generated ones",
    )
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            logger.error("generated code is stale files=%s; run `python -m protos.codegen`", ",".join(stale))
            return 1
        logger.info("generated code is current")
        return 0
    for path in generate(ROOT):
        logger.info("wrote path=%s", path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
