"""The optimizer and its learning-rate schedule: change training here.

A different optimizer is a change to `create_optimizer` (and, for new
hyperparameters, fields in `configs/default.py`); nothing else needs editing.
Every config field is part of a run's identity for resuming unless
`checkpointing.MAY_CHANGE_ON_RESUME` lists it, so new fields are safe. The
run's duration may change on resume; a schedule over the run's length
(`total_steps`) then would too, so a resume is refused where the schedule
differs over the steps the run had left.
"""

from __future__ import annotations

import jax
import optax


def steps_per_epoch(config, num_train: int) -> int:
  """Steps per epoch; the last incomplete batch is dropped (as the tutorial)."""
  return num_train // config.batch_size


def total_steps(config, num_train: int) -> int:
  """The step a run ends at: `num_epochs` epochs, capped by
  `num_train_steps` if that is > 0 (what a schedule over the whole run
  decays over)."""
  total = config.num_epochs * steps_per_epoch(config, num_train)
  if config.num_train_steps > 0:
    total = min(total, config.num_train_steps)
  return total


def learning_rate_schedule(config, num_train: int) -> optax.Schedule:
  """The tutorial's staircase exponential decay: x0.95 every epoch (107 steps
  of 512 of 55,000 images), starting at 0.001."""
  decay_steps = int(num_train / config.batch_size * config.num_epochs_per_decay)
  return optax.exponential_decay(
      init_value=config.initial_learning_rate,
      transition_steps=max(decay_steps, 1),
      decay_rate=config.learning_rate_decay_factor,
      staircase=True)


def kernel_mask(params):
  """True for conv kernels (the only weights with L2), False for biases."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params)


def create_optimizer(config, learning_rate: optax.Schedule
                     ) -> optax.GradientTransformation:
  """L2 on kernels (the tutorial's `wd * sum(w**2) / 2` in the loss), then Adam.

  `add_decayed_weights` adds `wd * w` to the gradient *before* Adam, which is
  the gradient of the tutorial's loss term; `optax.adamw` decays after Adam's
  scaling (decoupled) and would be a different optimizer.
  """
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay, mask=kernel_mask),
      optax.adam(learning_rate, b1=config.adam_b1, b2=config.adam_b2,
                 eps=config.adam_eps))
