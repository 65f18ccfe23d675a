"""The CSI gRPC services: they only translate.

Each RPC validates its request (validation.py), calls a typed backend
(csi.backend.base) or the node work (csi.node) under the gate (gate.py: one
operation per volume, retries join it), and wraps the result (convert.py).

Imports backend, node, config, model and errors; never host (import-linter
holds that: what touches the OS is below, in node and the backends) and
never the server.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from csi.v1.csi_pb2_grpc import _ServicerContext as Context
else:
    Context = Any

__all__ = ["Context"]
