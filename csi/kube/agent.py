"""The driver's work through the Kubernetes API (see the package's docstring).

The sending side is a coroutine (:meth:`KubeAgent.modify`, called by the
Controller service for a volume it does not hold). The receiving side and the
labelling of snapshot contents are watches, each in a thread of its own: the
kubernetes client blocks. They reach the driver's own services through
callbacks run on its event loop, so a forwarded change goes through the same
validation and per-volume gate as a local one.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, Protocol

from csi.errors import ElvError, FailedPrecondition, NotFound, Unavailable
from csi.kube import protocol as p

log = logging.getLogger(__name__)

Kind = tuple[str, str, str]
SNAPSHOT: Kind = ("snapshot.storage.k8s.io", "v1", "volumesnapshotcontents")
GROUP: Kind = ("groupsnapshot.storage.k8s.io", "v1", "volumegroupsnapshotcontents")
GROUP_CLASS: Kind = ("groupsnapshot.storage.k8s.io", "v1", "volumegroupsnapshotclasses")
#: Server-side filter for the contents no node has claimed yet.
UNLABELLED = f"!{p.MANAGED_BY}"


class KubeApi(Protocol):
    """What the agent needs of the API (csi.kube.client.Kube; a fake in tests)."""

    def list_pvs(self, selector: str = "") -> tuple[list[dict[str, Any]], str]: ...
    def get_pv(self, name: str) -> dict[str, Any] | None: ...
    def patch_pv(self, name: str, body: dict[str, Any]) -> None: ...
    def get_node(self, name: str) -> dict[str, Any] | None: ...
    def watch_pvs(self, selector: str, resource_version: str, timeout: int) -> Iterator[tuple[str, dict[str, Any]]]: ...
    def list_custom(self, kind: Kind, selector: str = "") -> tuple[list[dict[str, Any]], str]: ...
    def watch_custom(
        self, kind: Kind, selector: str, resource_version: str, timeout: int
    ) -> Iterator[tuple[str, dict[str, Any]]]: ...
    def patch_custom(self, kind: Kind, name: str, body: dict[str, Any]) -> None: ...
    def create_custom(self, kind: Kind, body: dict[str, Any]) -> bool: ...


#: Apply mutable parameters to a volume of this node (the Controller service's own path).
Apply = Callable[[str, dict[str, str]], Awaitable[None]]
#: Whether this node holds an object: ("volume" | "snapshot" | "group", ID).
Owns = Callable[[str, str], Awaitable[bool]]


class KubeAgent:
    def __init__(
        self, kube: KubeApi, node: str, driver: str, *, timeout: float = 90.0, poll: float = 0.25, watch: int = 60
    ) -> None:
        self.kube = kube
        self.node = node
        self.driver = driver
        self.timeout = timeout
        self.poll = poll
        self.watch_seconds = watch
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._apply: Apply | None = None
        self._owns: Owns | None = None
        self._busy: set[str] = set()
        self.class_ready = threading.Event()

    # -- sending: a change for a volume of another node

    async def modify(self, volume_id: str, parameters: Mapping[str, str]) -> None:
        """Have the driver of the node that holds ``volume_id`` apply ``parameters``;
        its answer is ours (an ElvError of its code, or None)."""
        await asyncio.to_thread(self.forward, volume_id, dict(parameters))

    def forward(self, volume_id: str, parameters: dict[str, str]) -> None:
        pv = self._find_pv(volume_id)
        owner = p.pv_owner(pv, self.driver)
        if not owner or owner == self.node:
            raise NotFound(f"volume {volume_id} does not exist on this node, and no other node holds it")
        if self.kube.get_node(owner) is None:
            raise FailedPrecondition(
                f"volume {volume_id} lives on node {owner}, which has left the cluster: it cannot be changed "
                f"(kubectl elv forget-node {owner} frees its claim)"
            )
        req = p.ModifyRequest(uuid.uuid4().hex, volume_id, parameters, self.node)
        name = str(pv["metadata"]["name"])
        self.kube.patch_pv(name, p.request_patch(req, owner))
        log.info("handed a modify request to node %s", owner, extra={"fields": {"volume": volume_id, "pv": name}})
        result = self._wait_result(name, req, owner)
        if result.code != "OK":
            raise p.error_for(result.code, f"on node {owner}: {result.message}")

    def _find_pv(self, volume_id: str) -> dict[str, Any]:
        pvs, _ = self.kube.list_pvs()
        for pv in pvs:
            if p.pv_handle(pv, self.driver) == volume_id:
                return pv
        raise NotFound(f"volume {volume_id} does not exist")

    def _wait_result(self, name: str, req: p.ModifyRequest, owner: str) -> p.ModifyResult:
        deadline = time.monotonic() + self.timeout
        while True:
            pv = self.kube.get_pv(name)
            if pv is None:
                raise NotFound(f"volume {req.volume_id}: its PersistentVolume {name} was deleted")
            ann = p.annotations_of(pv)
            result = p.ModifyResult.parse(ann.get(p.RESULT))
            if result is not None and result.id == req.id:
                mine = p.ModifyRequest.parse(ann[p.REQUEST]).id == req.id if ann.get(p.REQUEST) else False
                if mine:
                    self.kube.patch_pv(name, p.clear_patch())
                return result
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"the driver on node {owner} did not answer within {self.timeout:g} s; the change will be retried"
                )
            time.sleep(self.poll)

    # -- receiving, and the snapshot contents

    def start(self, loop: asyncio.AbstractEventLoop, apply: Apply, owns: Owns) -> None:
        self._loop, self._apply, self._owns = loop, apply, owns
        selector = f"{p.NODE_LABEL}={p.label_value(self.node)}"
        jobs: list[tuple[str, Callable[[], None]]] = [
            ("elv-kube-modify", lambda: self._watch_pvs(selector)),
            ("elv-kube-groups", lambda: self._watch_contents(GROUP, with_class=True)),
            ("elv-kube-snapshots", lambda: self._watch_contents(SNAPSHOT)),
        ]
        for name, fn in jobs:
            t = threading.Thread(target=fn, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        """Ends the watches at their next event or timeout; nothing waits for them."""
        self._stop.set()

    def _run(self, coro: Awaitable[Any]) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()  # type: ignore[arg-type]

    def _forever(self, what: str, once: Callable[[], None]) -> None:
        while not self._stop.is_set():
            try:
                once()
            except Exception as e:  # the API away, a watch expired: list again
                log.warning("watching %s: %s", what, str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
                self._stop.wait(2)

    def _watch_pvs(self, selector: str) -> None:
        def once() -> None:
            items, rv = self.kube.list_pvs(selector)
            for pv in items:
                self._safely(self.handle_pv, pv)
            for kind, pv in self.kube.watch_pvs(selector, rv, self.watch_seconds):
                if self._stop.is_set():
                    return
                if kind in ("ADDED", "MODIFIED"):
                    self._safely(self.handle_pv, pv)

        self._forever("PersistentVolumes", once)

    def _watch_contents(self, kind: Kind, with_class: bool = False) -> None:
        def once() -> None:
            if with_class and not self.class_ready.is_set():
                self.ensure_group_class()
            items, rv = self.kube.list_custom(kind, UNLABELLED)
            for c in items:
                self._safely(self.handle_content, kind, c)
            for ev, c in self.kube.watch_custom(kind, UNLABELLED, rv, self.watch_seconds):
                if self._stop.is_set():
                    return
                if ev in ("ADDED", "MODIFIED"):
                    self._safely(self.handle_content, kind, c)

        self._forever(kind[2], once)

    @staticmethod
    def _safely(fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("handling a %s event", fn.__name__.removeprefix("handle_"))

    def handle_pv(self, pv: dict[str, Any]) -> None:
        """Apply a modify request meant for this node, once, and answer it."""
        name = str(pv["metadata"]["name"])
        req, why = p.pending_request(pv, self.driver)
        if req is None:
            if why.startswith("invalid:"):
                log.warning("ignored a modify request on %s: %s", name, why)
            return
        if req.id in self._busy:
            return
        self._busy.add(req.id)
        try:
            result = self._apply_request(pv, req)
            self.kube.patch_pv(name, p.result_patch(result))
        finally:
            self._busy.discard(req.id)

    def _apply_request(self, pv: dict[str, Any], req: p.ModifyRequest) -> p.ModifyResult:
        if p.pv_owner(pv, self.driver) != self.node:
            return p.ModifyResult(req.id, "INVALID_ARGUMENT", f"PersistentVolume is not pinned to node {self.node}")
        assert self._apply is not None
        try:
            self._run(self._apply(req.volume_id, req.parameters))
        except ElvError as e:
            return p.ModifyResult(req.id, p.code_name(e), e.message)
        except Exception as e:
            log.exception("applying a modify request for %s", req.volume_id)
            return p.ModifyResult(req.id, "INTERNAL", type(e).__name__)
        log.info("applied a modify request from node %s", req.sender, extra={"fields": {"volume": req.volume_id}})
        return p.ModifyResult(req.id, "OK")

    def handle_content(self, kind: Kind, content: dict[str, Any]) -> None:
        """Claim a snapshot content for this node's csi-snapshotter when every
        volume or snapshot it is made of is here."""
        if not p.needs_label(content):
            return
        handles = p.content_handles(content, self.driver)
        if not handles:
            return
        assert self._owns is not None
        mine = [self._run(self._owns(k, h)) for k, h in handles]
        name = str(content["metadata"]["name"])
        if all(mine):
            self.kube.patch_custom(kind, name, p.label_patch(self.node))
            log.info("claimed %s %s for this node", kind[2], name)
        elif any(mine):
            log.warning("%s %s spans several nodes: no node can take it", kind[2], name)

    def ensure_group_class(self) -> None:
        """This node's VolumeGroupSnapshotClass (see protocol.group_class)."""
        node = self.kube.get_node(self.node)
        if node is None:
            raise Unavailable(f"node {self.node} is not registered yet")
        body = p.group_class(self.node, str(node["metadata"]["uid"]), self.driver)
        if self.kube.create_custom(GROUP_CLASS, body):
            log.info("created VolumeGroupSnapshotClass %s", body["metadata"]["name"])
        self.class_ready.set()
