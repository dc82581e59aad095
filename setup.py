"""Generates the gRPC code from proto/v1/*.proto as part of every build (wheel or editable)."""

import pathlib
import shutil
import tempfile

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = pathlib.Path(__file__).parent.resolve()
PROTO_DIR = ROOT / "proto" / "v1"


def generate_grpc_code() -> None:
    from grpc_tools import protoc
    import grpc_tools

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as out:
        for proto in sorted(PROTO_DIR.glob("*.proto")):
            # The virtual path makes generated imports read "from kvtier.proto.v1 import ...".
            args = [
                "protoc",
                f"-Ikvtier/proto/v1={PROTO_DIR}",
                f"-I{include}",
                f"--python_out={out}",
                f"--pyi_out={out}",
                f"--grpc_python_out={out}",
                f"kvtier/proto/v1/{proto.name}",
            ]
            if protoc.main(args) != 0:
                raise RuntimeError(f"protoc failed on {proto}")
        for generated in (pathlib.Path(out) / "kvtier" / "proto" / "v1").iterdir():
            shutil.copy(generated, PROTO_DIR / generated.name)


class BuildPyWithProto(build_py):
    def run(self):
        generate_grpc_code()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProto})
