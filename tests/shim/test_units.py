"""The shim's pieces without containerd: argv parsing, config.json conversion, the delete
action on its own, and the ttrpc server over a real unix socket."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from google.protobuf import empty_pb2

from hyperd.shim import bundle as bundles
from hyperd.shim.cli import UsageError, parse_args, socket_address
from hyperd.shim.proto import shim_pb2, ttrpc_pb2
from hyperd.shim.ttrpc import CallInfo, Code, Method, TtrpcClient, TtrpcError, serve_connection
from protocol.ttrpc import encode_frame


def test_parse_args_go_flag_forms() -> None:
    a = parse_args(
        ["-namespace", "ns", "--address=/run/c.sock", "-publish-binary", "/bin/c", "-id", "t1",
         "-debug", "start"]
    )  # fmt: skip
    assert (a.namespace, a.address, a.publish_binary, a.id, a.debug, a.action) == (
        "ns", "/run/c.sock", "/bin/c", "t1", True, "start",
    )  # fmt: skip
    b = parse_args(["-bundle", "/b", "-id", "x", "delete"])
    assert (b.bundle, b.action) == ("/b", "delete")
    assert parse_args(["-v"]).version
    with pytest.raises(UsageError, match="not defined: -bogus"):
        parse_args(["-bogus", "start"])
    with pytest.raises(UsageError, match="needs an argument"):
        parse_args(["-id"])


def test_socket_address_is_per_containerd_namespace_and_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HYPERD_SHIM_SOCKET_DIR", "/run/x")
    a = socket_address("/run/containerd/containerd.sock", "default", "g")
    assert a.startswith("unix:///run/x/") and len(a) < 106
    assert a == socket_address("/run/containerd/containerd.sock", "default", "g")
    assert a != socket_address("/other/containerd.sock", "default", "g")
    assert a != socket_address("/run/containerd/containerd.sock", "k8s.io", "g")


def test_config_to_hyperd_params() -> None:
    spec = {
        "process": {
            "args": ["sh", "-c", "true"],
            "env": ["PATH=/bin", "NOEQUALS"],
            "cwd": "/work",
            "user": {"uid": 1000, "gid": 100, "additionalGids": [100, 10]},
            "terminal": True,
            "noNewPrivileges": True,
        },
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/etc/hosts",
                "type": "bind",
                "source": "/h",
                "options": ["rbind", "ro"],
            },
            {"destination": "/data", "source": "/d", "options": ["rbind", "rw"]},
        ],
        "annotations": {"io.kubernetes.cri.sandbox-id": "sb1"},
        "linux": {"namespaces": [{"type": "network", "path": "/var/run/netns/cni-1"}]},
        "root": {"path": "rootfs", "readonly": True},
    }
    assert bundles.process_params(spec["process"]) == {
        "args": ["sh", "-c", "true"],
        "env": ["PATH=/bin"],
        "cwd": "/work",
        "terminal": True,
        "no_new_privileges": True,
        "user": "1000",
        "group": "100",
        "additional_groups": ["10"],
    }
    assert bundles.mount_params(spec) == [
        {"source": "/h", "destination": "/etc/hosts", "type": "bind", "options": ["ro"]},
        {"source": "/d", "destination": "/data", "type": "bind", "options": []},
    ]
    assert bundles.group_key(spec, "c1") == "sb1"
    assert bundles.group_key({}, "c1") == "c1"
    assert bundles.netns_path(spec) == "/var/run/netns/cni-1"
    assert bundles.readonly_root(spec)
    with pytest.raises(bundles.BundleError, match=r"process\.args is empty"):
        bundles.process_params({"args": []})


def test_overlay_options_split_into_flags_and_data() -> None:
    flags, data = bundles.split_options(
        ["index=off", "workdir=/w", "upperdir=/u", "lowerdir=/l1:/l2", "ro", "nosuid"]
    )
    assert flags == bundles.MS_RDONLY | bundles.MS_NOSUID
    assert data == "index=off,workdir=/w,upperdir=/u,lowerdir=/l1:/l2"


def test_read_config_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(bundles.BundleError, match="cannot read"):
        bundles.read_config(str(tmp_path))
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(bundles.BundleError, match="not a JSON object"):
        bundles.read_config(str(tmp_path))


def test_delete_action_is_idempotent_without_a_shim_or_hyperd(tmp_path: Path) -> None:
    """containerd may run `delete` for a bundle whose shim and hyperd are both gone, and more
    than once: each run exits 0 with a DeleteResponse (137, now)."""
    bundle = tmp_path / "b"
    (bundle / "rootfs").mkdir(parents=True)
    (bundle / "config.json").write_text(json.dumps({"process": {"args": ["true"]}}))
    env = dict(
        os.environ,
        HYPERD_SOCKET=str(tmp_path / "no-hyperd.sock"),
        HYPERD_SHIM_SOCKET_DIR=str(tmp_path / "s"),
    )
    argv = [sys.executable, "-m", "hyperd.shim", "-namespace", "ns", "-address",
            str(tmp_path / "c.sock"), "-publish-binary", "/bin/true", "-id", "t1",
            "-bundle", str(bundle), "delete"]  # fmt: skip
    for _ in range(2):
        result = subprocess.run(argv, cwd=bundle, env=env, capture_output=True, timeout=60)
        assert result.returncode == 0, result.stderr
        resp = shim_pb2.DeleteResponse.FromString(result.stdout)
        assert resp.exit_status == 137 and resp.exited_at.seconds > 0
        assert b"cannot reach hyperd" in result.stderr  # reported as a cleanup warning


# ---- the ttrpc server over a unix socket ------------------------------------------------------


async def _echo_state(req: shim_pb2.StateRequest, info: CallInfo) -> shim_pb2.StateResponse:
    if req.id == "missing":
        raise TtrpcError(Code.NOT_FOUND, "task missing: not found")
    if req.id == "slow":
        await anyio.sleep_forever()
    return shim_pb2.StateResponse(id=req.id, bundle=info.metadata.get("k", ""))


async def _crash(req: empty_pb2.Empty, info: CallInfo) -> empty_pb2.Empty:
    raise RuntimeError("boom")


SERVICES = {
    "containerd.task.v2.Task": {
        "State": Method(shim_pb2.StateRequest, _echo_state),
        "Shutdown": Method(empty_pb2.Empty, _crash),
    }
}


@pytest.mark.anyio
async def test_server_answers_calls_errors_and_bad_frames(short_tmp: Path) -> None:
    path = str(short_tmp / "t.sock")
    listener = await anyio.create_unix_listener(path)
    served: list[anyio.Event] = []

    async def handle(stream: anyio.abc.SocketStream) -> None:
        done = anyio.Event()
        served.append(done)
        async with stream:
            await serve_connection(stream, SERVICES)
        done.set()

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        client = await TtrpcClient.connect(path)
        call = client.call
        svc = "containerd.task.v2.Task"
        ok = await call(svc, "State", shim_pb2.StateRequest(id="t1"), shim_pb2.StateResponse,
                        deadline=30, metadata={"k": "v"})  # fmt: skip
        assert (ok.id, ok.bundle) == ("t1", "v")  # type: ignore[attr-defined]
        cases = [
            (svc, "State", shim_pb2.StateRequest(id="missing"), Code.NOT_FOUND, "not found"),
            (svc, "Pause", empty_pb2.Empty(), Code.UNIMPLEMENTED, "method Pause"),
            ("x.Y", "State", empty_pb2.Empty(), Code.UNIMPLEMENTED, "service x.Y"),
            (svc, "Shutdown", empty_pb2.Empty(), Code.INTERNAL, "boom"),
        ]
        for service, method, request, code, text in cases:
            with pytest.raises(TtrpcError) as err:
                await call(service, method, request, shim_pb2.StateResponse, deadline=30)
            assert err.value.code == code and text in err.value.message
        await client.aclose()

        # raw frames: an undecodable payload, an even stream id, an oversized message; a call
        # that never finishes does not hold up the others
        async with await anyio.connect_unix(path) as raw:
            bad = ttrpc_pb2.Request(
                service=svc, method="State", payload=b"\xff\xff"
            ).SerializeToString()
            slow = ttrpc_pb2.Request(
                service=svc,
                method="State",
                payload=shim_pb2.StateRequest(id="slow").SerializeToString(),
            ).SerializeToString()
            await raw.send(
                encode_frame(1, 1, slow) + encode_frame(3, 1, bad) + encode_frame(2, 1, b"")
            )
            await raw.send(b"\x00\x50\x00\x01\x00\x00\x00\x05\x01\x00")  # 5 MiB announced
            got: dict[int, ttrpc_pb2.Response] = {}
            buf = b""
            with anyio.fail_after(30):
                while len(got) < 3:
                    buf += await raw.receive()
                    while len(buf) >= 10 and len(buf) >= 10 + int.from_bytes(buf[:4], "big"):
                        n = int.from_bytes(buf[:4], "big")
                        got[int.from_bytes(buf[4:8], "big")] = ttrpc_pb2.Response.FromString(
                            buf[10 : 10 + n]
                        )
                        buf = buf[10 + n :]
            assert got[3].status.code == Code.INVALID_ARGUMENT
            assert got[2].status.code == Code.INVALID_ARGUMENT and "odd" in got[2].status.message
            assert got[5].status.code == Code.RESOURCE_EXHAUSTED
            assert "exceed maximum message size of 4194304" in got[5].status.message
            assert 1 not in got
        # both connections end on EOF (cancelling a read as its socket turns readable upsets
        # anyio's unix streams, see hyperd.rpc): only the idle accept is cancelled
        with anyio.fail_after(30):
            for done in served:
                await done.wait()
        tg.cancel_scope.cancel()
