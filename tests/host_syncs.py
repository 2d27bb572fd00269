"""Counts the operations that block the host on a GPU, on any device (so a CPU test catches a new one).

A host sync is an op whose result the host must read before it can go on: `.item()`, `bool(t)` / `if t:`,
`int(t)`, `float(t)` (all `aten._local_scalar_dense`), the ops whose output size depends on the data
(`nonzero`, boolean-mask indexing, `masked_select`, `unique`, `repeat_interleave` without output_size,
`bincount`), `torch.equal`, copies to the host (`.cpu()`, `.numpy()`, `.tolist()`) and blocking copies from
it (`torch.tensor(values, device=...)`: a pageable copy that waits for the GPU; build on the CPU and move
with `.to(device, non_blocking=True)`). `HostSyncs` sees the aten ops through a TorchDispatchMode (whatever
Python or library code issues them) and the copies through patched torch functions and Tensor methods;
`calls` lists (name, count) for the report of a failing test.
"""
from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim",
            "unique_consecutive", "bincount", "equal", "is_nonzero", "argwhere", "histc"}
HOST_COPIES = ("cpu", "numpy", "tolist")
ROOT = str(Path(__file__).resolve().parents[1])


# (file, function) whose scalar reads are of tensors that stay on the host on a GPU too: an optimizer's step
# counters are CPU tensors unless it is capturable or fused (torch.optim's `_get_value`)
HOST_SIDE = {("torch/optim/optimizer.py", "_get_value")}


def host_side() -> bool:
    return any((f.filename.split("site-packages/")[-1], f.name) in HOST_SIDE for f in traceback.extract_stack())


def caller() -> str:
    """file:line of the innermost frame of this repository's code (not torch's, Lightning's or this file's)."""
    for frame in reversed(traceback.extract_stack()):
        if frame.filename.startswith(ROOT) and not frame.filename.endswith("host_syncs.py") \
                and "site-packages" not in frame.filename:
            return f"{Path(frame.filename).relative_to(ROOT)}:{frame.lineno}"
    outside = [f for f in traceback.extract_stack() if not f.filename.endswith(("host_syncs.py", "_python_dispatch.py"))]
    return f"{outside[-1].filename.split('site-packages/')[-1]}:{outside[-1].lineno}" if outside else "?"


def is_sync(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether the aten op `name` (e.g. "index.Tensor") with these arguments blocks the host on a GPU."""
    base, _, overload = name.partition(".")
    if base in SYNC_OPS:
        return True
    if base == "repeat_interleave" and overload == "Tensor":
        return kwargs.get("output_size") is None and (len(args) < 2 or args[1] is None)
    if base in ("index", "index_put", "index_put_", "_index_put_impl_"):  # a boolean mask among the indices
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(torch.is_tensor(i) and i.dtype == torch.bool for i in indices or ())
    return False


class HostSyncs(TorchDispatchMode):
    """`with HostSyncs() as syncs: ...` then `syncs.calls` ({op name: count}); or `start()` / `stop()` to
    count across hooks (a training step spans several)."""

    def __init__(self):
        super().__init__()
        self.calls: Counter = Counter()
        self.where: Counter = Counter()  # (op, file:line) -> count, for the message of a failing test
        self._originals: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name().split("::")[-1]  # e.g. "index.Tensor"
        if is_sync(name, args, kwargs) and not host_side():
            self.calls[name] += 1
            self.where[name, caller()] += 1
        return func(*args, **kwargs)

    def _patch(self) -> None:
        for method in HOST_COPIES:
            original = getattr(torch.Tensor, method)
            self._originals[method] = original

            def counted(tensor, *a, _original=original, _method=method, **k):
                self.calls[f"Tensor.{_method}"] += 1
                self.where[f"Tensor.{_method}", caller()] += 1
                return _original(tensor, *a, **k)

            setattr(torch.Tensor, method, counted)

        for function in ("tensor", "as_tensor"):  # a Python value copied onto a named device
            original = getattr(torch, function)
            self._originals[f"torch.{function}"] = original

            def to_device(data, *a, _original=original, _function=function, **k):
                # a device named by the string "cpu" is the host on purpose (torch.optim's step counters)
                if k.get("device") not in (None, "cpu") and not torch.is_tensor(data):
                    self.calls[f"torch.{_function}(device=)"] += 1
                    self.where[f"torch.{_function}(device=)", caller()] += 1
                return _original(data, *a, **k)

            setattr(torch, function, to_device)

    def _unpatch(self) -> None:
        for name, original in self._originals.items():
            if name.startswith("torch."):
                setattr(torch, name[len("torch."):], original)
            else:
                setattr(torch.Tensor, name, original)
        self._originals.clear()

    def __enter__(self):
        self._patch()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._unpatch()

    def start(self) -> HostSyncs:
        self.__enter__()
        return self

    def stop(self) -> None:
        self.__exit__(None, None, None)
