"""One phase of a freeze schedule, as a worker trains it (`model.freeze`, see
`tlray.config.schedule`): what is frozen, what trains and on what input, its optimizer and
its learning-rate schedule.

At a phase boundary the groups the new phase trains are unfrozen (their BatchNorm comes back
to life), a new optimizer and schedule start (peaking at `optim.lr` x the phase's scale), and
the trained module is prepared again (DDP tracks a fixed set of parameters). The first phase
may read the feature cache, cut where its frozen front ends; later phases train on images.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from tlray.config.schedule import Phase, phase_epochs
from tlray.model.freeze import resolve_freeze, set_frozen_depth
from tlray.train.steps import make_optimizer


@dataclass
class PhaseRun:
    index: int
    on_cache: bool  # training reads the feature cache (the model after the cut trains)
    val_on_cache: bool  # validation reads it
    trained: nn.Module  # what the optimizer updates, on the device; DDP-wrapped with workers
    validated: nn.Module  # what validation runs: unwrapped, sharing the trained weights
    forward: nn.Module  # `trained`, maybe compiled
    optimizer: torch.optim.Optimizer
    scheduler: object
    first_step: int  # the global step this phase started after: its schedule counts from it


def enter_phase(index: int, phases: list[Phase], net, args, prepare_model, *,
                steps_per_epoch: int, first_step: int, world: int, ema=None) -> PhaseRun:
    """Freezes the model to phase `index`'s depth and sets up what trains in it.

    Args:
        net: the worker's `tlray.train.worker_setup.RunModel`.
        prepare_model: Ray's (to the device; DDP with several workers).
        ema: the weight average, whose copy follows the model's frozen structure.
    """
    cfg = args.config
    depth = resolve_freeze(phases[index].depth, cfg.model.backbone, net.info.group_names)
    set_frozen_depth(net.model, net.groups, depth)
    if ema is not None:
        set_frozen_depth(ema.module, net.groups, depth)
    cached = args.cache.splits if args.cache is not None and index == 0 else ()
    on_cache, val_on_cache = "train" in cached, "val" in cached
    module = net.cut.rest if on_cache else net.model
    _, epochs = phase_epochs(phases, index, cfg.train.epochs)
    # optim.lr is the rate of the whole group (scaling.num_workers' most); fewer workers make
    # a smaller global batch, and train at as much less (the linear scaling rule).
    lr = cfg.optim.lr * phases[index].lr_scale * world / cfg.scaling.max_workers
    optim = dataclasses.replace(cfg.optim, lr=lr)
    optimizer, scheduler = make_optimizer(module, optim, epochs, steps_per_epoch)
    trained = prepare_model(module)
    forward = trained.to(memory_format=torch.channels_last) if cfg.train.channels_last \
        else trained
    if cfg.train.compile:
        forward = torch.compile(forward)
    return PhaseRun(index=index, on_cache=on_cache, val_on_cache=val_on_cache,
                    trained=trained, validated=net.cut.rest if val_on_cache else net.model,
                    forward=forward, optimizer=optimizer, scheduler=scheduler,
                    first_step=first_step)
