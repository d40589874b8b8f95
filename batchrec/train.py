"""The shared trainer (device choice, mini-batching, early stopping, schedules, checkpoints)
and `batchrec train`, which fits a model on a snapshot and records a `model_runs` row.

Gradient models hand the trainer their module, a loss over one batch and the training tensors;
closed-form models (EASE, SVD, iALS, ...) only use its device, seed and logging.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from batchrec.errors import BatchrecError

log = logging.getLogger("batchrec.train")


def choose_device(name: str = "auto") -> torch.device:
    """'auto' -> CUDA when present, else CPU; 'cuda' without a GPU is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BatchrecError("--device cuda was asked for but no CUDA device is available (use --device auto or cpu)")
    if name not in ("cpu", "cuda"):
        raise BatchrecError(f"unknown device {name!r}; valid: auto, cpu, cuda")
    return torch.device(name)


@dataclass
class Trainer:
    """Runs epochs of mini-batch training with early stopping on a validation metric."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    progress: bool | None = None  # None: a bar only when stderr is a terminal (quiet under cron)
    checkpoint_dir: Path | None = None
    history: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.progress is None:
            self.progress = sys.stderr.isatty()

    def generator(self, offset: int = 0) -> torch.Generator:
        """A seeded generator on the training device (offset separates independent streams)."""
        g = torch.Generator(device=self.device)
        g.manual_seed(self.seed * 1_000_003 + offset)
        return g

    def log_epoch(self, **fields) -> None:
        """Record one epoch in the history and log it as one key=value line."""
        self.history.append(fields)
        log.info(" ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items()))

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
    ) -> list[dict]:
        """Train `module` by minimising `loss_fn(*batch)` over shuffled mini-batches.

        `data` is a tuple of equal-length tensors, or a function epoch -> tuple (for data that is
        resampled each epoch, e.g. BPR negatives). After each epoch `validate()` (if given) is
        called; the best state is kept and restored, and training stops after `patience` epochs
        without improvement. A non-finite loss stops training with a clear error.
        """
        torch.manual_seed(self.seed)
        module.to(self.device)
        params = [p for p in module.parameters() if p.requires_grad]
        if optimizer == "adam":
            opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        elif optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        elif optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=0.9)
        elif optimizer == "adagrad":
            opt = torch.optim.Adagrad(params, lr=lr, weight_decay=weight_decay)
        else:
            raise BatchrecError(f"unknown optimizer {optimizer!r}; valid: adam, adamw, sgd, adagrad")
        if lr_schedule == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
        elif lr_schedule == "plateau":
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max" if higher_is_better else "min",
                                                               factor=0.5, patience=1)
        elif lr_schedule == "none":
            sched = None
        else:
            raise BatchrecError(f"unknown lr_schedule {lr_schedule!r}; valid: none, cosine, plateau")

        gen = self.generator()
        best, best_state, stale = -math.inf if higher_is_better else math.inf, None, 0
        bar = tqdm(range(1, epochs + 1), desc=type(module).__name__, disable=not self.progress, leave=False)
        for epoch in bar:
            t0 = time.perf_counter()
            tensors = data(epoch) if callable(data) else data
            n = len(tensors[0])
            order = torch.randperm(n, generator=gen, device=self.device)
            module.train()
            total = torch.zeros((), device=self.device)
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                loss = loss_fn(*(t[idx] for t in tensors))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, grad_clip)
                opt.step()
                total += loss.detach() * len(idx)
            mean_loss = float(total) / max(n, 1)
            if not math.isfinite(mean_loss):
                raise BatchrecError(f"{type(module).__name__}: training diverged (loss is {mean_loss} at epoch "
                                    f"{epoch}); lower the learning rate (lr={lr}) or raise regularisation")
            row = {"epoch": epoch, "loss": mean_loss, "lr": opt.param_groups[0]["lr"]}
            if validate is not None:
                module.eval()
                with torch.no_grad():
                    metric = float(validate())
                row[metric_name] = metric
                improved = metric > best if higher_is_better else metric < best
                if improved:
                    best, best_state, stale = metric, copy.deepcopy(module.state_dict()), 0
                    if self.checkpoint_dir is not None:
                        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
                        torch.save(best_state, self.checkpoint_dir / "checkpoint.pt")
                else:
                    stale += 1
            row["seconds"] = time.perf_counter() - t0
            self.log_epoch(**row)
            bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k not in ("epoch", "seconds")})
            if sched is not None:
                sched.step(row.get(metric_name, mean_loss)) if lr_schedule == "plateau" else sched.step()
            if validate is not None and stale >= patience:
                break
        if best_state is not None:
            module.load_state_dict(best_state)
        module.eval()
        return self.history
