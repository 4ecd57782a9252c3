"""A toy regression task for the engine tests, runnable as a script so it can be killed with SIGKILL.

    python tests/toy_train_task.py OUT_DIR [--steps N] [--save-every K] [--sleep S] [--resume] [--accum A]

It has dropout and a randomly augmented dataset, so an exact resume needs the RNG states and the data
position, not only the weights. At the end it writes OUT_DIR/final.safetensors.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils.data import Dataset

from med3dvlm.train import TrainConfig, Trainer


class NoisyLine(Dataset):
    """y = x @ w_true + noise, with the inputs jittered at random on every read (an "augmentation")."""

    def __init__(self, n: int = 96, dim: int = 8, sleep: float = 0.0) -> None:
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x @ torch.randn(dim, 1, generator=g) + 0.01 * torch.randn(n, 1, generator=g)
        self.sleep = sleep

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self.sleep:
            time.sleep(self.sleep)
        return {"x": self.x[i] + 0.01 * torch.randn_like(self.x[i]), "y": self.y[i]}


class ToyTask(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 1))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pred = self.net(batch["x"])
        loss = nn.functional.mse_loss(pred, batch["y"])
        return {"loss": loss, "abs_err": (pred - batch["y"]).abs().mean().detach()}


def run(out: str, steps: int, save_every: int, sleep: float = 0.0, resume: bool = False, accum: int = 1, lr: float = 1e-2):
    torch.manual_seed(0)
    config = TrainConfig(
        output_dir=out, lr=lr, weight_decay=0.01, warmup_ratio=0.1, max_steps=steps, batch_size=8, grad_accum=accum,
        save_every=save_every, keep_last=2, log_every=5, seed=7, log_with=None, progress=False,
    )
    return Trainer(ToyTask(), NoisyLine(sleep=sleep), config).train(resume=resume)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--save-every", type=int, default=5)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    result = run(args.out, args.steps, args.save_every, args.sleep, args.resume, args.accum)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in result.task.state_dict().items()}, f"{args.out}/final.safetensors")


if __name__ == "__main__":
    main()
