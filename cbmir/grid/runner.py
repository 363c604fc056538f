"""Running the grid: every cell the results table does not hold yet, one row written after each.

Resuming: a cell whose row has ``status == ok`` (and the grid's ``k``) is skipped without touching
the store or the model; ``failed`` rows are retried (``retry_failed=False`` skips them too). A
complete collection is reused (the ingest job skips complete splits); an interrupted one resumes at
its first missing row. Timings of an earlier ingest are kept in ``ingest_log.json`` beside the
table, so a reused collection still reports its database-creation time.

A failure in one cell (unknown model, weights unavailable, a dataset file or size that does not
exist, ...) becomes a ``failed`` row with its reason, and the grid goes on. A lock file
``<results>.lock`` keeps a second grid from writing the same table.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
from tqdm.auto import tqdm

from cbmir.core.files import FileLock, atomic_write_text
from cbmir.evaluation.results import k_of, key_of, read_results, to_frame, upsert_row, write_results
from cbmir.grid.cache import CACHE_DIR
from cbmir.grid.cell import failed_row, run_cell, settings_for, utc_now
from cbmir.grid.config import Cell, GridConfig, expand_cells, validate_grid

__all__ = ["GridSummary", "run_grid"]

_INGEST_LOG = "ingest_log.json"


@dataclass
class GridSummary:
    """What :func:`run_grid` did: cells ``ran`` (ok), ``failed`` and ``skipped`` (already in the table),
    the ``results`` path and the final table."""

    cells: list[Cell]
    ran: list[Cell] = field(default_factory=list)
    failed: list[tuple[Cell, str]] = field(default_factory=list)
    skipped: list[Cell] = field(default_factory=list)
    results: Path | None = None
    table: pd.DataFrame | None = None


class _SigtermAsInterrupt:
    """Within the block, SIGTERM raises KeyboardInterrupt (so stores close and flush); main thread only."""

    def __enter__(self):
        self._old = None
        try:
            self._old = signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread
            self._old = None
        return self

    @staticmethod
    def _handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False


def _read_log(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _write_log(path: Path, log: dict) -> None:
    atomic_write_text(path, json.dumps(log, indent=1, sort_keys=True))


def _table_lock(results: Path) -> FileLock:
    """Exclusive lock on a results table (``<results>.lock``) for one grid run: two grids writing the
    same table would lose each other's rows (each rewrites the whole file)."""
    lock = Path(str(results) + ".lock")
    return FileLock(lock, f"another cbmir benchmark is writing {lock.with_suffix('')} (lock {lock}); "
                          "wait for it to finish or use another --results")


def run_grid(config: GridConfig, *, cell_runner: Callable[..., dict] | None = None,
             echo: Callable[[str], None] | None = None) -> GridSummary:
    """Run every cell of ``config`` that the results table does not hold yet.

    Args:
        config: the grid.
        cell_runner: replaces :func:`cbmir.grid.cell.run_cell` (same signature; tests count calls with it).
        echo: receives one line per finished / failed / skipped cell (default: ``tqdm.write``).

    Returns:
        :class:`GridSummary`. The results table is written after every cell.

    Raises:
        CbmirError: the grid is empty or names an unknown model / dataset / size or a ``k`` larger
            than a database (:func:`cbmir.grid.config.validate_grid`, before any cell runs), the results
            table is unreadable or another grid is writing it (a lock file ``<results>.lock`` guards it).
            A finished row counts as done only when its ``k`` is the grid's (or unrecorded); else
            the cell runs again and its row is replaced. Errors inside a cell are
            recorded as ``failed`` rows, never raised; KeyboardInterrupt / SIGTERM stop the grid
            (finished cells are kept; re-run the same command to resume).
    """
    validate_grid(config)
    cells = expand_cells(config)
    config.results.parent.mkdir(parents=True, exist_ok=True)
    with _table_lock(config.results):
        return _run_grid_locked(config, cells, cell_runner or run_cell,
                                echo or (lambda line: tqdm.write(line)))


def _cells_to_run(config: GridConfig, cells: list[Cell], records: list[dict], summary: GridSummary,
                  say: Callable[[str], None]) -> list[Cell]:
    """The cells of ``cells`` that the table ``records`` does not hold as done; the others go to
    ``summary.skipped``."""
    done: dict[tuple, tuple[str, int | None]] = {key_of(r): (str(r["status"]), k_of(r)) for r in records}
    todo = []
    for cell in cells:
        status, row_k = done.get(cell.key, (None, None))
        if status == "ok" and row_k is not None and row_k != config.k:
            say(f"re-running {cell.label()}: table row has k={row_k}, grid asks k={config.k}")
            todo.append(cell)
        elif status == "ok" or (status == "failed" and not config.retry_failed):
            summary.skipped.append(cell)
        else:
            todo.append(cell)
    if summary.skipped:
        say(f"grid: {len(summary.skipped)} of {len(cells)} cells already in {config.results}; skipped")
    return todo


def _run_one(cell: Cell, config: GridConfig, runner, say, summary: GridSummary, **kw) -> dict:
    """Run ``cell`` with ``runner``; its row (a ``failed`` row when it raised)."""
    started, t0 = utc_now(), time.perf_counter()
    try:
        row = runner(cell, config, **kw)
        summary.ran.append(cell)
        say(f"ok      {cell.label()}: ACC@1 {row.get('ACC@1', float('nan')):.2f}%  "
            f"({row.get('cell_wall_s', time.perf_counter() - t0):.1f} s)")
    except Exception as e:  # noqa: BLE001 - one cell's failure must not stop the grid
        row = failed_row(cell, e, started, time.perf_counter() - t0)
        summary.failed.append((cell, row["error"]))
        say(f"failed  {cell.label()}: {row['error']}")
    return row


def _run_grid_locked(config: GridConfig, cells: list[Cell], runner, say) -> GridSummary:
    threads = config.threads or settings_for(config).threads  # --threads / grid file, else CBMIR_THREADS
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    results = config.results
    results_dir = results.parent
    records = read_results(results).to_dict("records")
    log_path = results_dir / _INGEST_LOG
    ingest_log = _read_log(log_path)
    settings = settings_for(config)
    summary = GridSummary(cells=cells, results=results)
    todo = _cells_to_run(config, cells, records, summary, say)

    bar = tqdm(total=len(cells), initial=len(summary.skipped), desc="grid", unit="cell",
               disable=not config.progress, position=0)
    try:
        with _SigtermAsInterrupt():
            for i, cell in enumerate(todo):
                bar.set_postfix_str(cell.label(), refresh=True)
                twins = [c for c in todo[i + 1:] if c.features_key == cell.features_key]
                row = _run_one(cell, config, runner, say, summary, results_dir=results_dir, ingest_log=ingest_log,
                               twins=twins, settings=settings)
                records = upsert_row(records, row)
                write_results(to_frame(records), results)
                _write_log(log_path, ingest_log)
                bar.update(1)
    finally:
        bar.close()
    # Every cell ran (not interrupted): features cached for a twin are no longer needed.
    shutil.rmtree(results_dir / CACHE_DIR, ignore_errors=True)
    summary.table = to_frame(records)
    return summary
