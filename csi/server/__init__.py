"""The gRPC server: the process, its socket, the interceptor, logging and metrics."""
