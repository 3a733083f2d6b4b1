"""The ``jaxmerge`` command line: ``jaxmerge merge CONFIG.yaml OUTPUT_DIR`` and ``jaxmerge inspect PATH``."""
