"""The node side every backend shares: format, mount, bind, unmount.

ops.py (NodeOps) does NodeStage/Unstage/Publish/Unpublish, stats and
expansion on the device a backend attaches; mounts.py turns allow-listed
flags into mount(2) options and says whether a mount is a volume's device;
views.py makes the read-only loop devices a read-only raw block publish
binds. Teardown undoes only the volume's own work: a mount is unmounted only
when it is the volume's device (or a bind of it, or of its view).

Imports the backend contract (NodeBackend), host, model and errors; never
the services or the server above it.
"""
