"""The interface between the training loop and its hooks.

Hooks read a frozen `Run` and the state; they never write into shared state.
Whatever a hook wants the loop to do (use a restored state, know about a
checkpoint, stop) it returns as an `Update`, and the loop decides.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import ml_collections

from mnist_jax import input_pipeline
from mnist_jax import models


@dataclasses.dataclass(frozen=True)
class Run:
  """What every hook may read about the run; built by `train.setup`."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  model: models.CNN
  data: input_pipeline.Mnist  # host copies of the splits
  steps_per_epoch: int
  total_steps: int
  eval_fn: Callable[..., Any]
  eval_splits: dict[str, Any]  # device-resident padded validation/test
  rngs: dict[str, jax.Array]  # 'init', 'dropout', 'data'


@dataclasses.dataclass(frozen=True)
class Update:
  """What a hook asks of the loop; every field is optional.

  Attributes:
    state: use this state instead (e.g. restored from a checkpoint).
    history: epoch records of earlier processes of this run (on resume).
    checkpoint: the path of a checkpoint this hook wrote or restored.
    stop: stop after this dispatch, for this reason (e.g. 'pre-empted').
  """
  state: Any = None
  history: list[dict[str, Any]] | None = None
  checkpoint: str | None = None
  stop: str | None = None


class Hook:
  """Something that happens around training; every method is optional.

  The loop runs hooks in ascending `order` (ties in list order) and calls:
  `on_train_start` once; per dispatch of steps `on_steps` (device-side state;
  do not block on it without need); `on_metrics` when a dispatch's per-step
  metrics reach the host (one dispatch late, so the host never waits);
  `on_stop` when the loop stops early (signal or a hook's request), before it
  returns; `on_epoch_dispatched` when an epoch's last steps are dispatched,
  before its evaluation; `on_epoch_end` after the evaluation; and `on_train_end`
  for every hook whose start was called, also when anything failed (then
  `result` is None). Methods may return an `Update` or None.

  Host work the loop need not wait for (writing files) can go to a
  `hooks.background.Background` worker, as the checkpoint and summary hooks
  do; anything computed from the state must be dispatched (or copied) before
  the method returns, because the next dispatch donates the state's buffers.
  What is computed from the epoch-end state is best dispatched in
  `on_epoch_dispatched`: the device then runs it before the evaluation and,
  where the loop overlaps epoch ends (`train.overlaps_epoch_end`), before
  the next epoch's first steps, which it dispatches ahead of `on_epoch_end`.
  """
  order: int = 50

  def on_train_start(self, run: Run, state) -> Update | None:
    """Called once, before the first step."""

  def on_steps(self, run: Run, step: int, state) -> Update | None:
    """`state` after global step `step` (device-side, maybe not computed)."""

  def on_metrics(self, run: Run, first_step: int, metrics) -> None:
    """Host TrainMetrics stacked over steps `first_step + 1, ...`."""

  def on_stop(self, run: Run, step: int, state, reason: str
              ) -> Update | None:
    """The loop stops early at `step` (e.g. pre-emption); save what matters."""

  def on_epoch_dispatched(self, run: Run, epoch: int, step: int,
                          state) -> None:
    """Epoch `epoch`'s last steps, ending at `step`, are dispatched (`state`
    device-side); its evaluation and `on_epoch_end` follow."""

  def on_epoch_end(self, run: Run, epoch: int, step: int, state,
                   record: dict[str, Any]) -> Update | None:
    """After epoch `epoch` (1-based) ended at `step` and was evaluated."""

  def on_train_end(self, run: Run, step: int, state,
                   result: dict[str, Any] | None) -> None:
    """Last call; `result` is None when the run failed."""
