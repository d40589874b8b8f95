"""The shared trainer: device choice, mini-batching, early stopping, schedules, checkpoints.

Gradient models hand the trainer their module, a loss over one batch and the training tensors;
closed-form models (EASE, SVD, iALS, ...) only use its device, seed and logging. In a DDP group
(`batchrec.distributed`, `batchrec train --nproc N`) the same `fit` trains data-parallel: each rank
on its users' rows, gradients averaged by DistributedDataParallel, loss and validation combined
over the ranks, so the models need no code of their own for it.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from batchrec import distributed
from batchrec.errors import BatchrecError
from batchrec.logs import bars_enabled, progress as progress_bar

log = logging.getLogger("batchrec.train")

# Intra-op threads of CPU training. The mini-batches of these models are small (a few thousand
# rows, [batch x hidden] matmuls): a second thread buys little, and where the cores are shared
# its waits spin. On the 2-core machine, beside other jobs, neumf's 3 epochs on ml-latest-small
# took 4.3 CPU-s with one thread and 74.6 CPU-s with two (same weights), 32 s against 413 s wall.
# Independent fits (ensemble members, families) are where more cores help.
CPU_TRAIN_THREADS = 1


@contextmanager
def torch_threads(n: int | None):
    """Run the block with `n` intra-op torch threads (None: leave as is), restored after."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def choose_device(name: str = "auto") -> torch.device:
    """'auto' -> CUDA when present, else CPU; 'cuda' without a GPU is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BatchrecError(
            "--device cuda was asked for but no CUDA device is available (use --device auto or cpu)"
        )
    if name not in ("cpu", "cuda"):
        raise BatchrecError(f"unknown device {name!r}; valid: auto, cpu, cuda")
    return torch.device(name)


class LazyAdam(torch.optim.Optimizer):
    """Adam for sparse embedding gradients: only the rows in the batch move (like
    torch.optim.SparseAdam, same update), done with row gathers and scatters, which measured
    about twice as fast per step as SparseAdam's sparse-tensor arithmetic on this CPU."""

    def __init__(
        self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise BatchrecError("sparse_adam needs sparse gradients (nn.Embedding(sparse=True))")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                grad = p.grad.coalesce()
                rows, g = grad.indices()[0], grad.values()
                m = state["exp_avg"].index_select(0, rows).lerp_(g, 1 - beta1)
                v = state["exp_avg_sq"].index_select(0, rows).mul_(beta2).addcmul_(g, g, value=1 - beta2)
                state["exp_avg"].index_copy_(0, rows, m)
                state["exp_avg_sq"].index_copy_(0, rows, v)
                step_size = group["lr"] * math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])
                p.index_add_(0, rows, m.div_(v.sqrt_().add_(group["eps"])), alpha=-step_size)


@dataclass
class Trainer:
    """Runs epochs of mini-batch training with early stopping on a validation metric."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    progress: bool | None = None  # None: a bar only on a terminal and not with -q (see logs.bars_enabled)
    checkpoint_dir: Path | None = None
    history: list[dict] = field(default_factory=list)
    member: int = 0  # the member of an ensemble this trainer fits (see `for_member`)
    cpu_threads: int | None = CPU_TRAIN_THREADS  # intra-op threads while fitting on CPU (None: torch's)
    # The DDP group this process trains in (None: alone); see `_DistributedSteps`.
    group: distributed.Group | None = field(default_factory=distributed.current)
    # Called with each epoch's row after it is logged (`batchrec tune` feeds its pruner from it);
    # it may raise to stop the fit.
    on_epoch: Callable[[dict], None] | None = None

    def __post_init__(self) -> None:
        if self.progress is None:
            self.progress = bars_enabled()

    def for_member(self, k: int) -> Trainer:
        """The trainer of member k of an ensemble: its own seed (member 0's is this trainer's),
        the same device and history (its epochs logged with member=k)."""
        seed = self.seed if k == 0 else int(np.random.SeedSequence([self.seed, k]).generate_state(1)[0])
        return replace(self, seed=seed, member=k)

    def generator(self, offset: int = 0) -> torch.Generator:
        """A seeded generator on the training device (offset separates independent streams)."""
        g = torch.Generator(device=self.device)
        g.manual_seed(self.seed * 1_000_003 + offset)
        return g

    def log_epoch(self, **fields) -> None:
        """Record one epoch in the history and log it as one key=value line."""
        self.history.append(fields)
        log.info(" ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items()))
        if self.on_epoch is not None:
            self.on_epoch(fields)

    def fit(
        self,
        module: torch.nn.Module,
        loss_fn: Callable[..., torch.Tensor],
        data: Sequence[torch.Tensor] | Callable[[int], Sequence[torch.Tensor]],
        *,
        epochs: int,
        batch_size: int,
        lr: float,
        weight_decay: float = 0.0,
        optimizer: str = "adam",
        validate: Callable[[], float] | None = None,
        higher_is_better: bool = False,
        patience: int = 3,
        lr_schedule: str = "none",
        grad_clip: float | None = None,
        metric_name: str = "valid",
        name: str | None = None,
    ) -> list[dict]:
        """Train `module` by minimising `loss_fn(*batch)` over shuffled mini-batches.

        `data` is a tuple of equal-length tensors, or a function epoch -> tuple (for data that is
        resampled each epoch, e.g. BPR negatives). After each epoch `validate()` (if given) is
        called; the best state is kept and restored, and training stops after `patience` epochs
        without improvement. A non-finite loss stops training with a clear error. `name` (the
        model family) labels the progress bar and errors. In a DDP group (`self.group`), the first
        tensor of `data` is the user (or row) each example belongs to: each rank trains on its
        users' rows, in as many steps per epoch as the global rows over `batch_size` (so the global
        batch is about `batch_size`, as with one process), and every rank calls `validate()`.
        """
        name = name or type(module).__name__
        torch.manual_seed(self.seed)
        module.to(self.device)
        params = [p for p in module.parameters() if p.requires_grad]
        # foreach: one kernel per step over all tensors instead of a Python loop of small ones; on
        # CPU the same weights to the bit (fused=True was 4x faster again per step but not bitwise).
        if optimizer == "adam":
            opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, foreach=True)
        elif optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)
        elif optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=0.9)
        elif optimizer == "adagrad":
            opt = torch.optim.Adagrad(params, lr=lr, weight_decay=weight_decay)
        elif optimizer == "sparse_adam":
            # For modules made only of nn.Embedding(sparse=True): each step updates just the rows
            # of the batch (lazy Adam), instead of every row of every table. No weight decay:
            # such models put their L2 on the batch rows in the loss.
            opt = LazyAdam(params, lr=lr)
        else:
            raise BatchrecError(
                f"unknown optimizer {optimizer!r}; valid: adam, adamw, sgd, adagrad, sparse_adam"
            )
        if lr_schedule == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
        elif lr_schedule == "plateau":
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
                opt, mode="max" if higher_is_better else "min", factor=0.5, patience=1
            )
        elif lr_schedule == "none":
            sched = None
        else:
            raise BatchrecError(f"unknown lr_schedule {lr_schedule!r}; valid: none, cosine, plateau")

        gen = self.generator()
        steps = loss_fn if self.group is None else _DistributedSteps(module, loss_fn, self.group)
        best, best_state, stale = -math.inf if higher_is_better else math.inf, None, 0
        threads = self.cpu_threads if self.device.type == "cpu" else None
        with torch_threads(threads), progress_bar(epochs, name, unit="epoch", enabled=self.progress) as bar:
            for epoch in range(1, epochs + 1):
                t0 = time.perf_counter()
                tensors = data(epoch) if callable(data) else data
                if self.group is not None:
                    tensors = steps.shard(tensors, reuse=not callable(data))
                n = len(tensors[0])
                order = torch.randperm(n, generator=gen, device=self.device)
                batches = (
                    order.split(batch_size)
                    if self.group is None
                    else order.tensor_split(distributed.epoch_batches(n, batch_size, self.group))
                )
                module.train()
                total = torch.zeros((), device=self.device)
                for idx in batches:
                    loss = steps(*(t[idx] for t in tensors))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if grad_clip:
                        torch.nn.utils.clip_grad_norm_(params, grad_clip)
                    opt.step()
                    total += loss.detach() * len(idx)
                if self.group is not None:  # the mean over every rank's rows, the same on each
                    total_all, n = distributed.sum_over_ranks([float(total), float(n)], self.group)
                    total = torch.tensor(total_all)
                mean_loss = float(total) / max(n, 1)
                if not math.isfinite(mean_loss):
                    raise BatchrecError(
                        f"{name}: training diverged (loss is {mean_loss} at epoch "
                        f"{epoch}); lower the learning rate (lr={lr}) or raise regularisation"
                    )
                row = {"epoch": epoch, "loss": mean_loss, "lr": opt.param_groups[0]["lr"]} | (
                    {"member": self.member} if self.member else {}
                )
                if validate is not None:
                    module.eval()
                    with torch.no_grad(), distributed.split_validation(self.group):
                        metric = float(validate())
                    row[metric_name] = metric
                    improved = metric > best if higher_is_better else metric < best
                    if improved:
                        best, best_state, stale = metric, copy.deepcopy(module.state_dict()), 0
                        if self.checkpoint_dir is not None and (self.group is None or self.group.leader):
                            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
                            torch.save(best_state, self.checkpoint_dir / "checkpoint.pt")
                    else:
                        stale += 1
                row["seconds"] = time.perf_counter() - t0
                self.log_epoch(**row)
                bar.update()
                bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k not in ("epoch", "seconds")})
                if sched is not None:
                    sched.step(row.get(metric_name, mean_loss)) if lr_schedule == "plateau" else sched.step()
                if validate is not None and stale >= patience:
                    break
        if best_state is not None:
            module.load_state_dict(best_state)
        module.eval()
        return self.history


class _StepLoss(torch.nn.Module):
    """One training step's loss as a module (the network as its child, so it owns its parameters)."""

    def __init__(self, net: torch.nn.Module, loss_fn: Callable[..., torch.Tensor]):
        super().__init__()
        self.net, self.loss_fn = net, loss_fn

    def forward(self, *batch: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(*batch)


class _DistributedSteps:
    """The loss of a training step through DistributedDataParallel. The models' losses call their
    network (or its methods) directly, so the loss itself is what goes through DDP's forward: that
    arms the gradient all-reduce of the backward pass. DDP broadcasts rank 0's parameters when it
    wraps them, so every rank starts from the same weights. `find_unused_parameters`: some models
    train only part of the network in a step (RecVAE's alternating encoder and decoder epochs)."""

    def __init__(self, net: torch.nn.Module, loss_fn: Callable[..., torch.Tensor], group: distributed.Group):
        self.group = group
        self.ddp = DistributedDataParallel(
            _StepLoss(net, loss_fn),
            device_ids=[group.device.index] if group.device.type == "cuda" else None,
            find_unused_parameters=True,
        )
        self._shard_cache: tuple | None = None

    def __call__(self, *batch: torch.Tensor) -> torch.Tensor:
        return self.ddp(*batch)

    def shard(self, tensors: Sequence[torch.Tensor], reuse: bool) -> tuple[torch.Tensor, ...]:
        """This rank's rows of the training tensors, by their first column (the user, or the row
        of an autoencoder): each user's rows on one rank (`distributed.user_shard`)."""
        if reuse and self._shard_cache is not None and self._shard_cache[0] is tensors:
            return self._shard_cache[1]
        keep = distributed.user_shard(tensors[0], self.group)
        mine = tuple(t[keep] for t in tensors)
        self._shard_cache = (tensors, mine)
        return mine
