"""The image source of the report's query galleries (:data:`cbmir.evaluation.report.galleries.ImageSource`).

``ReportImages(settings)(row, split, indices)`` returns the pixels of rows ``indices`` of ``split`` of a
results row's collection, as :func:`cbmir.app.images.point_pixels` would:

* a MedMNIST row (``dataset`` a MedMNIST flag): read from the dataset file in ``settings.data_dir``
  (:func:`cbmir.app.images.source_rows`: ascending rows, one reader per file and split for the whole report; no
  store is opened);
* any other row (a user archive): from the archive recorded in the collection's metadata, through the store
  that holds it (``store_path`` / ``qdrant_url`` when given, else the row's ``store``), point by point.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from cbmir.app.context import App, load_settings
from cbmir.app.images import point_pixels, source_rows
from cbmir.core.errors import CbmirError

__all__ = ["ReportImages"]


class ReportImages:
    """Pixels of results rows' collections for the report's galleries; use as a context manager (or call
    :meth:`close`: it closes the stores opened for archive rows).

    Args:
        settings: :class:`cbmir.core.settings.Settings` (``data_dir``); default :func:`load_settings` ``()``.
        store_path / qdrant_url: the store of archive collections (default: each row's ``store``).
    """

    def __init__(self, settings=None, *, store_path=None, qdrant_url: str | None = None) -> None:
        self.settings = settings or load_settings()
        self._files = App(self.settings)  # MedMNIST readers only: its store is never opened
        self._store_path, self._qdrant_url = store_path, qdrant_url
        self._stores: dict[str, App] = {}

    def __call__(self, row: Mapping, split: str, indices: Sequence[int]) -> dict[int, np.ndarray]:
        """``{index: pixels}`` of rows ``indices`` of ``split`` of ``row``'s collection: uint8 ``(H, W, 3)``
        (2D) or ``(D, H, W)`` (3D).

        Raises:
            CbmirError: the source cannot be read here (MedMNIST file missing from ``data_dir``; archive moved,
                changed or its store not readable), naming what to fix; a row outside the split.
        """
        from cbmir.ingest.medmnist_data import MEDMNIST_FLAGS

        dataset = str(row["dataset"]).lower()
        if dataset in MEDMNIST_FLAGS:
            try:
                return source_rows(self._files, dataset, int(row["size"]), split, indices)
            except IndexError as exc:
                raise CbmirError(f"collection {row.get('collection')!r}: {exc}; is `data_dir` "
                                 f"({self.settings.data_dir}) holding another version of the file?") from None
        from cbmir.search.schema import point_id

        app = self._app_for(row)
        name = str(row["collection"])
        return {int(i): point_pixels(app, name, point_id(split, int(i)))[0] for i in indices}

    def class_names(self, row: Mapping) -> dict[int, str] | None:
        """``{label: class name}`` recorded in the metadata of ``row``'s user-archive collection; None for MedMNIST
        rows (the report knows their names).

        Raises:
            CbmirError: the collection's store cannot be read.
        """
        from cbmir.app.collections import class_names
        from cbmir.ingest.medmnist_data import MEDMNIST_FLAGS

        if str(row["dataset"]).lower() in MEDMNIST_FLAGS:
            return None
        return class_names(self._app_for(row).store.meta(str(row["collection"]))) or None

    def _app_for(self, row: Mapping) -> App:
        """The application context of the store holding ``row``'s collection (opened once per store)."""
        loc = self._qdrant_url or (str(self._store_path) if self._store_path else None) or row.get("store")
        if not isinstance(loc, str) or not loc or loc == "nan":
            raise CbmirError(f"collection {row.get('collection')!r}: its results row records no store; pass "
                             "--store-path (or --qdrant-url) to show its archive images")
        if loc not in self._stores:
            remote = loc.startswith(("http://", "https://"))
            self._stores[loc] = App(self.settings.model_copy(update={"qdrant_url": loc} if remote
                                                             else {"store_path": Path(loc), "qdrant_url": None}))
        return self._stores[loc]

    def close(self) -> None:
        """Close the stores opened for archive rows."""
        for app in (self._files, *self._stores.values()):
            app.close()
        self._stores.clear()

    def __enter__(self) -> "ReportImages":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
