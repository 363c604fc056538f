"""The benchmark grid: datasets x sizes x models (x backends x distances), resumable, one tidy table.

An entry point on top of the evaluation layer (DESIGN.md §8), used by ``cbmir benchmark``:

* :mod:`cbmir.grid.config` - :class:`GridConfig` (grid files, CLI flags), the cells, validation;
* :mod:`cbmir.grid.cell` - one cell: ingest (or reuse) a collection, evaluate it, its results row;
* :mod:`cbmir.grid.cache` - features extracted once for the two distances of a model;
* :mod:`cbmir.grid.runner` - :func:`run_grid`: every cell not yet in the table, resumable, locked.

Results go to one table (``--results``, default ``results/results.csv``; Parquet for a ``.parquet``
path), one row per cell, with per-query files beside it (``save_per_query``); its columns and files
are described in :mod:`cbmir.evaluation.results`, which the report reads too.

Example::

    from cbmir.grid import GridConfig, run_grid

    summary = run_grid(GridConfig(datasets=["breastmnist"], models=["hog"], sizes=[28],
                                  results="results/results.csv"))
"""

from cbmir.evaluation.results import (
    COLUMNS,
    KEY,
    METRIC_COLUMNS,
    load_per_query,
    per_query_outcomes,
    read_results,
    software_versions,
    write_results,
)
from cbmir.grid.cell import run_cell
from cbmir.grid.config import (
    Cell,
    GridConfig,
    config_from_cli,
    expand_cells,
    load_grid_file,
    parse_list,
    validate_grid,
)
from cbmir.grid.runner import GridSummary, run_grid

__all__ = [
    "KEY",
    "COLUMNS",
    "METRIC_COLUMNS",
    "GridConfig",
    "Cell",
    "GridSummary",
    "load_grid_file",
    "expand_cells",
    "validate_grid",
    "parse_list",
    "config_from_cli",
    "read_results",
    "write_results",
    "run_grid",
    "run_cell",
    "load_per_query",
    "per_query_outcomes",
    "software_versions",
]
