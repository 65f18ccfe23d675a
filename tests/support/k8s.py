"""What the cluster tests share: the run's summary (ci-out/k8s-summary.json)
and the Kubernetes objects they create (a PVC of the loop class, a pod)."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from tests.support.cluster import BUSYBOX, REPO, Api

SUMMARY = os.path.join(REPO, "ci-out", "k8s-summary.json")
#: The loop StorageClass of deploy/overlays/loop (xfs).
SC = "elv-loop"


class Summary:
    """Timings and results, written to ci-out/k8s-summary.json at the end."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.t0 = time.monotonic()

    def write(self) -> None:
        self.data["total_s"] = round(time.monotonic() - self.t0, 2)
        os.makedirs(os.path.dirname(SUMMARY), exist_ok=True)
        with open(SUMMARY, "w") as f:
            json.dump(self.data, f, indent=1, sort_keys=True)
        print(f"\nk8s summary ({SUMMARY}):\n{json.dumps(self.data, indent=1, sort_keys=True)}")


def pvc(name: str, size: str, source: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "storageClassName": SC,
        "resources": {"requests": {"storage": size}},
    }
    if source:
        spec["dataSource"] = {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": source}
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name}, "spec": spec}


def pod(name: str, claim: str) -> dict[str, Any]:
    # Not root: the pod can write only because kubelet applied fsGroup
    # (CSIDriver fsGroupPolicy: File).
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 2000},
            "containers": [
                {
                    "name": "c",
                    "image": BUSYBOX,
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["sleep", "3600"],
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                }
            ],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}],
        },
    }


def phase(api: Api, path: str) -> str:
    o = api.maybe(path)
    return (o or {}).get("status", {}).get("phase", "")
