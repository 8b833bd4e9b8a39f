"""Running test worker processes: torch.distributed worlds on a free loopback port."""
from __future__ import annotations

import socket


def spawn_on_free_port(worker, nprocs: int, *args) -> None:
    """``torch.multiprocessing.spawn(worker, args=(nprocs, port, *args), nprocs=nprocs)`` on a free
    port of 127.0.0.1. The port found free is released before rank 0 binds it, so another process
    can take it meanwhile (seen about once in ten full runs on a shared 2-core machine): one retry
    on a fresh port; a second failure is raised."""
    import torch.multiprocessing as mp

    for attempt in range(2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        try:
            mp.spawn(worker, args=(nprocs, port, *args), nprocs=nprocs, join=True)
            return
        except (mp.ProcessRaisedException, mp.ProcessExitedException):
            if attempt:
                raise
