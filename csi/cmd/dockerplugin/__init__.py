"""``elv docker-plugin``: Docker's volume plugin protocol (v1) over the
driver's CSI socket, for Docker and Podman.

Like every tool in csi.cmd it is a CSI client of a running driver, never a
second way into the storage: ``docker volume create -d elv`` is a
CreateVolume, ``docker run -v`` a NodeStage and NodePublish beneath the
driver's kubelet directory, so the driver knows each volume is in use.

- wire: HTTP/1.1 with JSON bodies on a unix socket (the protocol);
- options: ``--opt`` values checked into a creation plan;
- state: the plugin's directory per volume, and one reference per mount ID;
- volumes: the protocol's calls, translated into CSI;
- main: the command line, the socket, and Podman's containers.conf entry.
"""
