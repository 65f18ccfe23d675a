"""The host: thin wrappers of the OS, and the one runner of external commands.

mountinfo (the mount table), paths (guarded paths beneath the kubelet dir,
mount(2) on descriptors), syscalls, loop and loopctl (loop devices), fs
(blkid, mkfs, grow, freeze), nsmount (mounting into another process's
namespace), procs (processes by pid and start time), runner (every external
command), scratch (the directories of demo, bench and tests).

Imports nothing of the layers above it (today only csi.errors): never a backend, the node
work, the services, the server or a tool.
"""
