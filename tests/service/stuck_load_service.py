"""``python -m tests.service.stuck_load_service``: the real ``python -m service`` (uvicorn,
signal handling, registry) whose loader, for models named ``stuck*``, first opens the FIFO named
by ``STUCK_LOAD_FIFO`` in blocking mode: a load stuck in ``open`` the way a read from hung
storage is, until a writer appears. Other models load as :class:`LinearModel`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from service.__main__ import main
from tests.service.numpy_model import LinearModel


def blocking_loader(path: Path, device: str = "cpu", **options) -> LinearModel:
    if Path(path).parent.parent.name.startswith("stuck"):
        with open(os.environ["STUCK_LOAD_FIFO"], "rb") as fifo:  # blocks: nobody writes
            fifo.read()
    return LinearModel(path, device, **options)


if __name__ == "__main__":
    sys.exit(main(loader=blocking_loader))
