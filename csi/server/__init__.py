"""The gRPC process: the layer on top of the driver.

driver.py builds it (runner, backend, servicers by mode, the socket) and
stops it (SIGTERM: finish operations, stop background work, reap commands);
interceptor.py is the one place errors become gRPC codes and each RPC gets
its log line; log.py formats logs and redacts secrets; metrics.py serves
Prometheus metrics.

May import every layer below it: services, node, backend, host, config,
model, errors.
"""
