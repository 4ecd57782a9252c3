"""A small, generic training loop on Hugging Face Accelerate, shared by all three Med3DVLM stages.

The paper (Xin et al., IEEE JBHI 2025; reference-facts §2 and §4.4) trains every stage the same way:
AdamW, linear warmup over 3% of the steps then cosine decay, gradient accumulation, bf16 and DeepSpeed
ZeRO-2. This module is that loop, written once:

- a *task* is an `nn.Module` whose ``forward(batch)`` returns a dict with a scalar ``"loss"`` (other
  scalar entries are logged too), in the spirit of timm's `task/` and open_clip's model + loss;
- the data is a map-style `Dataset` plus a collate function. The trainer shuffles it with its own
  seeded sampler (the order of epoch e depends only on (seed, e)) and calls ``dataset.set_epoch(e)``
  when the dataset has one, so random augmentation can be seeded by (seed, epoch, index) and a resumed
  run sees exactly the same batches as an uninterrupted one, whatever the number of workers;
- `Trainer(task, dataset, config, collate_fn).train(resume=...)` runs it. The same code runs on one CPU,
  under ``accelerate launch`` on several GPUs (DDP), and with DeepSpeed ZeRO-2 when
  ``config.deepspeed`` names a DeepSpeed JSON (the "auto" fields are filled in by Accelerate), on GPUs or,
  under ``torchrun``, on CPU processes over gloo (tests/test_sharded_training.py).

Checkpoints are ``<output_dir>/checkpoints/step-XXXXXXXX``: `Accelerator.save_state` (model, optimizer,
scheduler, RNG states of every process) plus ``trainer_state.json`` (step, epoch, batches consumed),
written into a hidden temporary folder that is renamed into place only when complete, so a crash never
leaves a half-written checkpoint where `--resume` would pick it up. Only the last `keep_last` survive.
Finding them is `checkpoints`, the data order `sampling`, stopping on a signal `signals`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .checkpoints import CHECKPOINT_DIR, STATE_NAME, checkpoint_name, fsync_dir, latest_checkpoint, list_checkpoints, read_trainer_state
from .config import to_plain
from .sampling import EpochSampler, EpochSeededDataset, seed_everything
from .signals import StopRequest

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings of one training run (the `train:` section of a recipe)."""

    output_dir: str = "runs/train"
    lr: float = 1e-4
    weight_decay: float = 0.0  # AdamW decoupled decay; never applied to biases, norms and scalars (dim < 2)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_ratio: float = 0.03  # share of optimizer steps with a linear warmup
    scheduler: str = "cosine"  # "cosine" (to 0) or "constant" (after warmup)
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; when set it overrides `epochs`
    batch_size: int = 8  # per device (micro-batch)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_grad_norm: float | None = 1.0  # None or 0 disables clipping
    mixed_precision: str = "no"  # "no", "bf16" or "fp16"
    save_every: int = 1000  # optimizer steps between checkpoints; 0 = only at the end
    keep_last: int = 1  # complete checkpoints kept on disk
    log_every: int = 10  # optimizer steps between log lines / TensorBoard points
    seed: int = 42
    num_workers: int = 0
    drop_last: bool = True  # keeps every micro-batch the same size (and the global SigLIP batch)
    deepspeed: str | None = None  # path to a DeepSpeed JSON (ZeRO-2: configs/zero2.json); needs `deepspeed`
    log_with: str | None = "tensorboard"  # an Accelerate tracker name, or None
    progress: bool = True  # tqdm bar on the main process
    progress_desc: str = "train"  # the bar's label
    group_by_length: bool = False  # batches of items of similar length (needs lengths from the stage), less padding
    # Speed and memory switches, applied to every submodule that offers them (the DCFormer encoder); neither
    # changes the losses beyond float rounding (tests/test_train_speed.py).
    grad_checkpointing: bool = False  # recompute activations in backward: less peak memory, more time per step
    channels_last: bool = False  # channels_last_3d activations: faster oneDNN kernels on CPU (not measured to pay on CUDA)
    # With mixed precision, frozen linear weights are cast to its dtype once instead of at every step (`precision`):
    # the same bits, a quarter less time per stage-3 step on a CPU. Off under DeepSpeed, which keeps its own copies.
    cast_frozen_once: bool = True

    def __post_init__(self) -> None:
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        if self.scheduler not in ("cosine", "constant"):
            raise ValueError(f"scheduler must be 'cosine' or 'constant', got {self.scheduler!r}")
        if self.batch_size < 1 or self.grad_accum < 1 or self.epochs < 1:
            raise ValueError("batch_size, grad_accum and epochs must be >= 1")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or null, got {self.max_steps}")


@dataclass
class TrainResult:
    """What `Trainer.train` returns: the unwrapped task and where the run ended."""

    task: nn.Module
    global_step: int
    total_steps: int
    completed: bool  # False when stopped early by SIGINT/SIGTERM (a checkpoint was written first)
    last_checkpoint: Path | None
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per log point


def default_param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups over the trainable parameters: decay for matrices/kernels, none for dim < 2.

    Biases, norm weights, layer-scale vectors and scalars such as SigLIP's t' and b are not decayed
    (nanoGPT's rule), so weight decay never pulls the temperature towards 0.
    """
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def scaled_param_groups(module: nn.Module, weight_decay: float, scales: Sequence[tuple[nn.Module, float]]) -> list[dict[str, Any]]:
    """`default_param_groups`, with the parameters of each listed sub-module in groups of its own at `scale` x lr.

    The rest of `module` comes first, so the logged "train/lr" is the main group's.
    """
    scaled_ids = {id(p) for sub, _ in scales for p in sub.parameters()}
    groups = []
    for g in default_param_groups(module, weight_decay):
        g["params"] = [p for p in g["params"] if id(p) not in scaled_ids]
        groups.append({**g, "lr_scale": 1.0})
    for sub, scale in scales:
        groups.extend({**g, "lr_scale": scale} for g in default_param_groups(sub, weight_decay))
    return [g for g in groups if g["params"]]


class Trainer:
    """Train `task` on `dataset` with the settings in `config`.

    Args:
        task: module whose ``forward(batch)`` returns a dict with a scalar ``"loss"``; other 0-d tensor or
            float entries are averaged and logged under ``train/<name>``.
        dataset: a map-style dataset; ``set_epoch(epoch)`` is called on it before each epoch if defined.
        config: the optimisation settings.
        collate_fn: turns a list of samples into the batch passed to ``task(batch)``.
        param_groups: AdamW parameter groups; default `default_param_groups(task, config.weight_decay)`,
            or ``task.param_groups(weight_decay)`` when the task defines it (e.g. per-module learning rates).
        recipe: the resolved recipe, saved next to the checkpoints and logged as hyperparameters.
        seed_samples: wrap the dataset in `EpochSeededDataset` (per-sample seeding, exact resume with
            random augmentation); turn off only for datasets that manage their own randomness.
        lengths: one length per item, used when ``config.group_by_length`` is set.
    """

    def __init__(
        self,
        task: nn.Module,
        dataset: Dataset,
        config: TrainConfig,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        param_groups: Sequence[dict[str, Any]] | None = None,
        recipe: dict[str, Any] | None = None,
        seed_samples: bool = True,
        lengths: Sequence[float] | None = None,
    ) -> None:
        self.task, self.config, self.collate_fn = task, config, collate_fn
        self.dataset = EpochSeededDataset(dataset, config.seed) if seed_samples else dataset
        self.param_groups = param_groups
        self.recipe = recipe if recipe is not None else {"train": to_plain(config)}
        self.output_dir = Path(config.output_dir)
        self.lengths = lengths
        self.accelerator = self._make_accelerator()

    # ------------------------------------------------------------------------------------------------ setup

    def _make_accelerator(self):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedType, GradientAccumulationPlugin, InitProcessGroupKwargs, ProjectConfiguration

        c = self.config
        kwargs: dict[str, Any] = {}
        if c.deepspeed:
            kwargs["deepspeed_plugin"] = _deepspeed_plugin(c, self.task)
            backend = _deepspeed_cpu_backend()
            if backend:
                kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend=backend)]
        # Accelerate keeps process-wide singletons; a second trainer in the same process (stage 1 then
        # stage 2, or a test suite) with another precision would otherwise be refused. The process group
        # (PartialState) is kept.
        if AcceleratorState._shared_state and AcceleratorState().mixed_precision != c.mixed_precision:
            AcceleratorState._reset_state(reset_partial_state=False)
        acc = Accelerator(
            gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=c.grad_accum),
            mixed_precision=c.mixed_precision,
            log_with=c.log_with,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")),
            **kwargs,
        )
        if c.deepspeed and acc.distributed_type != DistributedType.DEEPSPEED:
            # Accelerate drops the DeepSpeed plugin without a word in CPU mode; a run that asked for ZeRO
            # must not silently train with plain DDP.
            raise RuntimeError(
                f"train.deepspeed={c.deepspeed} but Accelerate set up {acc.distributed_type.value}: it ignores DeepSpeed"
                " with --cpu / ACCELERATE_USE_CPU=true; unset that (DeepSpeed runs on a CPU by itself)"
            )
        return acc

    def _optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        groups = self.param_groups
        if groups is None:
            groups = self.task.param_groups(c.weight_decay) if hasattr(self.task, "param_groups") else None
        if groups is None:
            groups = default_param_groups(self.task, c.weight_decay)
        if not any(g["params"] for g in groups):
            raise ValueError("the task has no trainable parameters")
        # A group may carry "lr_scale" (e.g. a pretrained tower trained more gently): its lr is lr * scale,
        # and the schedule multiplies every group's own initial lr.
        groups = [{**{k: v for k, v in g.items() if k != "lr_scale"}, "lr": c.lr * g.get("lr_scale", 1.0)} for g in groups]
        return torch.optim.AdamW(groups, lr=c.lr, betas=tuple(c.betas), eps=c.eps, weight_decay=c.weight_decay)

    def _scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int):
        from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

        # Accelerate's scheduler wrapper advances the schedule once per process at every optimizer step
        # (it assumes the schedule counts single-process steps), so both lengths are scaled by the
        # number of processes to keep "3% warmup, cosine to the end" true under DDP.
        n = self.accelerator.num_processes
        warmup = math.ceil(self.config.warmup_ratio * total_steps)
        if self.config.scheduler == "constant":
            return get_constant_schedule_with_warmup(optimizer, warmup * n)
        return get_cosine_schedule_with_warmup(optimizer, warmup * n, total_steps * n)

    def _dataloader(self) -> tuple[DataLoader, EpochSampler]:
        c = self.config
        lengths = self.lengths if c.group_by_length else None
        if c.group_by_length and lengths is None:
            raise ValueError("train.group_by_length needs item lengths, which this stage does not provide")
        sampler = EpochSampler(len(self.dataset), c.seed, lengths=lengths, batch_size=c.batch_size)  # type: ignore[arg-type]
        self._generator = torch.Generator().manual_seed(c.seed)
        loader = DataLoader(
            self.dataset,
            batch_size=c.batch_size,
            sampler=sampler,
            collate_fn=self.collate_fn,
            num_workers=c.num_workers,
            drop_last=c.drop_last,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,  # workers must see the dataset's new epoch after set_epoch
            # A private generator: creating a DataLoader iterator draws a worker base seed from it, and
            # drawing from the global RNG would shift dropout after a resume.
            generator=self._generator,
        )
        return loader, sampler

    # --------------------------------------------------------------------------------------------- training

    def train(self, resume: bool | str | os.PathLike = False) -> TrainResult:
        """Run to `max_steps` (or `epochs`), resuming from the latest (or a given) checkpoint when asked.

        ``resume=True`` continues from the latest complete checkpoint in ``output_dir`` and starts fresh
        when there is none; a path resumes from that checkpoint folder.
        """
        acc, c = self.accelerator, self.config
        seed_everything(c.seed)
        loader, sampler = self._dataloader()
        micro_per_epoch = len(loader)
        if micro_per_epoch == 0:
            raise ValueError(
                f"the dataset has {len(self.dataset)} samples, fewer than one batch of {c.batch_size}"  # type: ignore[arg-type]
                " (with drop_last); lower train.batch_size"
            )
        # With N processes each one sees 1/N of the batches of an epoch.
        local_micro = math.ceil(micro_per_epoch / acc.num_processes) if acc.num_processes > 1 else micro_per_epoch
        steps_per_epoch = math.ceil(local_micro / c.grad_accum)
        total_steps = c.max_steps or steps_per_epoch * c.epochs

        apply_speed_options(self.task, c)
        optimizer = self._optimizer()
        scheduler = self._scheduler(optimizer, total_steps)
        task, optimizer, loader, scheduler = acc.prepare(self.task, optimizer, loader, scheduler)

        state = {"global_step": 0, "epoch": 0, "batch_in_epoch": 0}
        checkpoint = self._resume_from(resume)
        if checkpoint is not None:
            acc.load_state(str(checkpoint))  # model, optimizer, scheduler, RNG of this process
            state.update(read_trainer_state(checkpoint))
            logger.info("resumed from %s at step %d (epoch %d, batch %d)", checkpoint, state["global_step"], state["epoch"], state["batch_in_epoch"])
        if acc.is_main_process:
            self._clean_temporaries()
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "recipe.json").write_text(json.dumps(to_plain(self.recipe), indent=2, default=str) + "\n")
        if c.log_with:
            acc.init_trackers("tb", config=_flat_hparams(self.recipe))

        forward = self._forward_fn(task)
        bar = _progress(total_steps, state["global_step"], enabled=c.progress and acc.is_local_main_process, desc=c.progress_desc)
        history: list[dict[str, float]] = []
        sums: dict[str, float] = {}
        count = 0
        last_ckpt: Path | None = checkpoint
        completed = state["global_step"] >= total_steps
        t0 = time.perf_counter()
        task.train()
        with StopRequest() as stop:
            while not completed:
                epoch = state["epoch"]
                skip = state["batch_in_epoch"]
                epoch_loader = acc.skip_first_batches(loader, skip) if skip else loader
                # Accelerate's loaders keep their own epoch counter and push it to the sampler and dataset
                # when iterated; a loader created for a resume starts at 0, so set it explicitly.
                if hasattr(epoch_loader, "set_epoch"):
                    epoch_loader.set_epoch(epoch)
                sampler.set_epoch(epoch)
                if hasattr(self.dataset, "set_epoch"):
                    self.dataset.set_epoch(epoch)  # type: ignore[union-attr]
                self._generator.manual_seed(c.seed * 1_000_003 + epoch)  # worker seeds: a function of the epoch
                batches = 0
                for batch in epoch_loader:
                    batches += 1
                    with acc.accumulate(task):
                        out = forward(batch)
                        loss = out["loss"]
                        acc.backward(loss)
                        if acc.sync_gradients and c.max_grad_norm:
                            acc.clip_grad_norm_(task.parameters(), c.max_grad_norm)
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                    state["batch_in_epoch"] += 1
                    for k, v in out.items():
                        if _is_scalar(v):
                            sums[k] = sums.get(k, 0.0) + float(v.detach().float() if torch.is_tensor(v) else v)
                    count += 1
                    if not acc.sync_gradients:
                        continue
                    state["global_step"] += 1
                    step = state["global_step"]
                    bar.update(1)
                    if step % c.log_every == 0 or step == total_steps:
                        record = self._log(sums, count, scheduler, step, t0)
                        history.append(record)
                        bar.set_postfix(loss=f"{record['train/loss']:.4f}", lr=f"{record['train/lr']:.2e}")
                        sums, count = {}, 0
                    done = step >= total_steps
                    if done or stop.requested or (c.save_every and step % c.save_every == 0):
                        last_ckpt = self.save_checkpoint(state)
                    if done:
                        completed = True
                        break
                    if stop.requested:
                        break
                if stop.requested and not completed:
                    break
                if not completed and batches == 0 and not skip:
                    # Split over the processes, an epoch can hold no batch at all, and the loop would never end.
                    raise ValueError(
                        f"process {acc.process_index} of {acc.num_processes} got no batch: {len(self.dataset)} samples"  # type: ignore[arg-type]
                        f" are fewer than one batch of {c.batch_size} per process; lower train.batch_size"
                    )
                if not completed:
                    state["epoch"] += 1
                    state["batch_in_epoch"] = 0
        bar.close()
        acc.wait_for_everyone()
        # The trackers only: `end_training()` also destroys the process group, and the stages still save and
        # synchronise their ranks after training (a multi-process run failed in its final barrier).
        for tracker in acc.trackers:
            tracker.finish()
        trained = acc.unwrap_model(task)
        if self.config.deepspeed:
            # ZeRO keeps the trainable parameters as views into one flat buffer, and safetensors refuses to save
            # tensors that share storage. Training is over: each gets storage of its own, so the stages can save.
            for p in trained.parameters():
                if p.requires_grad:
                    p.data = p.data.clone()
        return TrainResult(
            task=trained,
            global_step=state["global_step"],
            total_steps=total_steps,
            completed=completed,
            last_checkpoint=last_ckpt,
            history=history,
        )

    def _forward_fn(self, task: nn.Module) -> Callable[[Any], dict[str, Any]]:
        """`task(batch)`, with frozen linear weights read from copies in the autocast dtype when that applies."""
        from .precision import autocast_dtype, frozen_linear_copies

        dtype = autocast_dtype(self.config.mixed_precision)
        copies = frozen_linear_copies(task, dtype) if dtype and self.config.cast_frozen_once and not self.config.deepspeed else {}
        if not copies:
            return task
        from torch.func import functional_call

        logger.info("%d frozen linear tensors held in %s for the forward pass", len(copies), dtype)
        # tie_weights=False: an output head tied to the embedding table gets the copy, the lookup keeps fp32.
        return lambda batch: functional_call(task, copies, (batch,), tie_weights=False, strict=False)

    def _log(self, sums: dict[str, float], count: int, scheduler: Any, step: int, t0: float) -> dict[str, float]:
        acc = self.accelerator
        means = {k: v / max(count, 1) for k, v in sums.items()}
        if acc.num_processes > 1:
            keys = sorted(means)
            t = acc.reduce(torch.tensor([means[k] for k in keys], device=acc.device), reduction="mean")
            means = dict(zip(keys, t.tolist()))
        record = {f"train/{k}": v for k, v in means.items()}
        record["train/lr"] = float(scheduler.get_last_lr()[0])
        record["step"] = step
        record["time_s"] = round(time.perf_counter() - t0, 3)
        if self.config.log_with:
            acc.log({k: v for k, v in record.items() if k.startswith("train/")}, step=step)
        if acc.is_main_process:
            with open(self.output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            logger.debug("step %d: %s", step, record)
        return record

    # ------------------------------------------------------------------------------------------ checkpoints

    def _resume_from(self, resume: bool | str | os.PathLike) -> Path | None:
        if resume is False or resume is None:
            if latest_checkpoint(self.output_dir) is not None:
                logger.warning("%s already holds checkpoints; starting fresh (use --resume to continue)", self.output_dir)
            return None
        if resume is True:
            found = latest_checkpoint(self.output_dir)
            if found is None:
                logger.info("no checkpoint in %s; starting from scratch", self.output_dir / CHECKPOINT_DIR)
            return found
        path = Path(resume)
        read_trainer_state(path)  # fail early with a clear message
        return path

    def save_checkpoint(self, state: dict[str, Any]) -> Path:
        """Write a complete checkpoint for `state` atomically and prune old ones; returns its folder."""
        acc = self.accelerator
        root = self.output_dir / CHECKPOINT_DIR
        final = root / checkpoint_name(state["global_step"])
        tmp = root / f".tmp-{checkpoint_name(state['global_step'])}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))  # every process writes its part (its RNG states, DeepSpeed shards)
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / STATE_NAME).write_text(json.dumps({**state, "time": time.time()}, indent=2) + "\n")
            fsync_dir(tmp)
            if final.exists():  # the same step saved again (e.g. end of a resumed, finished run)
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(root)
            for old in list_checkpoints(self.output_dir)[: -max(self.config.keep_last, 1)]:
                shutil.rmtree(old, ignore_errors=True)
            logger.info("saved checkpoint %s", final)
        acc.wait_for_everyone()
        return final

    def _clean_temporaries(self) -> None:
        root = self.output_dir / CHECKPOINT_DIR
        if root.is_dir():
            for p in root.glob(".tmp-step-*"):
                logger.info("removing incomplete checkpoint %s", p)
                shutil.rmtree(p, ignore_errors=True)


def train(
    task: nn.Module,
    dataset: Dataset,
    config: TrainConfig,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    resume: bool | str | os.PathLike = False,
    **kwargs: Any,
) -> TrainResult:
    """Functional shortcut: ``Trainer(task, dataset, config, collate_fn, **kwargs).train(resume)``."""
    return Trainer(task, dataset, config, collate_fn, **kwargs).train(resume=resume)


# ------------------------------------------------------------------------------------------------- helpers


def apply_speed_options(module: nn.Module, config: TrainConfig) -> None:
    """Turn on `config.grad_checkpointing` / `config.channels_last` in every submodule that supports them.

    Only switches on: a model whose saved config already asks for checkpointing keeps it.
    """
    for m in module.modules():
        if config.grad_checkpointing and hasattr(m, "set_grad_checkpointing"):
            m.set_grad_checkpointing(True)
        if config.channels_last and hasattr(m, "set_channels_last"):
            m.set_channels_last(True)


def _deepspeed_plugin(config: TrainConfig, task: nn.Module):
    from accelerate.utils import DeepSpeedPlugin

    path = Path(config.deepspeed)  # type: ignore[arg-type]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: DeepSpeed config not found (train.deepspeed)")
    try:
        import deepspeed
    except ImportError:
        raise ImportError(
            f"train.deepspeed={path} needs DeepSpeed: pip install -c constraints.txt deepspeed "
            "(or set train.deepspeed=null to train with plain DDP)"
        ) from None
    if not _launched() and importlib.util.find_spec("mpi4py") is None:
        # Without a launcher's RANK/WORLD_SIZE/MASTER_* DeepSpeed looks for MPI and stops with "No module named mpi4py".
        raise RuntimeError(
            f"train.deepspeed={path} needs a launcher, also for one process: torchrun --nproc_per_node N $(which med3dvlm) train ..."
        )
    if deepspeed.__version__ == "0.19.8" and any(p.dim() == 0 for p in task.parameters()):
        # 0.19.8 broadcasts the initial weights as `p.data.view(torch.uint8)`, which fails on 0-d tensors such
        # as SigLIP's logit scale and bias ("self.dim() cannot be 0 to view Float as Byte"); 0.19.7 does not.
        raise ImportError(
            "DeepSpeed 0.19.8 cannot start a model with 0-d parameters: pip install -c constraints.txt 'deepspeed!=0.19.8'"
        )
    # "auto" entries in the JSON (batch sizes, accumulation, clipping, bf16) are filled in by Accelerate from
    # the prepared dataloader and these values, so the JSON never disagrees with the recipe.
    plugin = DeepSpeedPlugin(
        hf_ds_config=str(path),
        gradient_accumulation_steps=config.grad_accum,
        gradient_clipping=config.max_grad_norm or None,
    )
    if plugin.is_auto("zero_optimization.reduce_bucket_size"):
        # Accelerate fills this "auto" from `model.config.hidden_size`, which a task (model + loss) does not
        # have. One bucket for all trainable gradients, at most DeepSpeed's own default of 5e8 elements.
        trainable = sum(p.numel() for p in task.parameters() if p.requires_grad)
        plugin.deepspeed_config["zero_optimization"]["reduce_bucket_size"] = max(1, min(trainable, 500_000_000))
    return plugin


def _deepspeed_cpu_backend() -> str | None:
    """The process-group backend of DeepSpeed's CPU accelerator ("gloo", or "ccl" with oneCCL) when a launcher
    (torchrun, ``accelerate launch``) started this process on a CPU; None on a GPU or in a lone process.

    Accelerate picks a backend only for GPUs and the like (or for its own CPU mode, where it ignores DeepSpeed).
    On a CPU it finds none, and with no backend its state counts one process per rank although DeepSpeed has
    joined them all (DeepSpeed then stops with "train_batch_size is not equal to micro_batch_per_gpu *
    gradient_acc_step * world_size"). Naming DeepSpeed's own backend makes Accelerate count the real world size.
    """
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    return accelerator.communication_backend_name() if _launched() and accelerator.device_name() == "cpu" else None


def _launched() -> bool:
    """Whether a launcher (torchrun, ``accelerate launch``) started this process: Accelerate's own test."""
    return int(os.environ.get("LOCAL_RANK", -1)) != -1


def _is_scalar(v: Any) -> bool:
    return (torch.is_tensor(v) and v.dim() == 0) or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _progress(total: int, initial: int, enabled: bool, desc: str = "train"):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True)


def _flat_hparams(recipe: dict[str, Any]) -> dict[str, Any]:
    """TensorBoard hparams accept only scalars and strings: flatten sections to dotted keys."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, (int, float, str, bool)):
            out[prefix] = node
        else:
            out[prefix] = str(node)

    walk("", to_plain(recipe))
    return out
