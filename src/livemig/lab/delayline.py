"""A user-space delay line between two interfaces, for kernels without sch_netem.

Run as a script inside a "wire" namespace that holds one end of each of two veth
pairs: ``python delayline.py IFACE_A IFACE_B DELAY_MS``. Every frame that arrives
on one interface is sent out of the other ``DELAY_MS`` later, in order, so the two
hosts see a real one-way delay on their own network stacks. New delays are read
from stdin, one number (ms) per line; EOF on stdin ends the process.

Theory of operation
-------------------
* AF_PACKET sockets (packet(7)) bound to each interface with ``ETH_P_ALL`` see
  every frame; ``PACKET_IGNORE_OUTGOING`` (Linux 4.20) hides the frames we
  ourselves transmit, which would otherwise loop back into the line.
* ``PACKET_VNET_HDR`` prefixes each frame with a ``virtio_net_hdr`` describing
  its GSO type/size and partial checksum. veth hands 64 KiB TCP superpackets
  around; with the header we receive and re-send them whole (the kernel
  re-creates the GSO skb, see ``virtio_net_hdr_to_skb``), so a few hundred
  system calls per second carry hundreds of Mbit/s. Without it the kernel would
  have to segment, or the superpackets would exceed the MTU on send.
* The delay is constant per direction, so a FIFO per direction is already in
  due-time order; the loop sleeps in ``poll(2)`` until the next frame is due or
  a frame arrives. Frames are dropped (as a full router queue would) when a
  direction holds more than ``QUEUE_MAX_BYTES``.
* Frames are released at ``arrival + delay``; a delay change applies to frames
  arriving afterwards (those already queued keep their due time), so ordering
  holds when the delay grows; when it shrinks, later frames wait behind earlier
  ones (FIFO), never overtaking them.

This file imports nothing from livemig: it is started as a plain script by
``ip netns exec``.
"""
from __future__ import annotations

import collections
import os
import select
import socket
import sys
import time

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_IGNORE_OUTGOING = 23
FRAME_MAX_BYTES = 10 + (256 << 10)  # virtio_net_hdr + the largest GSO frame
QUEUE_MAX_BYTES = 64 << 20


def open_port(ifname: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    sock.bind((ifname, ETH_P_ALL))
    sock.setblocking(False)
    return sock


def serve(if_a: str, if_b: str, delay_ms: float) -> None:
    ports = (open_port(if_a), open_port(if_b))
    # queues[i]: frames received on ports[i], to be sent on ports[1 - i]
    queues = (collections.deque(), collections.deque())
    queued_bytes = [0, 0]
    delay_s = delay_ms / 1000.0
    poller = select.poll()
    fd_index = {}
    for i, sock in enumerate(ports):
        poller.register(sock.fileno(), select.POLLIN)
        fd_index[sock.fileno()] = i
    stdin_fd = sys.stdin.fileno()
    poller.register(stdin_fd, select.POLLIN)
    stdin_buf = b""
    print("ready", flush=True)
    while True:
        now = time.monotonic()
        for i, q in enumerate(queues):
            out = ports[1 - i]
            while q and q[0][0] <= now:
                _, frame = q.popleft()
                queued_bytes[i] -= len(frame)
                try:
                    out.send(frame)
                except (BlockingIOError, OSError):
                    pass  # a full device queue drops, like a router would
        due = [q[0][0] for q in queues if q]
        timeout_ms = max(0, int((min(due) - time.monotonic()) * 1000) + 1) if due else -1
        for fd, _ in poller.poll(timeout_ms):
            if fd == stdin_fd:
                chunk = os.read(stdin_fd, 4096)
                if not chunk:
                    return
                stdin_buf += chunk
                while b"\n" in stdin_buf:
                    line, stdin_buf = stdin_buf.split(b"\n", 1)
                    delay_s = float(line) / 1000.0
                continue
            i = fd_index[fd]
            sock = ports[i]
            arrived = time.monotonic()
            while True:
                try:
                    frame = sock.recv(FRAME_MAX_BYTES)
                except BlockingIOError:
                    break
                if queued_bytes[i] + len(frame) > QUEUE_MAX_BYTES:
                    continue
                queues[i].append((arrived + delay_s, frame))
                queued_bytes[i] += len(frame)


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2], float(sys.argv[3]))
