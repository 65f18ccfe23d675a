"""The CSI gRPC services. They validate, call the backend, and wrap results."""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from csi.v1.csi_pb2_grpc import _ServicerContext as Context
else:
    Context = Any

__all__ = ["Context"]
