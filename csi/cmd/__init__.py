"""Tools that drive a running ELV over its CSI socket, as the Kubernetes
sidecars do: ``elv volume``, ``attach``/``detach``, ``doctor`` and ``demo``,
the ``kubectl elv`` plugin, and the CSI client they share.

They talk to the driver only over CSI: never import services, backend,
server or node (import-linter holds that). Host helpers are allowed (the
namespace mount of ``elv attach``, the mount table for leftovers).
"""
