"""Peak tensor memory of a training step, measured on any device (a CPU will do).

Will a 128^3 VQ-GAN step fit a 24 GB card? `TensorMemory` answers without the card: it is a
`TorchDispatchMode`, so it sees every tensor that an operator creates (the forward, autograd's
backward, the optimizer step) and keeps the running total of live storages, each counted once
however many views point at it, dropped when its last reference goes. Tensors that exist before
the mode is entered (parameters, the input batch) are registered with `track(...)`.

What the number is and is not:
- It is the high-water mark of live tensor bytes, the quantity that
  `torch.cuda.max_memory_allocated` reports, for the same dtypes. Under autocast the CPU and
  CUDA cast lists differ in a few ops (CUDA runs `group_norm`, `layer_norm`, losses and
  softmax in fp32); medgen's networks call their norms with autocast off, so their activations
  have the same dtypes on both devices.
- It excludes what only a GPU allocates: cuDNN/cuBLAS workspaces, the caching allocator's
  rounding and fragmentation, and the CUDA context (~0.5 GB). `eval/estimate_memory.py` measures
  the gap once against an H200 run of the same step and reports both.

Written here because PyTorch's own trackers do not fit the job: `torch.cuda.memory` needs the
GPU, and `torch.distributed._tools.mem_tracker.MemTracker` refuses modules called more than once
per step (the discriminators are called on fake and real volumes) and its FakeTensor mode stops
at data-dependent ops (the quantizer's `bincount`).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorMemory(TorchDispatchMode):
    """Live and peak bytes of tensor storages created while the mode is active.

        with TensorMemory() as mem:
            mem.track(model, batch)      # already-allocated tensors
            step()
        mem.peak_bytes, mem.current_bytes
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[tuple[str, int], tuple[int, Any]] = {}
        self.current_bytes = 0
        self.peak_bytes = 0

    # ---- bookkeeping -------------------------------------------------------------------------
    def _add(self, tensor: torch.Tensor) -> None:
        if tensor.is_meta or not hasattr(tensor, "untyped_storage"):
            return
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # e.g. sparse or wrapper subclasses
            return
        nbytes = storage.nbytes()
        ptr = storage.data_ptr()
        if nbytes == 0 or ptr == 0:
            return
        key = (str(storage.device), ptr)
        if key in self._live:
            return
        self._live[key] = (nbytes, weakref.ref(storage, self._release_callback(key)))
        self.current_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)

    def _release_callback(self, key: tuple[str, int]) -> Callable[[Any], None]:
        def release(_ref) -> None:
            entry = self._live.get(key)
            if entry is not None and entry[1] is _ref:
                del self._live[key]
                self.current_bytes -= entry[0]
        return release

    def track(self, *objects: torch.Tensor | torch.nn.Module | torch.optim.Optimizer | Iterable) -> None:
        """Count tensors that were allocated before the mode started (parameters, buffers,
        gradients, optimizer state, inputs). Modules, optimizers and nested containers are walked."""
        for obj in objects:
            if isinstance(obj, torch.nn.Module):
                for t in [*obj.parameters(), *obj.buffers()]:
                    self._add(t)
                    if t.grad is not None:
                        self._add(t.grad)
            elif isinstance(obj, torch.optim.Optimizer):
                for state in obj.state.values():
                    self.track(*[v for v in state.values() if isinstance(v, torch.Tensor)])
            elif isinstance(obj, torch.Tensor):
                self._add(obj)
            elif isinstance(obj, dict):
                self.track(*obj.values())
            elif isinstance(obj, (list, tuple, set)):
                self.track(*obj)

    def reset_peak(self) -> None:
        self.peak_bytes = self.current_bytes

    # ---- dispatch ---------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._add(leaf)
        return out


def measure_steps(step: Callable[[], Any], modules: Iterable[torch.nn.Module], inputs: Iterable = (),
                  state: Iterable = (), steps: int = 2) -> dict[str, float]:
    """Peak tensor memory over `steps` calls of `step` (a training step that keeps no references).

    `modules` are the networks (their parameters and buffers are `parameters_gib`), `inputs` the
    batch tensors, `state` other tensors that exist beforehand (e.g. an EMA copy). Two steps by
    default: the second holds the optimizer state the first created. `persistent_gib` is what
    stays between steps: weights, optimizer and EMA state, inputs excluded.
    """
    gib = 2**30
    inputs = [t for t in inputs if t is not None]
    input_bytes = sum(t.untyped_storage().nbytes() for t in inputs)
    with TensorMemory() as mem:
        mem.track(*modules)
        param_bytes = mem.current_bytes
        mem.track(*state, *inputs)
        for _ in range(steps):
            step()
    return {"peak_gib": mem.peak_bytes / gib, "parameters_gib": param_bytes / gib,
            "persistent_gib": (mem.current_bytes - input_bytes) / gib}
