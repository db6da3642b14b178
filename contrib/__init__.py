"""Host set-up, the test guest, benchmarks and demos (not installed)."""
