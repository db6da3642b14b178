"""vdsm-lsm: live storage migration host agent in the style of oVirt VDSM."""

import setuptools

setuptools.setup(
    name="vdsm-lsm",
    version="0.1.0",
    description="Host agent that moves the disks of running VMs between storage domains",
    packages=["vdsm_lsm", "storage", "virt", "rpc", "common"],
    package_data={"vdsm_lsm": ["api.yml"]},
    python_requires=">=3.11",
    install_requires=[
        "h11>=0.14",
        "PyYAML",
        "pyudev",
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout", "ruff", "mypy==2.4.1", "stomp.py>=8"],
    },
    entry_points={
        "console_scripts": [
            "vdsm-lsm = vdsm_lsm.daemon:main",
            "vdsm-lsm-client = vdsm_lsm.cli:main",
        ],
    },
)
