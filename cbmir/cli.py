"""The ``cbmir`` console script: a thin layer over plain functions of ingest/, search/, evaluation/.

Every user-facing error is a :class:`cbmir.core.errors.CbmirError`, printed as one ``error:`` line
(no traceback) with exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from cbmir.core.errors import CbmirError
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Content-based medical image retrieval: ingest -> exact Qdrant search -> the study's metrics.")

# ----------------------------------------------------------------------------- shared options
DatasetOpt = typer.Option(..., "--dataset", "-d", help="MedMNIST flag (breastmnist, adrenalmnist3d) or a user "
                          "archive: image folder, .csv/.parquet manifest, DICOM folder, .nii/.nii.gz/.npy volume(s)")
SizeOpt = typer.Option(28, "--size", "-s", help="image side (2D: 28/64/128/224; 3D: 28/64; user archives: any "
                       "side, every image resized to it)")
ModelOpt = typer.Option(..., "--model", "-m", help="extractor name (see `cbmir models`)")
DataDirOpt = typer.Option(None, "--data-dir", help="folder of MedMNIST npz files [CBMIR_DATA_DIR]")
StoreOpt = typer.Option(None, "--store-path", help="embedded store directory [CBMIR_STORE_PATH]")
UrlOpt = typer.Option(None, "--qdrant-url", help="Qdrant server URL; default: embedded engine [CBMIR_QDRANT_URL]")
BackendOpt = typer.Option("torch", "--backend", help="extractor backend: torch or keras")
DistanceOpt = typer.Option(None, "--distance", help="cosine (default) or euclidean [CBMIR_DISTANCE]")
AggOpt = typer.Option("concat", "--volume-aggregation", help="3D: concat (the study) | mean | max")
SearchBackendOpt = typer.Option("store", "--search-backend", help="store (the engine's exact queries) | blas "
                                "(cross-check: blocked sgemm over the vectors read back from the store; same results)")
# user archives (ingest/sources): see `cbmir.ingest.sources` and README
SourceOpt = typer.Option(None, "--source",
                         help="medmnist | folder | manifest | dicom | nifti [inferred from --dataset]")
NameOpt = typer.Option(None, "--name", help="user archive: dataset/collection name [folder or file stem]")
StrictOpt = typer.Option(False, "--strict", help="user archive: fail on the first unreadable file [skip and list]")
IntensityOpt = typer.Option(None, "--intensity", help="user archive pixel rule: auto | minmax | window | range [auto]")
WindowOpt = typer.Option(None, "--window", help="user archive: intensity window CENTER,WIDTH (e.g. 40,400 for CT)")
SliceAxisOpt = typer.Option(None, "--slice-axis", help="volumes: axis sliced [NIfTI: 2 = axial after RAS+; .npy: 0]")
DicomModeOpt = typer.Option("auto", "--dicom-mode", help="DICOM: auto | 2d | 3d (series/multi-frame as volumes)")
RandomInitReadOpt = typer.Option(False, "--random-init", help="the collection built with --random-init "
                                                              "(named <dataset>_<size>_<model>_randinit)")
RECREATE_HELP = ("replace an existing collection: built beside it and swapped in when complete (the old one stays "
                 "intact until then; re-running resumes)")
FitOpt = typer.Option("stretch", "--fit", help="user archive 2D resize: stretch | pad | crop")
InputSizeOpt = typer.Option("native", "--input-size", help="ImageNet CNNs: native (the study's: each image at its "
                            "own size, 28 -> 32 px) or N: every image / slice resized to N x N (collection _in<N>)")


def _input_size(value: str):
    """``--input-size`` as :func:`cbmir.core.input_size.parse_input_size` reads it (None = native)."""
    from cbmir.core.input_size import parse_input_size

    return parse_input_size(value)


def _arch(source=None, name=None, strict=False, intensity=None, window=None, slice_axis=None, dicom_mode="auto",
          fit="stretch"):
    """User-archive options (MedMNIST ignores the defaults)."""
    from cbmir.app.collections import ArchiveOptions

    return ArchiveOptions(source=source, name=name, strict=strict, intensity=intensity, window=window,
                          slice_axis=slice_axis, dicom_mode=dicom_mode, fit=fit)


# beyond one machine (docs/scaling.md): sharded ingest, approximate search modes, Qdrant cluster settings
ShardOpt = typer.Option(None, "--shard", help="embed only share i of n of every split (i/n, e.g. 0/4); run all n "
                        "shares, in parallel, on any machines, to complete the collection")
IndexOpt = typer.Option(None, "--index", help="search mode of a new collection: exact (default; the study) | hnsw "
                        "(approximate; the study's commands still search exactly)")
QuantOpt = typer.Option(None, "--quantization", help="none (default) | int8 | binary (approximate; binary only for "
                        "signed features)")
HnswMOpt = typer.Option(None, "--hnsw-m", help="HNSW links per point [16]")
HnswEfcOpt = typer.Option(None, "--hnsw-ef-construct", help="HNSW build candidates [100]")
HnswEfOpt = typer.Option(None, "--hnsw-ef", help="HNSW query candidates, the recall/speed knob [128]")
RescoreOpt = typer.Option(None, "--rescore/--no-rescore", help="re-score quantized candidates in float32 [rescore]")
OversamplingOpt = typer.Option(None, "--oversampling", help="quantized candidates per result before rescoring [2]")
ShardNumberOpt = typer.Option(None, "--shard-number", help="Qdrant server: shards of a new collection (not --shard) "
                              "[CBMIR_QDRANT_SHARD_NUMBER]")
ReplicationOpt = typer.Option(None, "--replication-factor", help="Qdrant server: copies of each shard "
                              "[CBMIR_QDRANT_REPLICATION_FACTOR]")
WriteConsOpt = typer.Option(None, "--write-consistency-factor", help="Qdrant server: replicas acknowledging a write "
                            "[CBMIR_QDRANT_WRITE_CONSISTENCY_FACTOR]")
ReadConsOpt = typer.Option(None, "--read-consistency", help="Qdrant server: all | majority | quorum | N replicas "
                           "answering a read [CBMIR_QDRANT_READ_CONSISTENCY]")
GrpcOpt = typer.Option(None, "--prefer-grpc/--no-prefer-grpc", help="Qdrant server: gRPC instead of REST "
                       "[CBMIR_QDRANT_PREFER_GRPC]")
PrecisionOpt = typer.Option(None, "--precision", help="torch forward pass: auto (bf16 on CUDA, fp32 on CPU) | "
                            "fp32 | bf16 (autocast on CPU too; ~2x faster on CPUs with native bf16) "
                            "[CBMIR_PRECISION]")
CompileOpt = typer.Option(None, "--torch-compile/--no-torch-compile", help="ingest with the ImageNet CNN forward "
                          "pass compiled by torch.compile (~1.5x images/s at 224 px on CPU after a ~30 s compile; "
                          "slower at native 28-64 px; same precision) [CBMIR_TORCH_COMPILE; off]")
ThreadsOpt = typer.Option(None, "--threads", help="torch CPU threads for extraction (1 is often fastest on a busy "
                                                  "CPU) [CBMIR_THREADS; default one per core]")


def _app(**overrides):
    """The application context for this command: settings from ``CBMIR_*`` with the flags on top."""
    from cbmir.app import App, load_settings

    return App(load_settings(**overrides))


def _ref(s, dataset, size, model, backend, aggregation, arch=None, random_init=False, input_size="native"):
    from cbmir.app.collections import ArchiveOptions, CollectionRef

    return CollectionRef(dataset=dataset, size=size, model=model, backend=backend, distance=s.distance,
                         aggregation=aggregation, random_init=random_init, archive=arch or ArchiveOptions(),
                         input_size=_input_size(input_size))


def _notes(notes: list[str]) -> None:
    for note in notes:
        typer.echo(f"note: {note}", err=True)


def _check_output(path: Optional[Path], opt: str = "--output") -> None:
    """Refuse an output file whose folder does not exist before any work is done."""
    from cbmir.app.context import file_on_path

    if path is None:
        return
    parent = Path(path).expanduser().parent
    if not parent.is_dir():
        bad = file_on_path(parent)
        if bad is not None:
            raise CbmirError(f"{opt} {path}: {bad} is a file, not a folder; choose another path")
        raise CbmirError(f"{opt} {path}: folder {parent} does not exist; create it first or choose another path")
    if Path(path).is_dir():
        raise CbmirError(f"{opt} {path} is a directory; give a file path")
    # writable? os.access alone is not enough (root passes it even for /proc), so a file is also
    # created and removed in the folder
    try:
        if not os.access(parent, os.W_OK | os.X_OK) or (Path(path).exists() and not os.access(path, os.W_OK)):
            raise PermissionError("permission denied")
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".cbmir-write-check-"):
            pass
    except OSError as exc:
        raise CbmirError(f"{opt} {path}: cannot write there ({exc.strerror or exc}); choose a writable "
                         "folder") from None


def _print_metrics(title: str, metrics: dict, extra: str = "") -> None:
    keys = list(metrics)
    typer.echo(title)
    typer.echo("  " + "  ".join(f"{k:>7}" for k in keys))
    typer.echo("  " + "  ".join(f"{100 * metrics[k]:7.2f}" for k in keys) + "   (percent)")
    if extra:
        typer.echo(extra)


def _do_ingest(app, ref, weights, recreate, splits, progress=True, evaluable=False, shard=None, index=None):
    """Ingest through the application layer and print what was done."""
    from cbmir.app.ingesting import ingest_collection
    from cbmir.ingest.sources import source_summary

    source, rep = ingest_collection(app, ref, weights=weights, recreate=recreate, splits=splits, progress=progress,
                                    evaluable=evaluable, shard=shard, index=index)
    _print_ingest(app.store, rep, splits)
    _notes(rep.extra.get("notes", []))
    _print_share(rep, shard)
    summary = source_summary(source)
    if summary:
        typer.echo(summary)
        rep.extra["source_summary"] = summary
        rep.extra["skipped_files"] = [str(p) for p in source.problems]
    return rep


def _print_ingest(store, rep, splits) -> None:
    sync = rep.extra.get("sync")
    for split in splits:
        if split in rep.skipped:
            typer.echo(f"{rep.collection} [{split}]: complete, reused ({store.count(rep.collection, split)} points)")
        elif split not in rep.seconds:  # a sync that changed payloads or deleted points, embedding nothing
            typer.echo(f"{rep.collection} [{split}]: updated without embedding ({store.count(rep.collection, split)} "
                       "points)")
        else:
            what = {"train": " (database creation)", "test": " (query extraction)"}.get(split, "")
            sl = rep.extra.get("slices_per_s", {}).get(split)
            sl = f", {rep.extra['slices'][split]} slices, {sl:.1f} slices/s" if sl is not None else ""
            typer.echo(f"{rep.collection} [{split}]{what}: {rep.written[split]} points in {rep.seconds[split]:.1f} s "
                       f"({rep.items_per_s[split]:.1f} items/s{sl})")
    if sync is not None:
        from cbmir.ingest.sync import describe_counts

        typer.echo(f"{rep.collection}: sync: {describe_counts(sync)}; "
                   f"{sum(rep.written.values())} image(s) embedded")
    for split, n_done in rep.resumed_from.items():
        if n_done and split not in rep.skipped and sync is None:
            typer.echo(f"{rep.collection} [{split}]: resumed: {n_done} rows were already stored; "
                       f"{rep.written[split]} missing rows embedded in this run")
    for split, rows in rep.zero_vectors.items():
        more = f", ... (+{len(rows) - 20} more)" if len(rows) > 20 else ""
        rule = ("cosine similarity with them is 0 (they rank last as database points, and as queries "
                "return the lowest rows)" if rep.meta.distance == "cosine" else "Euclidean distances to them "
                "are well defined")
        typer.echo(f"note: {len(rows)} all-zero feature vector(s) in {split} rows "
                   f"[{', '.join(map(str, rows[:20]))}{more}]: stored as zeros; {rule}", err=True)
    if rep.meta.random_init:
        typer.echo("note: RANDOM-INIT weights (smoke test only; not a pretrained result)")


def _print_share(rep, shard) -> None:
    """What a sharded ingest left: the collection's counts and whether other shares are still missing."""
    if rep.extra.get("index_build_s") is not None:
        typer.echo(f"{rep.collection}: built its {rep.meta.index_config().describe()} index in "
                   f"{rep.extra['index_build_s']:.1f} s")
    st = rep.extra.get("share")
    if st is None:
        return
    counts = ", ".join(f"{sp} {a}/{b}" for sp, (a, b) in st["counts"].items())
    merged = f"; {st['merged']} staged points merged" if st["merged"] else ""
    state = ("complete" if st["complete"] else
             "waiting for the other shares (`cbmir verify` names the missing ones)")
    typer.echo(f"{rep.collection}: share {shard} done{merged}; collection {counts}: {state}")


def _report_eval(ev, meta, out: dict, output: Optional[Path]) -> None:
    from cbmir.ingest.extractors import get_spec

    baseline = get_spec(meta.model).baseline
    tag = " [RANDOM-INIT]" if meta.random_init else (" [handcrafted baseline]" if baseline else "")
    splits = "" if (ev.query_split, ev.database_split) == ("test", "train") else \
        f" ({ev.query_split} queries, {ev.database_split} database)"
    loo = (f"  leave-one-out: query split = database split ({ev.query_split}); each query's own point is "
           "excluded from its results\n" if ev.leave_one_out else "")
    unl = (f"  unlabelled (label -1, never relevant): {ev.n_unlabelled_queries} queries left out, "
           f"{ev.n_unlabelled_database} database points\n"
           if ev.n_unlabelled_queries or ev.n_unlabelled_database else "")
    _print_metrics(f"{ev.collection}{tag}: {ev.n_queries} queries x {ev.n_database} database{splits}, "
                   f"{ev.distance}, exact top-{ev.k} on {ev.engine}"
                   + (" (search backend: blas)" if getattr(ev, "search_backend", "store") == "blas" else "")
                   + (f" (the collection's {meta.index_config().name} index bypassed: the study's protocol is exact)"
                      if meta.index_config().approximate else ""), ev.metrics,
                   f"{loo}{unl}  majority-class rate (ACC@1 floor): {100 * ev.majority_class_rate:.2f}%\n"
                   f"  search {ev.timings['search_s']:.2f} s (all {ev.n_queries} queries, batched), "
                   f"latency p50 {ev.timings['latency_p50_ms']:.2f} ms, p95 {ev.timings['latency_p95_ms']:.2f} ms "
                   "(one query at a time, sampled)")
    for w in ev.warnings:
        typer.echo(f"warning: {w}", err=True)
    if output:
        output.write_text(json.dumps(out, indent=2))
        typer.echo(f"wrote {output}")


# ----------------------------------------------------------------------------- commands
@app.command("ingest")
def ingest_cmd(dataset: str = DatasetOpt, size: int = SizeOpt, model: str = ModelOpt,
               weights: Optional[str] = typer.Option(None, "--weights", help="local weights file or directory"),
               random_init: bool = typer.Option(False, "--random-init", help="random weights (tests/smoke runs only)"),
               backend: str = BackendOpt, distance: Optional[str] = DistanceOpt,
               volume_aggregation: str = AggOpt,
               splits: str = typer.Option("train,test", "--splits", help="comma-separated splits"),
               recreate: bool = typer.Option(False, "--recreate", help=RECREATE_HELP),
               data_dir: Optional[Path] = DataDirOpt, store_path: Optional[Path] = StoreOpt,
               qdrant_url: Optional[str] = UrlOpt,
               device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda [CBMIR_DEVICE]"),
               batch_size: Optional[int] = typer.Option(None, "--batch-size", help="[CBMIR_BATCH_SIZE]"),
               threads: Optional[int] = ThreadsOpt, precision: Optional[str] = PrecisionOpt,
               torch_compile: Optional[bool] = CompileOpt,
               source: Optional[str] = SourceOpt, name: Optional[str] = NameOpt, strict: bool = StrictOpt,
               intensity: Optional[str] = IntensityOpt, window: Optional[str] = WindowOpt,
               slice_axis: Optional[int] = SliceAxisOpt, dicom_mode: str = DicomModeOpt,
               fit: str = FitOpt, input_size: str = InputSizeOpt, shard: Optional[str] = ShardOpt,
               index: Optional[str] = IndexOpt,
               quantization: Optional[str] = QuantOpt, hnsw_m: Optional[int] = HnswMOpt,
               hnsw_ef_construct: Optional[int] = HnswEfcOpt, hnsw_ef: Optional[int] = HnswEfOpt,
               rescore: Optional[bool] = RescoreOpt, oversampling: Optional[float] = OversamplingOpt,
               shard_number: Optional[int] = ShardNumberOpt, replication_factor: Optional[int] = ReplicationOpt,
               write_consistency_factor: Optional[int] = WriteConsOpt, read_consistency: Optional[str] = ReadConsOpt,
               prefer_grpc: Optional[bool] = GrpcOpt) -> None:
    """Embed a dataset's splits and upsert them into its collection (idempotent, resumable; --shard i/n: one
    share of it, for n parallel workers)."""
    from cbmir.ingest.shards import parse_share
    from cbmir.search.index_config import index_config

    share = parse_share(shard)  # checked before any work
    mode = index_config(index, quantization, m=hnsw_m, ef_construct=hnsw_ef_construct, ef=hnsw_ef, rescore=rescore,
                        oversampling=oversampling)
    with _app(data_dir=data_dir, store_path=store_path, qdrant_url=qdrant_url, device=device,
              batch_size=batch_size, distance=distance, threads=threads, precision=precision,
              torch_compile=torch_compile, qdrant_shard_number=shard_number,
              qdrant_replication_factor=replication_factor,
              qdrant_write_consistency_factor=write_consistency_factor,
              qdrant_read_consistency=read_consistency, qdrant_prefer_grpc=prefer_grpc) as a:
        ref = _ref(a.settings, dataset, size, model, backend, volume_aggregation,
                   _arch(source, name, strict, intensity, window, slice_axis, dicom_mode, fit),
                   random_init, input_size=input_size)
        _do_ingest(a, ref, weights, recreate, tuple(x.strip() for x in splits.split(",") if x.strip()),
                   shard=share, index=mode)


@app.command("evaluate")
def evaluate_cmd(dataset: str = DatasetOpt, size: int = SizeOpt, model: str = ModelOpt, backend: str = BackendOpt,
                 distance: Optional[str] = DistanceOpt, volume_aggregation: str = AggOpt,
                 k: int = typer.Option(5, "--k"), output: Optional[Path] = typer.Option(None, "--output", "-o"),
                 store_path: Optional[Path] = StoreOpt, qdrant_url: Optional[str] = UrlOpt,
                 source: Optional[str] = SourceOpt, name: Optional[str] = NameOpt,
                 dicom_mode: str = DicomModeOpt, search_backend: str = SearchBackendOpt,
                 random_init: bool = RandomInitReadOpt, input_size: str = InputSizeOpt,
                 query_split: str = typer.Option("test", "--query-split", help="split whose points are the queries"),
                 database_split: str = typer.Option("train", "--database-split",
                                                    help="split searched; the query split too: leave-one-out")) -> None:
    """Query every test point against the train points of a collection; print the study's metrics.

    With --query-split equal to --database-split the evaluation is leave-one-out (each query's own
    point is excluded from its results)."""
    from cbmir.app.collections import open_collection
    from cbmir.app.evaluating import check_k, evaluate, result_dict

    check_k(k)
    _check_output(output)
    with _app(store_path=store_path, qdrant_url=qdrant_url, distance=distance) as a:
        ref = _ref(a.settings, dataset, size, model, backend, volume_aggregation,
                   _arch(source, name, dicom_mode=dicom_mode), random_init, input_size=input_size)
        name, meta = open_collection(a.store, ref)
        ev, notes = evaluate(a, name, k=k, search_backend=search_backend, query_split=query_split,
                             database_split=database_split)
        _notes(notes)
        _report_eval(ev, meta, result_dict(ev, meta), output)

@app.command("run")
def run_cmd(dataset: str = DatasetOpt, size: int = SizeOpt, model: str = ModelOpt,
            weights: Optional[str] = typer.Option(None, "--weights", help="local weights file or directory"),
            random_init: bool = typer.Option(False, "--random-init", help="random weights (tests/smoke runs only)"),
            backend: str = BackendOpt, distance: Optional[str] = DistanceOpt, volume_aggregation: str = AggOpt,
            k: int = typer.Option(5, "--k"), recreate: bool = typer.Option(False, "--recreate", help=RECREATE_HELP),
            output: Optional[Path] = typer.Option(None, "--output", "-o", help="write the result JSON here"),
            data_dir: Optional[Path] = DataDirOpt, store_path: Optional[Path] = StoreOpt,
            qdrant_url: Optional[str] = UrlOpt, device: Optional[str] = typer.Option(None, "--device"),
            batch_size: Optional[int] = typer.Option(None, "--batch-size"), threads: Optional[int] = ThreadsOpt,
            precision: Optional[str] = PrecisionOpt, torch_compile: Optional[bool] = CompileOpt,
            source: Optional[str] = SourceOpt, name: Optional[str] = NameOpt, strict: bool = StrictOpt,
            intensity: Optional[str] = IntensityOpt, window: Optional[str] = WindowOpt,
            slice_axis: Optional[int] = SliceAxisOpt, dicom_mode: str = DicomModeOpt,
            fit: str = FitOpt, search_backend: str = SearchBackendOpt, input_size: str = InputSizeOpt) -> None:
    """Ingest (train = database, test = queries), then evaluate: the study's protocol in one command."""
    from cbmir.app.evaluating import check_k, evaluate, result_dict
    from cbmir.evaluation.evaluate import SEARCH_BACKENDS

    check_k(k)  # before the ingest (minutes), not after it
    if search_backend not in SEARCH_BACKENDS:
        raise CbmirError(f"unknown --search-backend {search_backend!r}; valid: {', '.join(SEARCH_BACKENDS)}")
    _check_output(output)
    with _app(data_dir=data_dir, store_path=store_path, qdrant_url=qdrant_url, device=device,
              batch_size=batch_size, distance=distance, threads=threads, precision=precision,
              torch_compile=torch_compile) as a:
        ref = _ref(a.settings, dataset, size, model, backend, volume_aggregation,
                   _arch(source, name, strict, intensity, window, slice_axis, dicom_mode, fit),
                   random_init, input_size=input_size)
        t0 = time.perf_counter()
        rep = _do_ingest(a, ref, weights, recreate, ("train", "test"), evaluable=True)
        t_ingest = time.perf_counter() - t0
        ev, notes = evaluate(a, rep.collection, k=k, search_backend=search_backend)
        _notes(notes)
        _report_eval(ev, rep.meta, result_dict(ev, rep.meta, rep, t_ingest), output)

@app.command("search")
def search_cmd(collection: Optional[str] = typer.Option(None, "--collection", "-c",
                                                        help="collection name (or --dataset/--size/--model)"),
               query_index: Optional[int] = typer.Option(None, "--query-index", help="row of a stored point"),
               query_path: Optional[str] = typer.Option(None, "--query-path", help="a stored point by its file: "
                                                        "path relative to the archive folder (or an added file)"),
               query_split: str = typer.Option("test", "--query-split"),
               database_split: str = typer.Option("train", "--database-split", help="split searched"),
               exclude_self: Optional[bool] = typer.Option(
                   None, "--exclude-self/--include-self",
                   help="leave a stored query point out of its own results, by point id (not by score: an "
                        "identical copy still shows) [default: excluded]"),
               image: Optional[Path] = typer.Option(None, "--image", help="image / volume file to embed and search"),
               filter_json: Optional[str] = typer.Option(None, "--filter", help='payload filter as JSON, e.g. '
                                                         '\'{"label": [0, 2]}\' (equality / any-of)'),
               as_json: bool = typer.Option(False, "--json", help="print the answer as JSON"),
               gallery: Optional[Path] = typer.Option(None, "--gallery", help="also write the query and its "
                                                      "top-k as one PNG (class names, scores, ✓/✗)"),
               weights: Optional[str] = typer.Option(None, "--weights"),
               k: int = typer.Option(5, "--k"), store_path: Optional[Path] = StoreOpt,
               qdrant_url: Optional[str] = UrlOpt,
               dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="instead of --collection: "
                                                     "MedMNIST flag or user archive (with --size, --model)"),
               size: int = SizeOpt, model: Optional[str] = typer.Option(None, "--model", "-m"),
               backend: str = BackendOpt, distance: Optional[str] = DistanceOpt, volume_aggregation: str = AggOpt,
               source: Optional[str] = SourceOpt, name: Optional[str] = NameOpt,
               intensity: Optional[str] = IntensityOpt, window: Optional[str] = WindowOpt,
               slice_axis: Optional[int] = SliceAxisOpt, dicom_mode: str = DicomModeOpt,
               fit: str = FitOpt, random_init: bool = RandomInitReadOpt, input_size: str = InputSizeOpt,
               exact: bool = typer.Option(False, "--exact", help="exact search even on an approximate (HNSW / "
                                          "quantized) collection"),
               ef: Optional[int] = typer.Option(None, "--ef", help="HNSW collection: query-time candidate list "
                                                "[the collection's]")) -> None:
    """Top-k database images for a stored point (``--query-index``, or ``--query-path`` of an archive file) or a
    file (``--image``: any image format, DICOM, NIfTI/.npy for 3D collections; read with the same pixel rules as
    ingest)."""
    from cbmir.app import FileOptions, SearchRequest, open_collection, search

    if sum(q is not None for q in (query_index, query_path, image)) != 1:
        raise CbmirError("give exactly one of --query-index N, --query-path REL or --image PATH")
    if collection is not None and (dataset is not None or model is not None):
        raise CbmirError("give either --collection NAME or --dataset with --size and --model, not both")
    if collection is None and (dataset is None or model is None):
        raise CbmirError("give --collection NAME, or --dataset with --size and --model")
    flt = _parse_filter_option(filter_json)
    _check_output(gallery, "--gallery")
    with _app(store_path=store_path, qdrant_url=qdrant_url, distance=distance) as a:
        if collection is None:  # resolved from --dataset: the archive must be the one ingested
            ref = _ref(a.settings, dataset, size, model, backend, volume_aggregation,
                       _arch(source, name, dicom_mode=dicom_mode), random_init, input_size=input_size)
            collection, _ = open_collection(a.store, ref)
        if query_path is not None:
            from cbmir.app.items import point_of_path

            query_ids = [point_of_path(a.store, collection, query_path, prefer_split=query_split)]
        req = SearchRequest(collection=collection, k=k, database_split=database_split, filter=flt,
                            exclude_self=exclude_self, distance=distance, weights=weights,
                            point_ids=query_ids if query_path is not None else None,
                            points=[(query_split, query_index)] if query_index is not None else None,
                            files=[image] if image is not None else None,
                            file_options=FileOptions(intensity=intensity, window=window, slice_axis=slice_axis,
                                                     fit=fit), exact=exact or None, ef=ef)
        answer = search(a, req)
        if gallery is not None:
            _write_gallery(a, answer, req, gallery)
    if as_json:
        typer.echo(json.dumps(answer.to_dict(), indent=1))
        return
    _print_answer(answer)


def _write_gallery(a, answer, req, path: Path) -> None:
    """``--gallery``: the query (a stored point's image, or the query file as embedded) and its hits."""
    from cbmir.app.images import gallery_png
    from cbmir.core.files import atomic_write
    from cbmir.ingest.sources import load_query

    pixels = None
    if req.files:
        o = req.file_options
        pixels = load_query(req.files[0], a.store.meta(answer.collection), intensity=o.intensity, window=o.window,
                            slice_axis=o.slice_axis, fit=o.fit)[0]
    png = gallery_png(a, answer, query_pixels=pixels)
    atomic_write(path, lambda fh: fh.write(png))
    typer.echo(f"wrote {path}", err=True)


def _parse_filter_option(text: Optional[str]):
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CbmirError(f"--filter {text!r} is not JSON ({exc.msg}); give e.g. '{{\"label\": [0, 2]}}'") from None


def _print_answer(answer) -> None:
    """The hits of the first query as a table: class names, scores, and ✓/✗ against a known query label;
    then the class vote of the top-k (:func:`cbmir.app.summary.vote_summary`, as the service's summary)."""
    from cbmir.app.summary import vote_summary

    q = answer.queries[0]
    what = (f"{q.split} row {q.index} (point {q.point_id}), label {q.label}"
            + (f" ({q.class_name})" if q.class_name not in (None, str(q.label)) else "")
            if q.kind == "point" else f"{q.kind} {q.source or ''}".strip())
    excl = ", query excluded from its results" if answer.excluded_self else ""
    flt = f", filter {json.dumps(answer.filter)}" if answer.filter else ""
    mode = "" if answer.search_mode == "exact" else f", APPROXIMATE {answer.search_mode}"
    typer.echo(f"query: {what}; top-{answer.k} of {answer.collection} [{answer.database_split}{flt}], "
               f"{answer.distance}{excl}{mode}")
    known = q.label is not None and q.label >= 0
    typer.echo(f"{'rank':>4} {'index':>7} {'label':>5} {'class':<16} {'score':>10} {'':1}  image_id")
    for h in answer.hits[0]:
        mark = ("✓" if h.label == q.label else "✗") if known else ""
        typer.echo(f"{h.rank:>4} {h.index:>7} {h.label:>5} {str(h.class_name or ''):<16.16} {h.score:>10.6f} "
                   f"{mark:1}  {h.payload.get('image_id', '')}")
    vote = vote_summary(answer.hits[0], q.label)
    if vote.majority_label is not None:
        agree = {True: ": the query's class is among the most voted",
                 False: ": the query's class is not among the most voted"}.get(vote.query_label_in_majority, "")
        typer.echo(f"vote: {', '.join(f'{n} {c}' for c, n in vote.votes.items())}; majority "
                   f"{vote.majority_class_name}{agree}")
    for note in answer.notes:
        typer.echo(f"note: {note}", err=True)


@app.command("export")
def export_cmd(dataset: str = DatasetOpt, size: int = SizeOpt, model: str = ModelOpt, backend: str = BackendOpt,
               distance: Optional[str] = DistanceOpt, volume_aggregation: str = AggOpt,
               output: Path = typer.Option(..., "--output", "-o", help="npz file to write"),
               store_path: Optional[Path] = StoreOpt, qdrant_url: Optional[str] = UrlOpt,
               source: Optional[str] = SourceOpt, name: Optional[str] = NameOpt,
               dicom_mode: str = DicomModeOpt, random_init: bool = RandomInitReadOpt,
               input_size: str = InputSizeOpt) -> None:
    """Write a collection's vectors read back from the store: ``train_vectors`` (N, D) float32,
    ``train_labels`` (N,), ``test_vectors``, ``test_labels``, rows in split order."""
    from cbmir.app.collections import open_collection

    if not str(output).endswith(".npz"):  # numpy.savez appends it: name (and check) the file it writes
        output = Path(f"{output}.npz")
    _check_output(output)
    arrays = {}
    with _app(store_path=store_path, qdrant_url=qdrant_url, distance=distance) as a:
        ref = _ref(a.settings, dataset, size, model, backend, volume_aggregation,
                   _arch(source, name, dicom_mode=dicom_mode), random_init, input_size=input_size)
        name, _ = open_collection(a.store, ref)
        for split in ("train", "test"):
            idx, vec, pay = a.store.fetch(name, split)
            arrays[f"{split}_vectors"] = vec
            arrays[f"{split}_labels"] = np.asarray([p["label"] for p in pay], dtype=np.int64)
            arrays[f"{split}_indices"] = idx
    np.savez(output, **arrays)
    typer.echo(f"wrote {output}: " + ", ".join(f"{k} {v.shape}" for k, v in arrays.items()))

@app.command("verify")
def verify_cmd(dataset: str = DatasetOpt, size: int = SizeOpt, model: str = ModelOpt, backend: str = BackendOpt,
               distance: Optional[str] = DistanceOpt, volume_aggregation: str = AggOpt,
               data_dir: Optional[Path] = DataDirOpt, store_path: Optional[Path] = StoreOpt,
               qdrant_url: Optional[str] = UrlOpt, random_init: bool = RandomInitReadOpt,
               input_size: str = InputSizeOpt) -> None:
    """Check a collection against its source: counts per split, duplicate ids, labels, dims, non-finite
    vectors. Prints one line, ``OK ...`` (exit 0) or ``FAIL: <problems>`` (exit 1)."""
    from cbmir.app.collections import randinit_hint, resolve_name
    from cbmir.evaluation.verify import verify_collection
    from cbmir.ingest.sources import open_source

    with _app(data_dir=data_dir, store_path=store_path, qdrant_url=qdrant_url, distance=distance) as a:
        name = resolve_name(_ref(a.settings, dataset, size, model, backend, volume_aggregation,
                                 random_init=random_init, input_size=input_size))
        source = open_source(dataset, size, data_dir=a.settings.data_dir)
        rep = verify_collection(a.store, name, source)
        hint = "" if rep.ok else randinit_hint(a.store, name, random_init)
    typer.echo(rep.verdict() + hint)
    raise typer.Exit(0 if rep.ok else 1)

# ----------------------------------------------------------------------------- living archives
def _parse_meta(items: Optional[list[str]]) -> dict:
    """``--meta key=value`` pairs; a value that reads as a JSON number or boolean is stored as one."""
    out = {}
    for it in items or []:
        key, sep, value = it.partition("=")
        if not sep or not key.strip():
            raise CbmirError(f"--meta {it!r}: give key=value (e.g. --meta site=vienna)")
        try:
            v = json.loads(value)
            out[key.strip()] = v if isinstance(v, (int, float, bool)) else value
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


@app.command("add")
def add_cmd(files: list[Path] = typer.Argument(..., help="image / volume files to add"),
            collection: str = typer.Option(..., "--collection", "-c", help="collection name"),
            label: Optional[str] = typer.Option(None, "--label", help="a class of the collection (name or id); "
                                                "files of the archive: from the archive"),
            split: Optional[str] = typer.Option(None, "--split", help="train (the database; default) | test | val"),
            meta: Optional[list[str]] = typer.Option(None, "--meta", help="payload field key=value (repeat)"),
            weights: Optional[str] = typer.Option(None, "--weights", help="local weights file or directory"),
            store_path: Optional[Path] = StoreOpt, qdrant_url: Optional[str] = UrlOpt) -> None:
    """Embed and add single files to a user-archive collection (files of its archive as the archive says;
    other files as added points that `cbmir ingest` keeps)."""
    from cbmir.app.items import NewPoint, add_points

    fields = _parse_meta(meta)
    with _app(store_path=store_path, qdrant_url=qdrant_url) as a:
        res = add_points(a, collection, [NewPoint(file=f, label=label, split=split, meta=fields) for f in files],
                         weights=weights)
        total = a.store.count(collection)
    for pt in res.points:
        typer.echo(f"{pt['status']:<10} {pt['split']:<5} point {pt['point_id']} (index {pt['index']}) "
                   f"{pt['source_path']}")
    typer.echo(f"{collection}: {res.embedded} image(s) embedded; {total} points")
    _notes(res.notes)


@app.command("delete")
def delete_cmd(collection: str = typer.Option(..., "--collection", "-c", help="collection name"),
               point_id: Optional[list[int]] = typer.Option(None, "--point-id", help="point id (repeat)"),
               path: Optional[list[str]] = typer.Option(None, "--path", help="file of a point: relative to the "
                                                        "archive folder, or an added file's path (repeat)"),
               store_path: Optional[Path] = StoreOpt, qdrant_url: Optional[str] = UrlOpt) -> None:
    """Delete points of a user-archive collection by id or by file path."""
    from cbmir.app.items import delete_points

    with _app(store_path=store_path, qdrant_url=qdrant_url) as a:
        res = delete_points(a, collection, point_ids=point_id or (), paths=path or ())
        total = a.store.count(collection)
    for pid, src in zip(res.deleted, res.source_paths):
        typer.echo(f"deleted point {pid} {src}")
    typer.echo(f"{collection}: {len(res.deleted)} point(s) deleted; {total} points")
    _notes(res.notes)


collections_app = typer.Typer(help="List collections (no sub-command), describe or delete one.",
                              invoke_without_command=True, no_args_is_help=False)
app.add_typer(collections_app, name="collections")


def _size_text(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "-"


def _tag(row: dict) -> str:
    tags = [t for t, on in (("RANDOM-INIT", row.get("random_init")), ("baseline", row.get("baseline")),
                            ("sync pending", row.get("sync_pending")), ("staging", row.get("staging"))) if on]
    return ", ".join(tags)


@collections_app.callback()
def collections_cmd(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="machine-readable"),
                    store_path: Optional[Path] = StoreOpt, qdrant_url: Optional[str] = UrlOpt) -> None:
    """Every collection: name, model, size, dim, distance, points per split, disk size, RANDOM-INIT / baseline."""
    from cbmir.app.manage import list_collections

    if ctx.invoked_subcommand is not None:
        ctx.obj = {"store_path": store_path, "qdrant_url": qdrant_url}
        return
    with _app(store_path=store_path, qdrant_url=qdrant_url) as a:
        rows = list_collections(a)
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    typer.echo(f"{'name':<36} {'model':<16} {'size':>4} {'dim':>7} {'distance':<9} {'train/val/test':<18} "
               f"{'disk':>9}  note")
    for r in rows:
        if "damaged" in r:
            typer.echo(f"{r['name']:<36} DAMAGED: {r['damaged']}")
            continue
        c = r["counts"]
        pts = "/".join(str(c.get(sp, 0)) for sp in ("train", "val", "test"))
        typer.echo(f"{r['name']:<36} {r['model']:<16} {r['size']:>4} {r['dim']:>7} {r['distance']:<9} {pts:<18} "
                   f"{_size_text(r['disk_bytes']):>9}  {_tag(r)}")
    if not rows:
        typer.echo("(no collections)")


def _store_opts(ctx: typer.Context, store_path, qdrant_url) -> dict:
    parent = (ctx.obj or {}) if ctx is not None else {}
    return {"store_path": store_path or parent.get("store_path"), "qdrant_url": qdrant_url or parent.get("qdrant_url")}


@collections_app.command("info")
def collections_info_cmd(ctx: typer.Context, name: str = typer.Argument(..., help="collection name"),
                         as_json: bool = typer.Option(False, "--json", help="machine-readable"),
                         store_path: Optional[Path] = StoreOpt, qdrant_url: Optional[str] = UrlOpt) -> None:
    """Everything recorded about one collection."""
    from cbmir.app.manage import describe_collection

    with _app(**_store_opts(ctx, store_path, qdrant_url)) as a:
        info = describe_collection(a, name)
    if as_json:
        typer.echo(json.dumps(info, indent=1))
        return
    for key, value in info.items():
        if key == "disk_bytes":
            value = _size_text(value)
        typer.echo(f"{key:<14} {value if not isinstance(value, (dict, list)) else json.dumps(value)}")


@collections_app.command("delete")
def collections_delete_cmd(ctx: typer.Context, name: str = typer.Argument(..., help="collection name"),
                           yes: bool = typer.Option(False, "--yes", "-y", help="do not ask"),
                           store_path: Optional[Path] = StoreOpt, qdrant_url: Optional[str] = UrlOpt) -> None:
    """Delete a collection and all its points (asks first; --yes skips the question)."""
    from cbmir.app.manage import delete_collection, describe_collection

    with _app(**_store_opts(ctx, store_path, qdrant_url)) as a:
        info = describe_collection(a, name)
        if not yes:
            n = sum(info["counts"].values())
            try:
                ok = typer.confirm(f"delete collection {name!r} ({n} points, {_size_text(info['disk_bytes'])})?")
            except (typer.Abort, EOFError, OSError):  # no answer (end of input, no terminal): no
                ok = False
            if not ok:
                typer.echo(f"not deleted: {name} (pass --yes to delete without asking)")
                raise typer.Exit(1)
        n = delete_collection(a, name)
    typer.echo(f"deleted collection {name} ({n} points)")


@app.command("snapshot")
def snapshot_cmd(name: str = typer.Argument(..., help="collection name"),
                 output: Path = typer.Option(..., "--output", "-o", help="snapshot file to write"),
                 store_path: Optional[Path] = StoreOpt, qdrant_url: Optional[str] = UrlOpt) -> None:
    """Write a collection (embedded shard + metadata) as one checksummed archive file."""
    from cbmir.app.manage import snapshot_collection

    with _app(store_path=store_path, qdrant_url=qdrant_url) as a:
        info = snapshot_collection(a, name, output)
    pts = ", ".join(f"{sp} {n}" for sp, n in info.counts.items())
    typer.echo(f"wrote {info.path}: collection {name} ({pts}; {info.files} files, {_size_text(info.bytes)}), "
               f"sha256 {info.sha256}")


@app.command("restore")
def restore_cmd(snapshot: Path = typer.Argument(..., help="snapshot file (`cbmir snapshot`)"),
                name: Optional[str] = typer.Option(None, "--name", help="collection name [the snapshot's]"),
                store_path: Optional[Path] = StoreOpt, qdrant_url: Optional[str] = UrlOpt) -> None:
    """Restore a collection from a snapshot file (checksums and member paths checked first)."""
    from cbmir.app.manage import restore_collection

    with _app(store_path=store_path, qdrant_url=qdrant_url) as a:
        restored, manifest = restore_collection(a, snapshot, name)
    counts = manifest.get("counts") or {}
    pts = ", ".join(f"{sp} {counts[sp]}" for sp in ("train", "val", "test") if sp in counts)
    typer.echo(f"restored collection {restored} ({pts}) from {snapshot}")


@app.command("models")
def models_cmd(as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
               check: bool = typer.Option(False, "--check", help="weights sanity check: every model with local "
                                          "pretrained weights classifies two photographs through its own "
                                          "preprocessing (a cat, an espresso); one PASS/FAIL/skipped line each; "
                                          "exit 1 on a FAIL")) -> None:
    """List the extractor registry: name, family, dim, backends, input policy, weights source, licence."""
    from cbmir.ingest.extractors import list_specs, weights_available

    if check:
        _models_check(as_json)
        return

    rows = [{"name": sp.name, "family": sp.family, "dim": sp.dim, "backends": list(sp.backends),
             "input_policy": sp.input_policy, "weights_source": sp.weights_source, "licence": sp.licence,
             "weights_available_locally": weights_available(sp),
             "weights_available_by_backend": {b: weights_available(sp, b) for b in sp.backends},
             "display_name": sp.display_name, "baseline": sp.baseline,
             "weights": dataclasses.asdict(sp.weights_cfg), "preprocessing": dataclasses.asdict(sp.preprocess_cfg)}
            for sp in list_specs()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    w = max(16, *(len(r["name"]) for r in rows))
    typer.echo(f"{'name':<{w}} {'family':<27} {'dim':>5}  {'backends':<12} {'local weights':<17} source")
    for r in rows:
        local = ",".join(f"{b}:{'yes' if ok else 'no'}" for b, ok in r["weights_available_by_backend"].items()) \
            if len(r["backends"]) > 1 else ("yes" if r["weights_available_locally"] else "no")
        typer.echo(f"{r['name']:<{w}} {r['family']:<27} {r['dim']:>5}  {','.join(r['backends']):<12} "
                   f"{local:<17} {r['weights_source']}")
        typer.echo(f"{'':<{w}} input: {r['input_policy']}")
        typer.echo(f"{'':<{w}} licence: {r['licence']}")


def _models_check(as_json: bool) -> None:
    """``cbmir models --check``: :func:`cbmir.ingest.extractors.sanity.check_models`, one line per model."""
    from cbmir.ingest.extractors.sanity import FAIL, check_models

    results = check_models()
    if as_json:
        typer.echo(json.dumps([vars(r) for r in results], indent=2))
    for r in ([] if as_json else results):
        typer.echo(r.line())
    if any(r.status == FAIL for r in results):
        raise typer.Exit(1)


@app.command("benchmark")
def benchmark_cmd(
        config: Optional[Path] = typer.Option(None, "--config", help="grid file (.yaml/.yml/.toml); flags override it"),
        datasets: Optional[str] = typer.Option(None, "--datasets", help="comma-separated MedMNIST flags"),
        models: Optional[str] = typer.Option(None, "--models", help="comma-separated extractor names"),
        sizes: Optional[str] = typer.Option(None, "--sizes", help="comma-separated sizes, e.g. 28,64 [28]"),
        backends: Optional[str] = typer.Option(None, "--backends", help="comma-separated: torch,keras [torch]"),
        distances: Optional[str] = typer.Option(None, "--distances", help="cosine,euclidean [cosine]"),
        input_sizes: Optional[str] = typer.Option(None, "--input-sizes", help="ImageNet CNNs: comma-separated "
                                                  "native and/or sides, e.g. native,224 [native]"),
        random_init: Optional[bool] = typer.Option(None, "--random-init/--pretrained",
                                                   help="random CNN weights (smoke runs; labelled RANDOM-INIT)"),
        results: Optional[Path] = typer.Option(None, "--results", help="results CSV [results/results.csv]"),
        save_per_query: Optional[bool] = typer.Option(None, "--save-per-query/--no-save-per-query",
                                                      help="write per-query top-k npz per cell (for CIs/tests)"),
        retry_failed: Optional[bool] = typer.Option(None, "--retry-failed/--skip-failed",
                                                    help="re-run cells recorded as failed [retry]"),
        k: Optional[int] = typer.Option(None, "--k"),
        volume_aggregation: Optional[str] = typer.Option(None, "--volume-aggregation"),
        download: Optional[bool] = typer.Option(None, "--download/--no-download"),
        data_dir: Optional[Path] = DataDirOpt, store_path: Optional[Path] = StoreOpt,
        qdrant_url: Optional[str] = UrlOpt, device: Optional[str] = typer.Option(None, "--device"),
        batch_size: Optional[int] = typer.Option(None, "--batch-size"),
        threads: Optional[int] = ThreadsOpt, precision: Optional[str] = PrecisionOpt,
        torch_compile: Optional[bool] = CompileOpt,
        progress: Optional[bool] = typer.Option(None, "--progress/--no-progress")) -> None:
    """Run a grid of datasets x sizes x models (x backends x distances); resumable, one tidy results CSV."""
    from cbmir.grid import config_from_cli, parse_list, run_grid

    cfg = config_from_cli(
        config, datasets=parse_list(datasets), models=parse_list(models), sizes=parse_list(sizes),
        backends=parse_list(backends), distances=parse_list(distances), input_sizes=parse_list(input_sizes),
        random_init=random_init,
        results=results, save_per_query=save_per_query, retry_failed=retry_failed, k=k,
        volume_aggregation=volume_aggregation, download=download, data_dir=data_dir, store_path=store_path,
        qdrant_url=qdrant_url, device=device, batch_size=batch_size, threads=threads, precision=precision,
        torch_compile=torch_compile, progress=progress)
    summary = run_grid(cfg)
    typer.echo(f"grid: {len(summary.cells)} cells: {len(summary.ran)} ran, {len(summary.failed)} failed, "
               f"{len(summary.skipped)} skipped (already in the table) -> {summary.results}")
    for cell, err in summary.failed:
        typer.echo(f"  failed {cell.label()}: {err}")


@app.command("report")
def report_cmd(
        results: Optional[list[Path]] = typer.Option(None, "--results",
                                                     help="results CSV of `cbmir benchmark`; repeat to merge "
                                                          "tables (a later table wins a shared cell); omit for "
                                                          "the published tables only"),
        output: Path = typer.Option(Path("reports"), "--output", "-o", help="output directory"),
        store_path: Optional[Path] = typer.Option(None, "--store-path",
                                                  help="store for the t-SNE figure [the rows' store]"),
        qdrant_url: Optional[str] = UrlOpt,
        tsne_collection: Optional[str] = typer.Option(None, "--tsne-collection",
                                                      help="collection of the t-SNE figure [best 2D ACC@1 row]"),
        tsne: bool = typer.Option(True, "--tsne/--no-tsne", help="draw the t-SNE figure (Figure 11)"),
        n_boot: int = typer.Option(2000, "--n-boot", help="bootstrap resamples for CIs and paired tests"),
        gallery: bool = typer.Option(True, "--gallery/--no-gallery",
                                     help="query galleries: per collection with a per-query file, its best and worst "
                                          "queries with their top-k (images from CBMIR_DATA_DIR or the archive)"),
        gallery_n: int = typer.Option(3, "--gallery-n", help="best and worst queries per gallery (each)")) -> None:
    """Markdown report with figures (300 dpi PNG + vector PDF): ours first (Tables S1-S4, 3-7, Figures 3-11 and a
    cross-dataset figure, beside the paper's values, query galleries), the study's published tables in an
    appendix."""
    from cbmir.app.report_images import ReportImages
    from cbmir.evaluation.report import build_report

    if n_boot < 1:  # before any work (tables, figures, t-SNE)
        raise CbmirError(f"--n-boot {n_boot}: must be an integer >= 1 (bootstrap resamples, e.g. 2000)")
    if gallery and gallery_n < 1:
        raise CbmirError(f"--gallery-n {gallery_n}: must be an integer >= 1 (best / worst queries, e.g. 3)")
    op = Path(output).expanduser()
    from cbmir.app.context import file_on_path

    bad = file_on_path(op)
    if bad is not None:
        what = "is a file" if bad == op else f"is inside {bad}, which is a file"
        raise CbmirError(f"--output {output} {what}; give a directory (created if missing)")
    with ReportImages(store_path=store_path, qdrant_url=qdrant_url) as images:
        out = build_report(results or None, output, store_path=store_path, qdrant_url=qdrant_url,
                           tsne_collection=tsne_collection, tsne=tsne, n_boot=n_boot, gallery=gallery,
                           gallery_n=gallery_n, images=images)
    typer.echo(f"wrote {out.markdown} ({len(out.figures)} figures, {len(out.galleries)} galleries)")
    for note in out.notes:
        typer.echo(f"  note: {note}")


@app.command("bench")
def bench_cmd(quick: bool = typer.Option(False, "--quick", help="scaled-down sizes, under two minutes"),
              work_dir: Optional[Path] = typer.Option(None, "--work-dir", help="folder for the synthetic store and "
                                                      "npz (full run: ~14 GB free) [system temp]"),
              only: Optional[str] = typer.Option(None, "--only", help="comma-separated sections: search, ingest"),
              extract: bool = typer.Option(False, "--extract", help="also measure CNN extraction images/s"),
              output: Optional[Path] = typer.Option(None, "--output", "-o", help="write all figures as JSON"),
              keep: bool = typer.Option(False, "--keep", help="keep the synthetic files")) -> None:
    """Speed and memory at the study's largest scale (PathMNIST-sized), each beside its reference."""
    from cbmir.benchmarks.bench import run_bench

    run_bench(quick=quick, work_dir=work_dir, sections=[x.strip() for x in only.split(",")] if only else None,
              extract=extract, json_out=output, keep=keep)


@app.command("serve")
def serve_cmd(host: str = typer.Option("127.0.0.1", "--host", help="address to listen on; anything but loopback "
                                       "needs an API key"),
              port: int = typer.Option(8000, "--port"),
              store_path: Optional[Path] = StoreOpt, qdrant_url: Optional[str] = UrlOpt,
              data_dir: Optional[Path] = DataDirOpt,
              api_key: Optional[str] = typer.Option(None, "--api-key", envvar="CBMIR_API_KEY", show_envvar=False,
                                                    help="require this key on /api (X-API-Key or Authorization: "
                                                         "Bearer); prefer the variable CBMIR_API_KEY"),
              max_upload_mb: float = typer.Option(32.0, "--max-upload-mb", help="larger uploads get 413"),
              idle_release_s: float = typer.Option(5.0, "--idle-release-s",
                                                   help="release embedded-store collections after this many idle "
                                                        "seconds so other cbmir commands can use them (0: never)"),
              device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda [CBMIR_DEVICE]")) -> None:
    """HTTP search service: JSON API under /api, OpenAPI at /openapi.json, docs at /docs (README "Search service")."""
    from cbmir.app import load_settings
    from cbmir.service import ServiceConfig, check_bind, serve

    config = ServiceConfig(api_key=api_key or None, max_upload_bytes=int(max_upload_mb * 1024 * 1024),
                           idle_release_s=idle_release_s)
    check_bind(host, config.api_key)  # before the store is opened
    settings = load_settings(store_path=store_path, qdrant_url=qdrant_url, data_dir=data_dir, device=device)
    serve(settings, config, host=host, port=port)


def main() -> None:
    """Console-script entry point: run the CLI, turning CbmirError into one clear line and exit code 2."""
    # typer >= 0.29 vendors click: its usage errors are typer.TyperException subclasses (ClickException,
    # with .show() and .exit_code), not click's own classes; typer.Exit / typer.Abort are its public aliases
    try:
        rc = app(standalone_mode=False)
        if rc == 130:  # typer turns KeyboardInterrupt (Ctrl-C) into a returned Exit(130) when not standalone
            typer.echo("interrupted: re-run the same command to resume", err=True)
        if isinstance(rc, int) and rc:  # click returns (not raises) typer.Exit codes when not standalone
            sys.exit(rc)
    except CbmirError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except typer.TyperException as e:
        if not hasattr(e, "show"):
            raise
        e.show()
        sys.exit(getattr(e, "exit_code", 2))
    except KeyboardInterrupt:
        typer.echo("interrupted: re-run the same command to resume", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
