"""What more than one test folder uses. Test modules import helpers from here
(and fixtures from their conftest), never from one another.

    paths.py      REPO, DATA: the checkout and tests/data
    rpc.py        CSI capabilities, and the gRPC code a call fails with (code_of, expect)
    driver.py     a real ``elv serve`` on the loop backend in a scratch directory, leftovers
    forked.py     restarting a driver by forking a pre-imported interpreter
    fixtures.py   the root check and the base/driver fixtures of the root layers
    markers.py    marking one folder's tests (each conftest marks only its own)
    crash.py      the crash world: kill anywhere, restart, retry until it converges
    fuzz.py       every RPC fuzzed from its descriptor
    machine.py    the driver state machine (hypothesis.stateful)
    sanity.py     running csi-sanity and reading its report
    lvm.py        the in-guest VG, ``elv serve --backend lvm``, the owner filter (ours)
    observe.py    what a test sees of the host, read from /proc and /sys directly (leak checks)
    fakes.py      recording fakes: FakeBackend, FakeNodeOps, FakeViews, and the one FakeRunner
    fake_mounts.py  a mount table in memory, for node work without root
    fake_lvm.py   an in-memory LVM that answers through FakeRunner
    cluster.py    the one-node Kubernetes cluster of host processes
    k8s.py        its summary, and the objects the cluster tests create
"""
