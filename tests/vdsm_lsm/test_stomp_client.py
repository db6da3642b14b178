"""Our STOMP client (vdsm_lsm/stomp_client.py) and ``vdsm-lsm-client --stomp``, against the daemon.

Calls answered by id over the unix socket, TCP and mutual TLS; error
answers as :class:`ClientError`; events kept from the connection on, so a
wait finds one that came before it; a daemon that goes away fails the call
in progress with OSError, and the next call connects again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from tests.vdsm_lsm.stomp_env import BLANK, MiB, new_id
from vdsm_lsm import api_schema, client_errors, stomp_client

pytest_plugins = ["tests.tls_fixtures"]

TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_calls_over_unix_and_tcp(daemon):
    for rpc in (stomp_client.StompClient(socket_path=daemon.socket_path, timeout=30),
                stomp_client.StompClient(host="127.0.0.1", port=daemon.port, timeout=30)):
        try:
            assert rpc.call("Host.ping2") is True
            with pytest.raises(client_errors.ClientError) as e:
                rpc.call("VM.getStats", vmID=new_id())
            assert e.value.code == api_schema.code_of("noVM")
            with pytest.raises(client_errors.ClientError) as e:
                rpc.call("Host.ping2", nope=1)
            assert e.value.code == -32602
            # Answers reach their callers by id, whatever the order.
            results: list[object] = []

            def ping(rpc: stomp_client.StompClient = rpc, out: list[object] = results) -> None:
                out.append(rpc.call("Host.ping2"))

            threads = [threading.Thread(target=ping) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert results == [True] * 8
        finally:
            rpc.close()


def test_events_are_kept_for_wait(daemon, tmp_path):
    rpc = stomp_client.StompClient(socket_path=daemon.socket_path, timeout=60)
    try:
        sd, pool, img, vol = new_id(), new_id(), new_id(), new_id()
        rpc.call("StorageDomain.create", storagedomainID=sd, domainType="file",
                 typeArgs={"path": str(tmp_path)}, name="events")
        rpc.call("StoragePool.create", storagepoolID=pool, name="events", masterSdUUID=sd,
                 domainList=[sd])
        rpc.call("StoragePool.connect", storagepoolID=pool, hostID=1, masterSdUUID=sd)
        rpc.call("StoragePool.spmStart", storagepoolID=pool)
        task = rpc.call("Volume.create", storagepoolID=pool, storagedomainID=sd, imageID=img,
                        volumeID=vol, size=str(64 * MiB), volFormat="COW",
                        preallocate="SPARSE", srcImgUUID=BLANK, srcVolUUID=BLANK)
        name = f"|storage|task_finished|{task}"
        event = rpc.wait(name, timeout=60)
        assert event is not None and (event["taskID"], event["code"]) == (task, 0)
        # Kept: found again by a later wait, and listed.
        assert rpc.wait(name, lambda p: p["taskResult"] == "success", timeout=0) == event
        assert (name, event) in rpc.events()
        started = time.monotonic()
        assert rpc.wait("|virt|VM_status|", timeout=0.5) is None
        assert time.monotonic() - started >= 0.5
        rpc.call("Task.clear", taskID=task)
        rpc.call("StoragePool.destroy", storagepoolID=pool)
        rpc.call("StorageDomain.format", storagedomainID=sd)
    finally:
        rpc.close()


def test_a_daemon_gone_is_oserror_and_the_next_call_reconnects(daemon_factory):
    d = daemon_factory()
    rpc = stomp_client.StompClient(socket_path=d.socket_path, timeout=30)
    try:
        assert rpc.call("Host.ping2") is True
        d.stop()
        with pytest.raises(OSError):
            rpc.call("Host.ping2")
        with pytest.raises(OSError):
            rpc.wait("|storage|task_finished|", timeout=1)
        d.start()
        assert rpc.call("Host.ping2") is True
    finally:
        rpc.close()


def test_over_mutual_tls(tls_daemon, pki):  # noqa: F811
    rpc = stomp_client.StompClient(host="127.0.0.1", port=tls_daemon.port,
                                   tls_key=f"{pki}/client.key", tls_cert=f"{pki}/client.crt",
                                   tls_ca=f"{pki}/ca.crt", timeout=30)
    try:
        assert [rpc.call("Host.ping2") for _ in range(3)] == [True] * 3
        assert rpc.wait("|virt|", timeout=0.2) is None
    finally:
        rpc.close()


def test_cli_calls_a_verb_over_stomp(daemon):
    argv = [sys.executable, "-m", "vdsm_lsm.cli", "--stomp", "--socket", daemon.socket_path,
            "Host", "getVMList", "onlyUUID=true"]
    proc = subprocess.run(argv, cwd=TOP, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
    assert "STOMP connected" in daemon.log()
