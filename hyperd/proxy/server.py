"""The proxy: listener, VM registry, token table, and the system/pod-mode lifecycle.

System mode serves any number of VMs until stopped. Pod mode (``--uri``) serves one VM: after
UnregisterVM it stops accepting connections (the socket file is removed) and exits once the
VM's channels have closed (immediately if they already had).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from hyperd.proxy import texts
from hyperd.proxy.client import ClientConnection
from hyperd.proxy.sessions import IOSession, TokenTable, new_token
from hyperd.proxy.vm import AgentVM
from protocol.ccproxy import IOResponse, VMResponse, encode_payload
from protocol.hyperstart import Dialect

log = logging.getLogger("hyperd.proxy")

DEFAULT_WAIT: Final = 30.0  # the reference's shim/process waits; also our READY deadline
DEFAULT_AGENT_TIMEOUT: Final = 60.0  # ours: the reference waits for agent replies forever
MAX_IO_STREAMS: Final = 4096  # tokens per RegisterVM/AttachVM (the reference has no cap)
DEFAULT_MAX_UNDELIVERED_EXITS: Final = 1024  # exits kept per VM while no runtime listens


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """How a proxy behaves. Deadlines are in seconds; ``agent_timeout`` None = wait forever."""

    url: str
    pod_mode: bool = False
    dialect: Dialect | None = None  # None: detect with GETVERSION after READY
    ready_timeout: float = DEFAULT_WAIT
    shim_timeout: float = DEFAULT_WAIT
    process_timeout: float = DEFAULT_WAIT
    agent_timeout: float | None = DEFAULT_AGENT_TIMEOUT
    socket_path: str | None = None  # removed when pod mode stops listening
    exit_notifications: bool = True  # hyperd's extension; False behaves as the reference
    max_undelivered_exits: int = DEFAULT_MAX_UNDELIVERED_EXITS


class Proxy:
    """Serves clients on one listening socket until :meth:`stop` (or pod-mode exit)."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.vms: dict[str, AgentVM] = {}
        self.tokens = TokenTable()
        self.clients: set[ClientConnection] = set()
        self._all_vms: set[AgentVM] = set()
        self._stopped = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None
        self._exit_after: AgentVM | None = None  # pod mode: exit once this VM is lost

    async def serve(
        self, listener: socket.socket, on_listening: Callable[[], None] | None = None
    ) -> None:
        """Accept clients on ``listener`` until stopped; then close everything.

        ``on_listening`` is called once connections are being accepted.
        """
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: ClientConnection(self), sock=listener)
        if on_listening is not None:
            on_listening()
        try:
            await self._stopped.wait()
        finally:
            self._stop_listening()
            for client in list(self.clients):
                client.close()
            for vm in list(self._all_vms):
                vm.close()

    def stop(self) -> None:
        """Make :meth:`serve` return (SIGTERM, tests)."""
        self._stopped.set()

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def _stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
            if self.config.socket_path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.config.socket_path)

    # -- registry --------------------------------------------------------------------------------

    def add_vm(self, vm_id: str) -> AgentVM:
        """Register a VM (its agent not yet connected); raises CommandError if the id is taken."""
        if vm_id in self.vms:
            raise texts.CommandError(texts.already_registered(vm_id))
        vm = AgentVM(
            vm_id,
            dialect=self.config.dialect,
            agent_timeout=self.config.agent_timeout,
            on_lost=self._vm_lost,
            keep_exits=self.config.max_undelivered_exits if self.config.exit_notifications else 0,
        )
        self.vms[vm_id] = vm
        self._all_vms.add(vm)
        return vm

    def drop_vm(self, vm: AgentVM) -> None:
        """Undo :meth:`add_vm` after a failed RegisterVM: nothing of it stays allocated."""
        if self.vms.get(vm.id) is vm:
            del self.vms[vm.id]
        vm.unregistered = True
        vm.close()
        self._all_vms.discard(vm)
        self.tokens.purge(vm)

    def unregister(self, vm: AgentVM) -> None:
        """UnregisterVM: forget the id; the agent channels stay open until the VM is lost."""
        if self.vms.get(vm.id) is vm:
            del self.vms[vm.id]
        vm.unregistered = True
        if self.config.pod_mode:
            self._stop_listening()
            self._exit_after = vm
        if vm.lost:
            self._vm_lost(vm)

    def _vm_lost(self, vm: AgentVM) -> None:
        if not vm.unregistered:
            return  # stays registered: AttachVM works, Hyper fails, as the reference
        self._all_vms.discard(vm)
        self.tokens.purge(vm)
        if self._exit_after is vm:
            log.info("pod mode: VM %s unregistered and gone, exiting", vm.id)
            self.stop()

    # -- tokens ----------------------------------------------------------------------------------

    def allocate(self, vm: AgentVM, count: int) -> list[str]:
        """Allocate ``count`` tokens of ``vm`` (I/O sessions with fresh seqs)."""
        if count > MAX_IO_STREAMS:
            raise texts.CommandError(f"too many I/O streams requested: {count}")
        tokens: list[str] = []
        for _ in range(max(count, 0)):
            session: IOSession = vm.new_session(new_token())
            self.tokens.add(session)
            tokens.append(session.token)
        return tokens

    def io_response(self, tokens: list[str], *, exit_notifications: bool = False) -> bytes:
        """The RegisterVM/AttachVM success payload ``{"io":{"URL":…,"tokens":…}}``, plus
        ``"exitNotifications":true`` when this connection will get them (hyperd's extension)."""
        return encode_payload(
            VMResponse(
                IOResponse(self.config.url, tokens or None), exitNotifications=exit_notifications
            )
        )


__all__ = [
    "DEFAULT_AGENT_TIMEOUT",
    "DEFAULT_MAX_UNDELIVERED_EXITS",
    "DEFAULT_WAIT",
    "MAX_IO_STREAMS",
    "Proxy",
    "ProxyConfig",
]
