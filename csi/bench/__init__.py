"""elv bench: performance measurements (see csi.bench.main)."""
