"""Storage: pool, file and block domains, volumes, images, SPM tasks."""
