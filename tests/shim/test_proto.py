"""The generated protobuf code: current with its .proto files, and the field numbers of the
containerd 1.6 shim API checked against bytes written from the spec's tables."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import timestamp_pb2

from hyperd.shim.proto import events_pb2, generate, shim_pb2, task_types_pb2, ttrpc_pb2


def test_generated_code_is_current(tmp_path: Path) -> None:
    generate.generate(tmp_path)
    fresh = tmp_path / "hyperd" / "shim" / "proto"
    names = sorted(p.name for p in fresh.iterdir())
    assert names, "protoc wrote nothing"
    for name in names:
        committed = generate.HERE / name
        assert committed.read_bytes() == (fresh / name).read_bytes(), (
            f"{name} is stale: run python -m hyperd.shim.proto.generate"
        )


def test_ttrpc_envelope_field_numbers() -> None:
    req = ttrpc_pb2.Request(
        service="S",
        method="M",
        payload=b"p",
        timeout_nano=2,
        metadata=[ttrpc_pb2.KeyValue(key="k", value="v")],
    )
    assert req.SerializeToString() == (
        b"\x0a\x01S\x12\x01M\x1a\x01p\x20\x02\x2a\x06\x0a\x01k\x12\x01v"
    )
    resp = ttrpc_pb2.Response(status=ttrpc_pb2.Status(code=5, message="x"), payload=b"")
    assert resp.SerializeToString() == b"\x0a\x05\x08\x05\x12\x01x"


def test_task_messages_field_numbers() -> None:
    state = shim_pb2.StateResponse(
        id="a",
        bundle="b",
        pid=3,
        status=task_types_pb2.STOPPED,
        stdin="i",
        stdout="o",
        stderr="e",
        terminal=True,
        exit_status=9,
        exited_at=timestamp_pb2.Timestamp(seconds=1),
        exec_id="x",
    )
    assert state.SerializeToString() == (
        b"\x0a\x01a\x12\x01b\x18\x03\x20\x03\x2a\x01i\x32\x01o\x3a\x01e\x40\x01\x48\x09"
        b"\x52\x02\x08\x01\x5a\x01x"
    )
    create = shim_pb2.CreateTaskRequest.FromString(
        b"\x0a\x02t1\x12\x01B\x1a\x0c\x0a\x07overlay\x22\x01o\x20\x01\x2a\x01i\x32\x01o\x3a\x01e"
    )
    assert (create.id, create.bundle, create.terminal) == ("t1", "B", True)
    assert (create.stdin, create.stdout, create.stderr) == ("i", "o", "e")
    assert create.rootfs[0].type == "overlay" and list(create.rootfs[0].options) == ["o"]
    kill = shim_pb2.KillRequest.FromString(b"\x0a\x01t\x12\x01e\x18\x09\x20\x01")
    assert (kill.id, kill.exec_id, kill.signal, kill.all) == ("t", "e", 9, True)
    connect = shim_pb2.ConnectResponse(shim_pid=1, task_pid=2, version="v")
    assert connect.SerializeToString() == b"\x08\x01\x10\x02\x1a\x01v"


def test_event_names_and_numbers() -> None:
    assert events_pb2.TaskExit.DESCRIPTOR.full_name == "containerd.events.TaskExit"
    exit_ = events_pb2.TaskExit(container_id="c", id="i", pid=1, exit_status=2)
    assert exit_.SerializeToString() == b"\x0a\x01c\x12\x01i\x18\x01\x20\x02"
    delete = events_pb2.TaskDelete(container_id="c", pid=1, exit_status=2, id="x")
    assert delete.SerializeToString() == b"\x0a\x01c\x10\x01\x18\x02\x2a\x01x"
