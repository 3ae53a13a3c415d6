"""Sampling across processes: `accelerate launch -m medgen sample|release ...` shards the sample
indices over the processes accelerate started (one or many machines, accelerate's own config).

- Every index 0..n-1 is sampled exactly once: each process takes a contiguous block of whole
  batches (`shard_range`), so every batch is the batch one process would sample and sample i
  keeps seed `seed + i`: 1 and P processes write identical files.
- Every process writes its own samples into one temp folder beside `--out` (named by the main
  process); the main process writes the manifest and renames the folder when every file is in.
  Several machines need `--out` on a filesystem they all see.

Without a launcher (or with one process) `ProcessGroup.current()` is the single process and
nothing here touches torch.distributed.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from medgen.io import atomic_dir

# what launchers set for the number of processes (torchrun; MPI flavours, as accelerate reads them)
WORLD_SIZE_VARS = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def shard_range(n: int, batch_size: int, num_processes: int, index: int) -> range:
    """Process `index`'s contiguous block of sample indices 0..n-1, cut at batch boundaries (whole
    batches split as evenly as the batch count allows; a process may get none)."""
    if not 0 <= index < num_processes:
        raise ValueError(f"process index {index} not in [0, {num_processes})")
    n_batches = math.ceil(n / batch_size)
    per, extra = divmod(n_batches, num_processes)
    first = index * per + min(index, extra)
    count = per + (1 if index < extra else 0)
    return range(min(n, first * batch_size), min(n, (first + count) * batch_size))


def launched() -> bool:
    """Whether a launcher started several processes (accelerate launch / torchrun / mpirun)."""
    return any(int(os.environ.get(v, "1") or 1) > 1 for v in WORLD_SIZE_VARS)


class ProcessGroup:
    """The processes that sample together; one process unless launched with several.

    Wraps accelerate's `PartialState` (gloo on CPU, NCCL on GPUs) for the four collective steps
    sampling needs: shard, broadcast, gather and a shared atomic output folder.
    """

    def __init__(self, state: Any = None):
        self.state = state  # accelerate.PartialState, or None for a single process

    @classmethod
    def current(cls, device: str | torch.device | None = None) -> "ProcessGroup":
        if not launched():
            return cls()
        from accelerate import PartialState

        cpu = (device is not None and torch.device(device).type == "cpu") or not torch.cuda.is_available()
        return cls(PartialState(cpu=cpu))

    @property
    def num_processes(self) -> int:
        return 1 if self.state is None else self.state.num_processes

    @property
    def index(self) -> int:
        return 0 if self.state is None else self.state.process_index

    @property
    def is_main(self) -> bool:
        return self.index == 0

    @property
    def device(self) -> torch.device | None:
        """This process's device under a launcher (its own GPU), else None (the caller's choice)."""
        if self.state is None:
            return None
        device = self.state.device
        return torch.device("cpu") if device.type == "cpu" else device  # accelerate may say cpu:0, which safetensors refuses

    def shard(self, n: int, batch_size: int) -> range:
        return shard_range(n, batch_size, self.num_processes, self.index)

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def broadcast(self, obj: Any) -> Any:
        """The main process's `obj`, on every process."""
        if self.state is None:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj], from_process=0)[0]

    def gather(self, items: Sequence[Any]) -> list[Any]:
        """Every process's `items`, concatenated in process order, on every process."""
        if self.state is None:
            return list(items)
        from accelerate.utils import gather_object

        return list(gather_object(list(items)))

    @contextlib.contextmanager
    def atomic_dir(self, path: str | os.PathLike, overwrite: bool = False, what: str = "output folder") -> Iterator[Path]:
        """`medgen.io.atomic_dir` shared by the processes: the main process makes the temp folder
        and renames it to `path` once every process left the block; the others write into it."""
        if self.state is None:
            with atomic_dir(path, overwrite, what) as tmp:
                yield tmp
            return
        if self.is_main:
            with atomic_dir(path, overwrite, what) as tmp:
                self.broadcast(str(tmp))
                yield tmp
                self.barrier()  # every process's files are in
        else:
            tmp = Path(self.broadcast(None))
            yield tmp
            self.barrier()
        self.barrier()  # the folder is in place before any process goes on
