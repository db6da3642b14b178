"""The fault matrix of issue 13 (real daemon, libvirtd, lvm2 on loop devices, a writing guest)."""

import pytest

# site.py's checks (assert_clean) report what they compared, as a test's own asserts do.
pytest.register_assert_rewrite("tests.faults.site")
