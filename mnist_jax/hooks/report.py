"""Writes the run's report (`mnist_jax.report`) after a run that completed."""

from __future__ import annotations

from mnist_jax import parallel
from mnist_jax import report
from mnist_jax.hooks import base


class ReportHook(base.Hook):
  """Writes `<workdir>/report/` after training (lead process only)."""
  order = 40  # after SummaryHook has closed the event files it reads

  def on_train_end(self, run, step, state, result):
    # A stopped run resumes: its report comes when it ends (a report of the
    # last run that did stays until then), not in a pre-emption's grace time.
    if (result is None or result.get('stopped_early')
        or not parallel.is_lead()):
      return
    report.write_report(run.workdir, run.config, state.variables,
                        test=run.data.test, history=result)
