# vdsm-lsm: see README.md.  Every target sets the host up first (idempotent).
PYTHON := .venv/bin/python
GUEST_DIR ?= /var/cache/vdsm-lsm/guest

.PHONY: setup check test lint typecheck demo bench soak slow docs guest clean

setup:
	contrib/setup-host

guest: setup
	contrib/guest/build --out $(GUEST_DIR)

lint: setup
	.venv/bin/ruff check .

typecheck:
	.venv/bin/mypy common rpc storage vdsm_lsm virt

# The whole test suite against real libvirtd, QEMU, lvm2 and qemu-img.
# contrib/run-checks starts (and afterwards stops) the services itself.
check:
	VDSM_LSM_SKIP_SERVICES=1 contrib/setup-host
	contrib/guest/build --out $(GUEST_DIR)
	contrib/run-checks

test: check

# A real live storage migration of a running test VM on local storage.
demo: setup guest
	contrib/demo

bench: setup guest
	contrib/bench/run

# The tests that wait out fixed timeouts of real components (marked slow),
# which make check skips: e.g. sanlock's 8 * io_timeout + 60 s host expiry.
slow: setup guest
	VDSM_LSM_SLOW=1 contrib/run-checks -m slow

# N live storage migrations with random faults (SOAK_N, default 100); not in check.
soak: setup guest
	contrib/soak

docs: setup
	$(PYTHON) -m vdsm_lsm.docs -o docs/api.md

clean:
	rm -rf build *.egg-info .pytest_cache .ruff_cache .mypy_cache
