"""Where the memory of a training step goes: tensors saved for backward, and process peaks.

Autograd keeps, for every operation of the forward pass, the tensors its backward needs: the
input of a Linear layer (dL/dW = dL/dy^T x), the input of GELU, the attention probabilities
of softmax... Their total size is the *activation memory* of the step, the quantity that
gradient checkpointing and MEFT's reversible layers cut. We measure it exactly with
`torch.autograd.graph.saved_tensors_hooks`: every saved tensor passes through our pack hook.

Counting rules (derived in notebooks/part1_foundations/03_measuring_finetuning.ipynb, taken
apart layer by layer in notebooks/part4_meft/30_where_memory_goes.ipynb):

- a tensor is charged the full size of its storage (`untyped_storage().nbytes()`), because a
  view keeps its whole base alive;
- each storage is counted once, however many views of it are saved (the input x of the query,
  key and value projections is one storage, saved three times);
- only tensors still held by the graph when the forward pass ends are counted (a branch whose
  result was thrown away frees its saved tensors);
- saved tensors that live in a parameter's or buffer's storage (Linear saves W^T, a view of
  W) are reported separately as `parameter_bytes`: they exist anyway, training or not.

With `attribute_modules=True` the recorder also notes which module was running when each
storage was first saved (forward pre-hooks push the module's name on a stack, forward hooks pop
it), so `MemoryReport.bytes_by_module()` says where the bytes go: the attention's T x T matrices,
GELU's input, a dropout mask... (notebooks 03 and 30).
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

__all__ = [
    "SavedStorage",
    "MemoryReport",
    "SavedTensorRecorder",
    "measure_activation_memory",
    "ProcessMemoryReport",
    "measure_peak_process_memory",
    "MIB",
    "NO_MODULE",
]

MIB = 2**20

#: The module name given to tensors saved outside every module's forward (e.g. a loss function).
NO_MODULE = "(no module)"


@dataclass(frozen=True)
class SavedStorage:
    """One storage kept alive by the autograd graph (shape/dtype of the first view seen)."""

    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    is_parameter: bool
    module: str | None = None  # qualified name of the module that saved it first (attribute_modules=True)
    module_type: str | None = None  # its class name, e.g. "Dropout", "LayerNorm", "BertSelfAttention"


@dataclass(frozen=True)
class MemoryReport:
    """Bytes of the tensors saved for backward by one forward pass."""

    activation_bytes: int  # saved storages that are not parameters or buffers
    parameter_bytes: int  # saved storages shared with a parameter or buffer (e.g. W^T of Linear)
    num_saved_tensors: int  # saved tensors still held by the graph (views counted separately)
    storages: tuple[SavedStorage, ...]  # one entry per distinct storage, largest first

    @property
    def activation_mib(self) -> float:
        return self.activation_bytes / MIB

    @property
    def parameter_mib(self) -> float:
        return self.parameter_bytes / MIB

    @property
    def total_bytes(self) -> int:
        return self.activation_bytes + self.parameter_bytes

    @property
    def total_mib(self) -> float:
        return self.total_bytes / MIB

    def bytes_by_module(self, *, by: str = "module", include_parameters: bool = False) -> dict[str, int]:
        """Activation bytes per module name (`by="module"`) or per module class (`by="module_type"`).

        Needs a report taken with `attribute_modules=True`. Largest first; parameter storages
        are left out unless `include_parameters=True`. The values add up to `activation_bytes`
        (plus `parameter_bytes` with `include_parameters`).
        """
        if by not in ("module", "module_type"):
            raise ValueError(f"by must be 'module' or 'module_type', got {by!r}")
        totals: dict[str, int] = {}
        for storage in self.storages:
            if storage.is_parameter and not include_parameters:
                continue
            key = getattr(storage, by)
            if key is None:
                raise ValueError(
                    "this report has no module names: record it with SavedTensorRecorder(model, "
                    "attribute_modules=True) or measure_activation_memory(..., attribute_modules=True)"
                )
            totals[key] = totals.get(key, 0) + storage.nbytes
        return dict(sorted(totals.items(), key=lambda item: item[1], reverse=True))

    def __str__(self) -> str:
        return (
            f"saved for backward: {self.activation_mib:.2f} MiB activations + "
            f"{self.parameter_mib:.2f} MiB in parameter storages "
            f"({self.num_saved_tensors} saved tensors, {len(self.storages)} storages)"
        )


class _SavedHolder:
    """What the pack hook hands to autograd: the tensor, plus a weak reference from the recorder.

    While the graph keeps this holder, the recorder sees it (in a WeakSet); when the graph drops
    it, it disappears from the set. So at the end of the forward pass the set holds exactly the
    saved tensors the graph still needs.
    """

    __slots__ = ("tensor", "views_parameter", "module", "module_type", "order", "__weakref__")

    def __init__(
        self,
        tensor: torch.Tensor,
        views_parameter: bool,
        module: str | None = None,
        module_type: str | None = None,
        order: int = 0,
    ) -> None:
        self.order = order  # when it was saved: the first module to save a storage is charged
        self.tensor = tensor
        self.views_parameter = views_parameter
        self.module = module
        self.module_type = module_type


def _storage_key_and_size(tensor: torch.Tensor) -> tuple[tuple, int]:
    try:
        storage = tensor.untyped_storage()
        return (tensor.device.type, tensor.device.index, storage.data_ptr()), storage.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):
        # tensors without a plain storage (sparse, some subclasses): charge their own size
        return ("no-storage", id(tensor)), tensor.numel() * tensor.element_size()


def _looks_like_parameter(tensor: torch.Tensor) -> bool:
    # Linear saves W.t(): a view whose base is the Parameter itself
    base = tensor._base if tensor._base is not None else tensor
    return isinstance(base, nn.Parameter)


class SavedTensorRecorder:
    """Context manager that records every tensor autograd saves for backward.

    ```
    with SavedTensorRecorder(model) as recorder:
        loss = loss_fn(model(batch))
    print(recorder.report)     # taken when the block exits, while the graph is alive
    loss.backward()
    ```

    `parameters`: a module (its parameters and buffers) or an iterable of tensors whose
    storages count as parameter memory; saved views of any nn.Parameter are recognised too.
    `attribute_modules=True` (needs `parameters` to be an nn.Module) also records which of its
    modules was running when each tensor was saved: see `MemoryReport.bytes_by_module`. A
    storage saved by several modules is charged to the first one.
    The report is taken when the `with` block exits, so keep the graph (the loss) alive until
    then. Tensors saved inside non-reentrant gradient checkpointing go through the
    checkpoint's own hooks and are (correctly) not seen: they are not kept.

    Derived in notebooks/part1_foundations/03_measuring_finetuning.ipynb.
    """

    def __init__(
        self, parameters: nn.Module | Iterable[torch.Tensor] | None = None, *, attribute_modules: bool = False
    ) -> None:
        if attribute_modules and not isinstance(parameters, nn.Module):
            raise TypeError(
                "attribute_modules=True needs the model itself (an nn.Module) as `parameters`, "
                f"got {type(parameters).__name__}"
            )
        self._module = parameters if attribute_modules else None
        self._running: list[tuple[str, str]] = [(NO_MODULE, "-")]  # stack of (name, type) in their forward
        self._module_hooks: list[Any] = []
        if isinstance(parameters, nn.Module):
            tensors = list(parameters.parameters()) + list(parameters.buffers())
        elif parameters is None:
            tensors = []
        else:
            tensors = list(parameters)
            if not all(isinstance(t, torch.Tensor) for t in tensors):
                raise TypeError("parameters must be an nn.Module or an iterable of tensors")
        self._parameter_keys = {_storage_key_and_size(t)[0] for t in tensors}
        self._holders: weakref.WeakSet[_SavedHolder] = weakref.WeakSet()
        self._count = 0
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None
        self.report: MemoryReport | None = None

    def _pack(self, tensor: torch.Tensor) -> _SavedHolder:
        # detach(): same storage, no grad_fn. Holding an op's own output with its grad_fn would
        # make a reference cycle (output -> grad_fn -> saved output) that is never freed;
        # autograd restores the graph links itself when it unpacks.
        module, module_type = self._running[-1] if self._module is not None else (None, None)
        self._count += 1
        holder = _SavedHolder(tensor.detach(), _looks_like_parameter(tensor), module, module_type, self._count)
        self._holders.add(holder)
        return holder

    def _attach_module_hooks(self) -> None:
        assert self._module is not None
        self._running = [(NO_MODULE, "-")]
        for name, module in self._module.named_modules():
            entry = (name or "(model)", type(module).__name__)

            def enter(module: nn.Module, args: Any, entry: tuple[str, str] = entry) -> None:
                self._running.append(entry)  # this module's forward starts

            def leave(module: nn.Module, args: Any, output: Any) -> None:
                if len(self._running) > 1:
                    self._running.pop()  # ... and ends (always_call: even when it raises)

            self._module_hooks.append(module.register_forward_pre_hook(enter))
            self._module_hooks.append(module.register_forward_hook(leave, always_call=True))

    def _detach_module_hooks(self) -> None:
        for handle in self._module_hooks:
            handle.remove()
        self._module_hooks = []

    @staticmethod
    def _unpack(holder: _SavedHolder) -> torch.Tensor:
        return holder.tensor

    def __enter__(self) -> "SavedTensorRecorder":
        self._holders = weakref.WeakSet()
        self._count = 0
        self.report = None
        if self._module is not None:
            self._attach_module_hooks()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        assert self._hooks is not None
        self._hooks.__exit__(*exc_info)
        self._hooks = None
        self._detach_module_hooks()
        self.report = self.snapshot()

    def snapshot(self) -> MemoryReport:
        """Report of the saved tensors the graph holds right now."""
        storages: dict[tuple, SavedStorage] = {}
        holders = sorted(self._holders, key=lambda holder: holder.order)
        for holder in holders:
            tensor = holder.tensor
            key, nbytes = _storage_key_and_size(tensor)
            if key in storages:
                continue  # another view of a storage already counted
            is_parameter = key in self._parameter_keys or holder.views_parameter
            storages[key] = SavedStorage(
                nbytes, tuple(tensor.shape), tensor.dtype, is_parameter, holder.module, holder.module_type
            )
        ordered = tuple(sorted(storages.values(), key=lambda s: s.nbytes, reverse=True))
        return MemoryReport(
            activation_bytes=sum(s.nbytes for s in ordered if not s.is_parameter),
            parameter_bytes=sum(s.nbytes for s in ordered if s.is_parameter),
            num_saved_tensors=len(holders),
            storages=ordered,
        )


def measure_activation_memory(
    step: Callable[[], Any],
    model: nn.Module | Iterable[torch.Tensor] | None = None,
    *,
    backward: bool = True,
    attribute_modules: bool = False,
) -> MemoryReport:
    """Bytes saved for backward by `step()`, a function that runs the forward pass and returns the loss.

    `step()` may also return a Hugging Face output with a `.loss` (a model called with labels).

    The meter runs `step()` under saved-tensor hooks, takes the report while the graph is
    alive, then calls `loss.backward()` (so the gradients of a real training step are left in
    `.grad`) unless `backward=False`, in which case the graph is simply dropped. Backward runs
    outside the hooks, so recomputation (gradient checkpointing, reversible layers) is not
    charged to the forward pass. `model` tells which storages are parameters (see
    `SavedTensorRecorder`); with `attribute_modules=True` each storage also carries the name of
    the module of `model` that saved it (`report.bytes_by_module()`).

    ```
    report = measure_activation_memory(lambda: model(**batch).loss, model)
    report.activation_mib
    ```

    Derived in notebooks/part1_foundations/03_measuring_finetuning.ipynb.
    """
    if not callable(step):
        raise TypeError("step must be a function that runs the forward pass and returns the loss")
    with SavedTensorRecorder(model, attribute_modules=attribute_modules) as recorder:
        loss = step()
    if not isinstance(loss, torch.Tensor) and isinstance(getattr(loss, "loss", None), torch.Tensor):
        loss = loss.loss  # a Hugging Face output computed with labels
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"step() must return the loss tensor, got {type(loss).__name__}")
    if backward:
        if not loss.requires_grad:
            raise ValueError("the loss does not require grad: nothing is trainable, so nothing is saved")
        if loss.numel() != 1:
            raise ValueError(f"step() must return a scalar loss, got shape {tuple(loss.shape)}")
        loss.backward()
    assert recorder.report is not None
    return recorder.report


# ---------------------------------------------------------------------------------------------
# Peak process memory: what the operating system sees, activations, gradients, optimizer state,
# allocator caches and all. Coarser than the saved-tensor count, but it is the number that
# decides whether a run fits.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessMemoryReport:
    """Resident memory before a step and at its peak (bytes)."""

    baseline_bytes: int
    peak_bytes: int
    method: str  # "VmHWM" (Linux peak counter), "sampling" (psutil thread) or "cuda"

    @property
    def increase_bytes(self) -> int:
        return max(0, self.peak_bytes - self.baseline_bytes)

    @property
    def increase_mib(self) -> float:
        return self.increase_bytes / MIB

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / MIB

    def __str__(self) -> str:
        return f"peak {self.peak_mib:.1f} MiB (+{self.increase_mib:.1f} MiB over the start, {self.method})"


_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _read_status_kib(field: str) -> int:
    with open(_STATUS) as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not found in {_STATUS}")


def _reset_linux_peak() -> bool:
    # writing 5 to clear_refs resets the peak-RSS counter VmHWM (Linux >= 4.0)
    try:
        with open(_CLEAR_REFS, "w") as handle:
            handle.write("5")
        _read_status_kib("VmHWM")
        return True
    except OSError:
        return False


def measure_peak_process_memory(
    step: Callable[[], Any], *, device: torch.device | str | None = None, interval_s: float = 0.001
) -> ProcessMemoryReport:
    """Peak memory while `step()` runs.

    On CPU this is the resident set size (RSS) of the process: exact on Linux (the kernel's
    peak counter VmHWM is reset before the step), else sampled every `interval_s` by a thread
    using psutil. RSS includes everything (weights, optimizer state, allocator caches) and
    memory the allocator already holds from earlier steps does not show as an increase: compare
    `peak_bytes` of fresh processes, or `increase_bytes` of steps run in the same order.
    With a CUDA `device`, reports `torch.cuda.max_memory_allocated` instead.

    Derived in notebooks/part4_meft/32_meft.ipynb.
    """
    if not callable(step):
        raise TypeError("step must be a function")
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return ProcessMemoryReport(baseline, torch.cuda.max_memory_allocated(device), "cuda")

    if _reset_linux_peak():
        baseline = _read_status_kib("VmRSS")
        step()
        return ProcessMemoryReport(baseline, _read_status_kib("VmHWM"), "VmHWM")

    try:
        import psutil
    except ImportError as error:  # pragma: no cover - Linux path above is the usual one
        raise RuntimeError("measuring peak memory needs Linux /proc or the psutil package") from error
    process = psutil.Process()
    baseline = process.memory_info().rss
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        step()
    finally:
        done.set()
        sampler.join()
    peak = max(peak, process.memory_info().rss)
    return ProcessMemoryReport(baseline, peak, "sampling")
