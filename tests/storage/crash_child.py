"""A stand-in daemon that dies in the middle of Volume.create (for kill -9 tests).

Run as ``python -m tests.storage.crash_child ARGS_JSON`` from the repository
root.  It builds a StorageAPI on the given run dir, reconnects the pool the
run dir remembers, becomes SPM and submits Volume.create.  qemu-img create
is replaced (fault injection, in this test process only) by a function that
touches ``marker`` and hangs, so the test can kill -9 the process at a known
point: after the volume's metadata (ILLEGAL) and LV/directory exist, before
its data does.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from storage import api, qemuimg


def main() -> None:
    args = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    provider = api.StorageAPI(args["run_dir"], **args["options"])
    provider.recover()
    provider.storage_pool_spm_start(args["pool_id"])

    def hang(*_args: object, **_kwargs: object) -> None:
        with open(args["marker"], "w"):
            pass
        time.sleep(3600)

    qemuimg.create = hang
    task_id = provider.volume_create(**args["request"])
    print(task_id, flush=True)
    time.sleep(3600)


if __name__ == "__main__":
    main()
