"""The node side every backend shares: format, mount, bind, unmount.

ops.py (NodeOps) does NodeStage/Unstage/Publish/Unpublish, stats and
expansion on the device a backend attaches; mounts.py turns allow-listed
flags into mount(2) options and says whether a mount is a volume's device.

Imports the backend contract (NodeBackend), host, model and errors; never
the services or the server above it.
"""
