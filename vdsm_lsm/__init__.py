"""vdsm-lsm: the daemon, its configuration, API schema and client."""
