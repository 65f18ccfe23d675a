"""ELV: Elastic Local Volumes, a CSI driver for node-local storage."""

__version__ = "0.1.0"
DRIVER_NAME = "elv.csi.dev"
