"""The committed gRPC stubs are what the .proto sources generate, and every proto field says what it is."""

import filecmp
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROTOS = os.path.join(ROOT, "protos")


def test_stubs_are_fresh(tmp_path):
    pytest.importorskip("grpc_tools")
    from protos.generate import generate

    generate(str(tmp_path))
    made = sorted(os.listdir(tmp_path / "protos"))
    assert made, "protoc wrote nothing"
    for name in made:
        assert filecmp.cmp(tmp_path / "protos" / name, os.path.join(PROTOS, name), shallow=False), (
            f"protos/{name} is stale: run `make protos` and commit the result")


def test_every_field_is_commented():
    field = re.compile(r"^\s*(optional |repeated )?[A-Za-z0-9_.]+ [a-z_0-9]+ = \d+;")
    for name in sorted(f for f in os.listdir(PROTOS) if f.endswith(".proto")):
        for i, line in enumerate(open(os.path.join(PROTOS, name)), 1):
            if field.match(line):
                assert "//" in line, f"protos/{name}:{i}: field without a comment: {line.strip()}"


def test_messages_round_trip():
    from protos import generation_pb2 as pb

    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]),
                             sampling=pb.SamplingParams(max_tokens=8, temperature=0.0, stop=["\n\n"]))
    back = pb.GenerateRequest.FromString(req.SerializeToString())
    assert back.WhichOneof("prompt") == "token_ids" and list(back.token_ids.ids) == [1, 2, 3]
    assert back.sampling.HasField("temperature") and back.sampling.temperature == 0.0
    assert not back.sampling.HasField("top_p")  # unset stays distinguishable from a default
