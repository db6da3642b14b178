"""A throwaway "daemon" for the kill -9 test: it creates a VM, then waits to die.

    python -m tests.virt.agent '{"root": ..., "pool_id": ..., "sd_id": ...,
                                 "vm_id": ..., "params": {...}, "snapshot": [...]}'

prints ``READY`` once the VM runs (and the optional snapshot is taken).
"""

from __future__ import annotations

import json
import logging
import sys
import time

from tests.virt import filestore
from virt import api as virt_api


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    spec = json.loads(sys.argv[1])
    store = filestore.FileStore(spec["root"], spec["pool_id"], spec["sd_id"])
    api = virt_api.API(store, virt_api.Config(accel="tcg"))
    api.start()
    api.vm_create(spec["vm_id"], spec["params"])
    if spec.get("snapshot"):
        api.vm_snapshot(spec["vm_id"], spec["snapshot"])
    print("READY", flush=True)
    time.sleep(600)


if __name__ == "__main__":
    main()
