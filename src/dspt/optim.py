"""SGD over a stack of independent runs: one parameter [R, ...], one learning rate, momentum and weight decay
per run.

`torch.optim.SGD` holds one rate per parameter group, and a stacked parameter is one tensor, so a batch of
runs needs its own update. Row r of the stack is updated exactly as `torch.optim.SGD` (dampening 0, no
Nesterov) would update run r alone: d = g + wd_r * p; buf = d on the first step, else momentum_r * buf + d;
p -= lr_r * buf. Nothing is shared between rows, and a row whose `active` flag is off is left as it is
(a run that diverged keeps its last good context while the others go on).
"""
from __future__ import annotations

from typing import Sequence

import torch


class RunwiseSGD(torch.optim.Optimizer):
    def __init__(self, param: torch.Tensor, lr: Sequence[float], momentum: Sequence[float],
                 weight_decay: Sequence[float]):
        runs = param.shape[0]
        if not len(lr) == len(momentum) == len(weight_decay) == runs:
            raise ValueError(f"one lr, momentum and weight decay per run: {runs} runs")
        super().__init__([param], {"lr": 0.0})
        shape = (runs,) + (1,) * (param.dim() - 1)
        as_column = lambda v: torch.tensor(list(v), dtype=param.dtype, device=param.device).view(shape)  # noqa: E731
        self.lr, self.momentum, self.weight_decay = as_column(lr), as_column(momentum), as_column(weight_decay)
        self.active = torch.ones(shape, dtype=torch.bool, device=param.device)
        self.started = torch.zeros(shape, dtype=torch.bool, device=param.device)  # has a momentum buffer
        self.state[param]["momentum_buffer"] = torch.zeros_like(param)

    @property
    def param(self) -> torch.Tensor:
        return self.param_groups[0]["params"][0]

    @property
    def buffer(self) -> torch.Tensor:
        return self.state[self.param]["momentum_buffer"]

    def set_lr(self, lr: Sequence[float]) -> None:
        self.lr.copy_(torch.tensor(list(lr), dtype=self.lr.dtype).view(self.lr.shape))

    def load_buffer(self, run: int, buffer: torch.Tensor) -> None:
        """Restore run `run`'s momentum buffer (resume from its checkpoint)."""
        self.buffer[run].copy_(buffer.to(self.buffer.device, self.buffer.dtype))
        self.started[run] = True

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D401 - torch.optim signature
        p = self.param
        if p.grad is None:
            return None
        d = p.grad.add(p * self.weight_decay)
        buf = torch.where(self.started, self.buffer * self.momentum + d, d)
        self.buffer.copy_(torch.where(self.active, buf, self.buffer))
        p.copy_(torch.where(self.active, p - self.lr * self.buffer, p))
        self.started |= self.active
        return None
