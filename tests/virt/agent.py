"""A throwaway "daemon" for the kill -9 test: it creates a VM, then waits to die.

    python -m tests.virt.agent '{"run_dir": ..., "vm_id": ..., "params": {...},
                                 "snapshot": [...]}'

Its storage reconnects the pool recorded in run_dir (as a restarted daemon
does); it prints ``READY`` once the VM runs and the optional snapshot is taken.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from storage import api as storage_api
from tests.virt import storage_env
from virt import api as virt_api


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    spec = json.loads(sys.argv[1])
    storage = storage_api.StorageAPI(spec["run_dir"], **storage_env.PROVIDER_OPTIONS)
    storage.recover()
    api = virt_api.API(
        storage,
        virt_api.Config(accel="tcg", drive_root=os.path.join(spec["run_dir"], "storage")),
    )
    api.start()
    api.vm_create(spec["vm_id"], spec["params"])
    if spec.get("snapshot"):
        api.vm_snapshot(spec["vm_id"], spec["snapshot"])
    print("READY", flush=True)
    time.sleep(600)


if __name__ == "__main__":
    main()
