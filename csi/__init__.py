"""ELV: Elastic Local Volumes, a CSI driver for node-local storage.

The package is layered; each layer is a package and imports only those below
it (pyproject.toml's import-linter contracts hold that, in ``make lint``):

    cli, __main__   the ``elv`` command line: builds Config, starts the server or a tool
    server/         the gRPC process: socket, interceptor (errors -> codes), log, metrics
    services/       the CSI servicers: validate, call a backend, wrap the result; the gate
    node/           format, mount, bind, unmount: the node work every backend shares
    backend/        the backend contract (base.py), the loop and LVM backends
    host/           the OS: the runner, mounts, loop devices, filesystems, paths
    config          Config, built once at the edge
    model/, errors  the domain every layer shares, and the error tree (import nothing of ours)
    cmd/, bench/    tools that talk to a running driver over CSI only (plus host helpers)
    v1/             generated from proto/ (``make proto``); never edited
"""

__version__ = "0.1.0"
DRIVER_NAME = "elv.csi.dev"
