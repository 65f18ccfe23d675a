"""What the driver does through the Kubernetes API, when it runs in a cluster
(``elv serve --kubernetes-api in-cluster``, as the DaemonSet does).

ELV volumes are local, so every node runs its own driver, and each sidecar
acts for its own node; two upstream pieces do not, and this package fills in
for them:

* **ControllerModifyVolume** (VolumeAttributesClass) comes from csi-resizer,
  which runs on every node but acts only where it holds the leader lease: its
  local driver gets the calls for every node's volumes. A driver that does not
  hold the volume hands the request to the driver of the node that does,
  through the volume's PersistentVolume (modify.py), and answers with that
  driver's result.
* **Group snapshots** with distributed snapshotting (csi-snapshotter
  --node-deployment): snapshot-controller v8.6.0 labels a VolumeSnapshotContent
  with the node that must act on it (``snapshot.storage.kubernetes.io/managed-by``),
  but not a VolumeGroupSnapshotContent nor the member contents it makes, and
  each node's csi-snapshotter only sees classes and contents with its own
  label. Each driver labels the unlabelled contents whose volumes it holds,
  and keeps a VolumeGroupSnapshotClass of its own node (groups.py).

protocol.py is pure (the objects and their rules, tested without a cluster);
client.py wraps the kubernetes client, imported only here and only when the
option is on; agent.py runs the watches in threads beside the gRPC server.
Imports config, model and errors; never the services, the backends or the host.
"""
