"""Orchestration: what reads input folders, runs the lower layers in order and writes output folders.

* :mod:`medssl.pipeline.experiment` -- ``medssl experiment``: the methods x budgets x seeds x folds grid
  (configuration in :mod:`~medssl.pipeline.experiment_config`, one cell in :mod:`~medssl.pipeline.cells`,
  ``results.csv`` in :mod:`~medssl.pipeline.results`, the "+SAM" step in :mod:`~medssl.pipeline.sam_step`);
* :mod:`medssl.pipeline.refine` -- ``medssl refine``: a folder of coarse predictions -> refined folder;
* :mod:`medssl.pipeline.propagate` -- ``medssl propagate``: files in -> label map and its JSON out;
* :mod:`medssl.pipeline.demo` -- ``medssl demo``.

The algorithms stay below (:mod:`medssl.sam`, :mod:`medssl.engine`, :mod:`medssl.evaluation`); tables, plots
and the HTML report are in :mod:`medssl.report`, console output in :mod:`medssl.report.console`.
"""
