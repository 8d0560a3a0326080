"""Optuna's plots of a study, as interactive HTML (plotly) and PNG (matplotlib)."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot
import optuna
import optuna.visualization as interactive
import optuna.visualization.matplotlib as static
from optuna.trial import TrialState

matplotlib.use("Agg")  # files only: no display on a cluster node
log = logging.getLogger(__name__)


def _plots(
    study: optuna.Study, metric: str
) -> dict[str, tuple[Callable[..., Any], Callable[..., Any], dict]]:
    several = len(study.directions) > 1
    target = {"target": lambda t: t.values[0], "target_name": metric} if several else {"target_name": metric}
    plots = {
        "optimization_history": (
            interactive.plot_optimization_history,
            static.plot_optimization_history,
            target,
        ),
        "param_importances": (interactive.plot_param_importances, static.plot_param_importances, target),
        "parallel_coordinate": (
            interactive.plot_parallel_coordinate,
            static.plot_parallel_coordinate,
            target,
        ),
    }
    if several:
        plots["pareto_front"] = (interactive.plot_pareto_front, static.plot_pareto_front, {})
    else:
        plots["intermediate_values"] = (
            interactive.plot_intermediate_values,
            static.plot_intermediate_values,
            {},
        )
    return plots


def save(study: optuna.Study, folder: Path, metric: str) -> list[Path]:
    """Every plot the study's trials allow: one PNG each, and all of them in plots.html.

    plots.html embeds plotly.js once (no CDN: clusters are often offline). Without a complete
    trial (a sweep stopped early, every trial failed) there is nothing to plot.
    """
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []
    folder.mkdir(parents=True, exist_ok=True)
    written, sections = [], []
    for name, (html, png, options) in _plots(study, metric).items():
        try:
            with warnings.catch_warnings(), _optuna_quiet():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                sections.append(
                    html(study, **options).to_html(full_html=False, include_plotlyjs=not sections)
                )
                axes = png(study, **options)
                figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
                figure.savefig(folder / f"{name}.png", dpi=120, bbox_inches="tight")
                matplotlib.pyplot.close(figure)
        except Exception as error:  # e.g. importances need 2+ complete trials
            log.info("plot %s skipped: %s", name, error)
            continue
        written.append(folder / f"{name}.png")
    if sections:
        page = folder / "plots.html"
        page.write_text(f"<html><head><meta charset='utf-8'></head><body>{''.join(sections)}</body></html>")
        written.append(page)
    return written


@contextlib.contextmanager
def _optuna_quiet() -> Iterator[None]:
    """Optuna logs a warning for each plot its trials do not allow (e.g. no intermediate values):
    a plot missing from the files says as much, the console has no use for it."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)
