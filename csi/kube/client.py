"""The few API calls the driver makes, as plain dicts, over the kubernetes client.

The client (the ``k8s`` extra) is imported only here, and only when the
driver runs with --kubernetes-api. Calls block: the agent makes them from its
own threads, never from the event loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from csi.errors import ConfigError

#: Every patch is a JSON merge patch: a null removes a key.
MERGE = "application/merge-patch+json"


class Kube:
    """PersistentVolumes, Nodes and the snapshot API's objects."""

    def __init__(self, source: str) -> None:
        """``source``: "in-cluster" (the pod's service account) or a kubeconfig path."""
        try:
            from kubernetes import client, config, watch
        except ImportError:
            raise ConfigError("--kubernetes-api needs the kubernetes client: pip install 'elv[k8s]'") from None
        try:
            if source == "in-cluster":
                config.load_incluster_config()  # type: ignore[no-untyped-call]
            else:
                config.load_kube_config(config_file=source)  # type: ignore[no-untyped-call]
        except Exception as e:
            raise ConfigError(f"--kubernetes-api {source}: {e}") from None
        self._client = client
        self._watch = watch
        self.api = client.ApiClient()
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    def _dict(self, obj: Any) -> dict[str, Any]:
        return dict(self.api.sanitize_for_serialization(obj))  # type: ignore[no-untyped-call]

    def not_found(self, e: BaseException) -> bool:
        return isinstance(e, self._client.exceptions.ApiException) and e.status == 404

    # -- core

    def list_pvs(self, selector: str = "") -> tuple[list[dict[str, Any]], str]:
        resp = self._dict(self.core.list_persistent_volume(label_selector=selector))
        return list(resp.get("items") or []), str((resp.get("metadata") or {}).get("resourceVersion", ""))

    def get_pv(self, name: str) -> dict[str, Any] | None:
        try:
            return self._dict(self.core.read_persistent_volume(name))
        except Exception as e:
            if self.not_found(e):
                return None
            raise

    def patch_pv(self, name: str, body: dict[str, Any]) -> None:
        self.core.patch_persistent_volume(name, body, _content_type=MERGE)

    def get_node(self, name: str) -> dict[str, Any] | None:
        try:
            return self._dict(self.core.read_node(name))
        except Exception as e:
            if self.not_found(e):
                return None
            raise

    def watch_pvs(self, selector: str, resource_version: str, timeout: int) -> Iterator[tuple[str, dict[str, Any]]]:
        w = self._watch.Watch()  # type: ignore[no-untyped-call]
        for ev in w.stream(  # type: ignore[no-untyped-call]
            self.core.list_persistent_volume,
            label_selector=selector,
            resource_version=resource_version,
            timeout_seconds=timeout,
        ):
            yield str(ev["type"]), self._dict(ev["object"])

    # -- the snapshot API

    def list_custom(self, kind: tuple[str, str, str], selector: str = "") -> tuple[list[dict[str, Any]], str]:
        resp: dict[str, Any] = dict(self.custom.list_cluster_custom_object(*kind, label_selector=selector))  # type: ignore[call-overload]
        return list(resp.get("items") or []), str((resp.get("metadata") or {}).get("resourceVersion", ""))

    def watch_custom(
        self, kind: tuple[str, str, str], selector: str, resource_version: str, timeout: int
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        w = self._watch.Watch()  # type: ignore[no-untyped-call]
        for ev in w.stream(  # type: ignore[no-untyped-call]
            self.custom.list_cluster_custom_object,
            *kind,
            label_selector=selector,
            resource_version=resource_version,
            timeout_seconds=timeout,
        ):
            yield str(ev["type"]), dict(ev["object"])

    def patch_custom(self, kind: tuple[str, str, str], name: str, body: dict[str, Any]) -> None:
        self.custom.patch_cluster_custom_object(*kind, name, body, _content_type=MERGE)

    def create_custom(self, kind: tuple[str, str, str], body: dict[str, Any]) -> bool:
        """Create; False if it exists already."""
        try:
            self.custom.create_cluster_custom_object(*kind, body)
        except Exception as e:
            if isinstance(e, self._client.exceptions.ApiException) and e.status == 409:
                return False
            raise
        return True
