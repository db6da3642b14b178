"""A stand-in daemon that prepares volumes and is then killed (kill -9 tests
of storage.leftovers).

Run as ``python -m tests.storage.leftovers_child ARGS_JSON`` from the
repository root.  On a new block domain over ``pv`` (in a pool it is SPM
of) it creates three images: ``a`` (a RAW base with ``marker`` at its start,
and a COW top), ``b`` and ``c`` (one RAW volume each), prepares a's top,
b and c, and starts a ``qemu-img convert`` reading b at 1 KiB/s (a copy a
killed daemon leaves running).  Then it prints one JSON line (the ids, the
device of each prepared volume and the qemu-img pid) and sleeps until
killed.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

from storage import api, volume
from tests.storage.domain_helpers import create_volume, make_pool, new_id

MiB = 1024**2


def main() -> None:
    args = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    provider = api.StorageAPI(args["run_dir"], **args["options"])
    sd_id = new_id()
    provider.storage_domain_create(sd_id, "block", {"devices": [args["pv"]]}, "leftovers")
    pool_id = make_pool(provider, sd_id)
    ids: dict[str, str] = {"sd": sd_id, "pool": pool_id}
    for name in ("a", "b", "c"):
        ids[name] = new_id()
        ids[f"{name}_base"] = new_id()
        create_volume(provider, pool_id, sd_id, ids[name], ids[f"{name}_base"], 16 * MiB,
                      volume.RAW, volume.PREALLOCATED)
    ids["a_top"] = new_id()
    create_volume(provider, pool_id, sd_id, ids["a"], ids["a_top"], 16 * MiB,
                  parent=ids["a_base"])
    prepared = {
        "a": provider.image_prepare(pool_id, sd_id, ids["a"], ids["a_top"]),
        "b": provider.image_prepare(pool_id, sd_id, ids["b"], ids["b_base"]),
        "c": provider.image_prepare(pool_id, sd_id, ids["c"], ids["c_base"]),
    }
    marker = args["marker"].encode()
    for path in (prepared["a"]["chain"][0]["path"], prepared["b"]["path"]):
        fd = os.open(path, os.O_WRONLY)
        try:
            # Data throughout: a rate-limited copy of it takes hours (qemu-img
            # skips zeros at once).
            os.pwrite(fd, marker + os.urandom(16 * MiB - len(marker)), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
    copy = subprocess.Popen(
        ["qemu-img", "convert", "-r", "1k", "-f", "raw", "-O", "raw",
         prepared["b"]["path"], os.path.join(args["work"], "copy.raw")],
        start_new_session=True,
    )
    devices = {
        entry["volumeID"]: os.readlink(entry["path"])
        for result in prepared.values()
        for entry in result["chain"]
    }
    print(json.dumps({"ids": ids, "devices": devices, "copy_pid": copy.pid}), flush=True)
    time.sleep(3600)


if __name__ == "__main__":
    main()
