"""``elv bench``: performance measurements over the driver's socket (see main.py).

Like csi.cmd, it talks to a driver only over CSI (it imports csi.cmd's
client, csi.host's scratch directories and csi.model, nothing of the driver).
"""
