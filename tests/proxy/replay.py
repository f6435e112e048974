"""Replay of the reference cc-proxy transcripts against hyperd-proxy.

The replayer plays both ends the recording relays saw: every client (``c2p`` frames are sent,
``p2c`` frames are awaited and compared byte for byte) and every agent channel (``p2a`` frames
are awaited and compared, ``a2p`` frames are sent). Frames are handled in the transcript's
order, which is causal; each expectation waits with a deadline. Random tokens and the
recording host's paths are substituted as the transcripts' README says: tokens learnt from the
RegisterVM/AttachVM responses, paths swapped and the length fields recomputed.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import msgspec

from protocol.ccproxy import Command, Frame, encode_frame
from tests.paths import CCPROXY_TRANSCRIPTS
from tests.proxy.harness import IO_DEADLINE, Pipe, PipeListener, RawClient

_CCPROXY_HEADER = struct.Struct(">HBxxxBBI")
_RESPONSE = 1
_IO_RESPONSES = (Command.REGISTER_VM, Command.ATTACH_VM)


def load(scenario: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((CCPROXY_TRANSCRIPTS / f"{scenario}.json").read_text())
    return data


@dataclass
class _AgentChannel:
    listener: PipeListener
    stream: Pipe | None = None
    buffer: bytearray = field(default_factory=bytearray)


class Mismatch(AssertionError):
    """A frame differs from the reference's."""


class Replayer:
    """Replays one transcript against a proxy listening on ``proxy_socket``."""

    def __init__(self, transcript: dict[str, Any], proxy_socket: str, workdir: Path) -> None:
        self.t = transcript
        self.proxy_socket = proxy_socket
        self.workdir = workdir
        self.clients: dict[str, RawClient] = {}
        self.channels: dict[str, _AgentChannel] = {}
        self.tokens: dict[bytes, bytes] = {}  # recorded -> ours
        paths = transcript["substitutions"]["paths"]
        self.paths: dict[bytes, bytes] = {paths["PROXY_SOCK"].encode(): proxy_socket.encode()}
        for name, value in paths.items():
            if name.startswith("VM") and not name.endswith("_REAL"):
                vm, kind = name.split("_")  # VM1_CTL
                ours = workdir / f"{vm.lower()}.{kind.lower()}"
                self.paths[value.encode()] = str(ours).encode()
        self.compared = 0

    async def listen(self) -> None:
        """Create the agent sockets of every VM of the transcript."""
        for name, value in self.t["substitutions"]["paths"].items():
            if name.startswith("VM") and not name.endswith("_REAL"):
                vm, kind = name.split("_")
                channel = kind.lower() if vm == "VM1" else f"{vm.lower()}/{kind.lower()}"
                ours = self.paths[value.encode()].decode()
                self.channels[channel] = _AgentChannel(await PipeListener.create(ours))

    async def aclose(self) -> None:
        for client in self.clients.values():
            await client.aclose()
        for channel in self.channels.values():
            if channel.stream is not None:
                await channel.stream.aclose()
            await channel.listener.aclose()

    def _sub(self, data: bytes) -> bytes:
        for old, new in (*self.paths.items(), *self.tokens.items()):
            if old in data:
                data = data.replace(old, new)
        return data

    def _ccproxy(self, frame: dict[str, Any]) -> bytes:
        """The frame's bytes for our run: substituted payload, recomputed length."""
        raw = bytes.fromhex(frame["raw_hex"])
        header = frame["header"]
        words = header["header_words"]
        payload = bytes.fromhex(frame["payload_hex"])
        new = self._sub(payload)
        if new == payload:
            return raw
        head = bytearray(raw[: 4 * words])
        struct.pack_into(">I", head, 8, len(new))
        return bytes(head) + new

    def _learn_tokens(self, frame: dict[str, Any], actual: bytes) -> None:
        header = frame["header"]
        if (
            header["type"] != _RESPONSE
            or header["in_error"]
            or header["opcode"] not in _IO_RESPONSES
        ):
            return
        expected = msgspec.json.decode(bytes.fromhex(frame["payload_hex"]))
        got = msgspec.json.decode(actual[12:])
        for old, new in zip(expected["io"]["tokens"] or (), got["io"]["tokens"] or (), strict=True):
            self.tokens[old.encode()] = new.encode()

    async def _client(self, name: str) -> RawClient:
        if name not in self.clients:
            self.clients[name] = await RawClient.connect(self.proxy_socket)
        return self.clients[name]

    async def _agent_read(self, channel: _AgentChannel, size: int) -> bytes:
        assert channel.stream is not None
        with anyio.fail_after(IO_DEADLINE):
            while len(channel.buffer) < size:
                channel.buffer += await channel.stream.receive()
        data = bytes(channel.buffer[:size])
        del channel.buffer[:size]
        return data

    async def _agent_frame(self, channel: _AgentChannel, kind: str) -> bytes:
        head_size, length_at = (8, 4) if kind == "ctl" else (12, 8)
        head = await self._agent_read(channel, head_size)
        (total,) = struct.unpack_from(">I", head, length_at)
        return head + await self._agent_read(channel, total - head_size)

    async def _agent_eof(self, channel: _AgentChannel) -> None:
        assert channel.stream is not None
        with anyio.fail_after(IO_DEADLINE):
            try:
                data = await channel.stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
                return
        raise Mismatch(f"expected EOF from the proxy, got {data!r}")

    async def run(self, frames: Iterable[dict[str, Any]] | None = None) -> None:
        """Play ``frames`` (default: the whole transcript)."""
        pending_c2p: dict[str, bytearray] = {}
        for frame in self.t["frames"] if frames is None else frames:
            channel_name, direction, kind = frame["channel"], frame["dir"], frame["kind"]
            if direction != "c2p":
                # flush what the client wrote in one go before waiting on anything
                for name, data in pending_c2p.items():
                    await (await self._client(name)).send(bytes(data))
                pending_c2p.clear()
            agent = self.channels.get(channel_name)
            if kind == "conn":
                await self._conn_event(frame, agent)
            elif direction == "c2p":
                await self._client(channel_name)
                pending_c2p.setdefault(channel_name, bytearray()).extend(self._ccproxy(frame))
            elif direction == "p2c":
                client = await self._client(channel_name)
                got = await client.frame()
                actual = _frame_bytes(got)
                self._learn_tokens(frame, actual)
                expected = self._ccproxy(frame)
                if actual != expected:
                    raise Mismatch(_mismatch(frame, expected, actual))
                self.compared += 1
            elif direction == "p2a":
                assert agent is not None, channel_name
                actual = await self._agent_frame(agent, kind)
                expected = self._sub(bytes.fromhex(frame["raw_hex"]))
                if actual != expected:
                    raise Mismatch(_mismatch(frame, expected, actual))
                self.compared += 1
            elif direction == "a2p":
                assert agent is not None and agent.stream is not None, channel_name
                await agent.stream.send(bytes.fromhex(frame["raw_hex"]))
        for name, data in pending_c2p.items():
            await (await self._client(name)).send(bytes(data))

    async def _conn_event(self, frame: dict[str, Any], agent: _AgentChannel | None) -> None:
        name, direction, event = frame["channel"], frame["dir"], frame["event"]
        if event == "open":
            if agent is not None:
                with anyio.fail_after(IO_DEADLINE):
                    agent.stream = await agent.listener.accept()
            else:
                await self._client(name)
        elif event in ("eof", "reset"):
            if direction == "c2p":
                client = self.clients.get(name)
                if client is not None and not client.eof:
                    try:
                        await client.stream.send_eof()
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                        pass
            elif direction == "p2c":
                await (await self._client(name)).expect_eof()
            elif direction == "a2p":
                assert agent is not None and agent.stream is not None
                await agent.stream.send_eof()
            elif direction == "p2a":
                assert agent is not None
                await self._agent_eof(agent)


def _frame_bytes(frame: Frame) -> bytes:
    return encode_frame(frame)


def _mismatch(frame: dict[str, Any], expected: bytes, actual: bytes) -> str:
    return f"step {frame['step']} {frame['channel']}: expected {expected!r}, got {actual!r}"


def frames_until(transcript: dict[str, Any], last_step: int, skip: Iterable[str] = ()) -> list[Any]:
    """The transcript's frames up to and including ``last_step``, without ``skip`` channels."""
    skipped = set(skip)
    return [
        f for f in transcript["frames"] if f["step"] <= last_step and f["channel"] not in skipped
    ]


__all__ = ["Mismatch", "Replayer", "frames_until", "load"]
