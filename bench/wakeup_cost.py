"""What a small loopback TCP send costs the sender when the reader is busy, and when it sleeps.

A reader process on core 1 waits in ``epoll_wait`` for each message; the
sender, on core 0, sends 250 bytes back to back (the reader is then mostly
awake), then with a pause between sends (the reader is asleep at each one).
The difference is what waking the other side costs the sender's CPU, which
is what a server pays per frame when its clients are idle. A pause alone
(``time.sleep``) is measured too: what being woken costs a process.

    python -m bench.wakeup_cost
"""

from __future__ import annotations

import os
import select
import socket
import time


def main() -> int:
    server = socket.create_server(("127.0.0.1", 0))
    pid = os.fork()
    if pid == 0:
        os.sched_setaffinity(0, {1})
        conn, _ = server.accept()
        poller = select.epoll()
        poller.register(conn.fileno(), select.EPOLLIN)
        while True:
            poller.poll()
            if not conn.recv(65536):
                os._exit(0)
    os.sched_setaffinity(0, {0})
    sender = socket.create_connection(server.getsockname())
    sender.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    message = b"x" * 250
    n = 3000
    start = time.thread_time()
    for _ in range(n):
        time.sleep(0.0005)
    sleep_only = (time.thread_time() - start) / n
    print(f"a 0.5 ms sleep alone: {sleep_only * 1e6:.1f} us of CPU")
    for pause, count in ((0.0, 20000), (0.0005, n)):
        start = time.thread_time()
        for _ in range(count):
            sender.send(message)
            if pause:
                time.sleep(pause)
        spent = (time.thread_time() - start) / count - (sleep_only if pause else 0.0)
        state = "asleep (a pause before each send)" if pause else "busy (back to back)"
        print(f"send of 250 bytes, reader {state}: {spent * 1e6:.1f} us of the sender's CPU")
    sender.close()
    os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
