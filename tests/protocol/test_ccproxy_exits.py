"""hyperd's exit-notification extension of the cc-proxy protocol: bytes in, events out."""

from __future__ import annotations

import pytest

from protocol import NEED_DATA, LocalProtocolError, RemoteProtocolError
from protocol.ccproxy import (
    AttachVM,
    ClientConnection,
    Command,
    IOResponse,
    ProcessExitNotice,
    RegisterVM,
    Response,
    ServerConnection,
    VMProcessExited,
    VMResponse,
    decode_payload,
    encode_payload,
)

NOTICE = ProcessExitNotice(containerId="vm", token="tok", container="c", process="init", status=3)
NOTICE_WIRE = (
    bytes.fromhex("00020300000003010000004e")
    + b'{"containerId":"vm","token":"tok","container":"c","process":"init","status":3}'
)


def test_requests_carry_the_flag_only_when_set() -> None:
    # omitempty: without the extension the bytes are the reference's
    assert encode_payload(AttachVM("vm")) == b'{"containerId":"vm"}'
    assert encode_payload(AttachVM("vm", exitNotifications=True)) == (
        b'{"containerId":"vm","exitNotifications":true}'
    )
    register = RegisterVM("vm", "/c", "/t", exitNotifications=True)
    assert encode_payload(register).endswith(b'"exitNotifications":true}')
    # the reference proxy's response has no such key: it decodes as "not sent"
    plain = decode_payload(VMResponse, b'{"io":{"URL":"unix:///p","tokens":null}}')
    assert plain.exitNotifications is False
    ours = VMResponse(IOResponse("unix:///p"), exitNotifications=True)
    assert (
        encode_payload(ours) == b'{"io":{"URL":"unix:///p","tokens":null},"exitNotifications":true}'
    )
    assert encode_payload(VMResponse(IOResponse("unix:///p"))) == (
        b'{"io":{"URL":"unix:///p","tokens":null}}'
    )


def test_server_encodes_the_notification_as_opcode_1() -> None:
    assert ServerConnection().send_vm_process_exited(NOTICE) == NOTICE_WIRE
    with pytest.raises(LocalProtocolError, match="one byte"):
        ServerConnection().send_vm_process_exited(ProcessExitNotice(containerId="v", status=256))


@pytest.mark.parametrize("split", [1, 5, 12, len(NOTICE_WIRE)])
def test_runtime_with_the_extension_gets_exits_between_responses(split: int) -> None:
    client = ClientConnection("runtime", exit_notifications=True)
    client.send_command(Command.ATTACH_VM, AttachVM("vm", exitNotifications=True))
    reply = encode_payload(VMResponse(IOResponse("u"), exitNotifications=True))
    from protocol.ccproxy import Frame, FrameType, encode_frame

    wire = encode_frame(Frame(FrameType.RESPONSE, Command.ATTACH_VM, reply)) + NOTICE_WIRE * 2
    events: list[object] = []
    for i in range(0, len(wire), split):
        client.receive_data(wire[i : i + split])
        while (event := client.next_event()) is not NEED_DATA:
            events.append(event)
    assert events == [
        Response(Command.ATTACH_VM, reply),
        VMProcessExited(NOTICE),
        VMProcessExited(NOTICE),
    ]


def test_runtime_without_the_extension_refuses_the_notification() -> None:
    client = ClientConnection("runtime")
    client.receive_data(NOTICE_WIRE)
    with pytest.raises(RemoteProtocolError, match="did not ask for it"):
        client.next_event()


@pytest.mark.parametrize(
    ("payload", "fault"),
    [
        (b"not json", "invalid ProcessExitNotice"),
        (b'{"containerId":"v","status":"3"}', "Expected `int`"),
        (b'{"containerId":"v","status":300}', "status 300"),
        (b'{"containerId":"v","status":-1}', "status -1"),
    ],
)
def test_bad_notifications_are_remote_errors(payload: bytes, fault: str) -> None:
    client = ClientConnection("runtime", exit_notifications=True)
    header = bytes.fromhex("0002030000000301") + len(payload).to_bytes(4, "big")
    client.receive_data(header + payload)
    with pytest.raises(RemoteProtocolError, match=fault):
        client.next_event()
    with pytest.raises(RemoteProtocolError):  # sticky
        client.next_event()
