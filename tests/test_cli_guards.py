"""CLI guards: commands reading a collection by ``--dataset`` check the archive, the random-init hint,
unwritable / mistyped output and results paths, grid-file scalars and parse errors (one ``error:`` line)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cbmir.core.errors import CbmirError
from test_reliability import _one_error, run_main
from test_sources import _ingest_cli, _tiny_archive

HOG16 = ("-m", "hog", "-s", "16")


def _read_cmds(root, store, tmp_path):
    """evaluate / export / search of ``root`` by --dataset (the commands that read a stored collection)."""
    common = ("-d", root, *HOG16, "--store-path", store)
    return {"evaluate": ("evaluate", *common), "export": ("export", *common, "-o", tmp_path / "v.npz"),
            "search": ("search", *common, "--query-path", "train/circle/img0.png")}


def test_dataset_read_commands_refuse_another_or_changed_archive(tmp_path):
    a = _tiny_archive(tmp_path / "a" / "arch", seed=0)
    b = _tiny_archive(tmp_path / "b" / "arch", seed=1)                   # another archive, same name
    store = tmp_path / "store"
    assert _ingest_cli(a, store).exit_code == 0
    for cmd, args in _read_cmds(a, store, tmp_path).items():             # the ingested archive: fine
        code, out, err = run_main(*args)
        assert code == 0, (cmd, out, err)
    for cmd, args in _read_cmds(b, store, tmp_path).items():
        _one_error(*run_main(*args), "arch_16_hog", "changed since it was ingested", str(b))
    code, out, err = run_main("search", "-c", "arch_16_hog", "--store-path", store, "--query-path",
                              "test/circle/img0.png")
    assert code == 0, err                                                # by name: no archive to check
    shutil.copy(a / "train" / "circle" / "img0.png", a / "train" / "circle" / "img9.png")  # changed since
    for cmd, args in _read_cmds(a, store, tmp_path).items():
        _one_error(*run_main(*args), "arch_16_hog", "changed since it was ingested", "train")


def test_missing_collection_names_the_random_init_one(tmp_path):
    from cbmir.search.edge_store import EdgeStore

    a = _tiny_archive(tmp_path / "arch")
    store = tmp_path / "store"
    assert _ingest_cli(a, store).exit_code == 0
    with EdgeStore(store) as s:                                          # as if built with --random-init
        s.replace_collection("arch_16_hog", "arch_16_hog_randinit")
    hint = "(a random-init collection exists: add --random-init)"
    for cmd, args in _read_cmds(a, store, tmp_path).items():
        _one_error(*run_main(*args), "'arch_16_hog' does not exist", hint)
    code, out, err = run_main("verify", "-d", a, *HOG16, "--store-path", store)
    assert code == 1 and "FAIL" in out and hint in out, (out, err)
    with EdgeStore(store) as s:                                          # both exist: no hint
        s.replace_collection("arch_16_hog_randinit", "arch_16_hog_randinit2")
    code, out, err = run_main("evaluate", "-d", a, *HOG16, "--store-path", store)
    assert "random-init" not in _one_error(code, out, err, "does not exist")


@pytest.mark.parametrize("where", ["/proc", "/sys"])
def test_report_to_an_uncreatable_folder_is_one_error(where, tmp_path):
    if not Path(where).is_dir():
        pytest.skip(f"no {where}")
    _one_error(*run_main("report", "-o", f"{where}/rep", "--no-tsne"), "--output", f"{where}/rep")


def test_report_results_directory_and_output_under_a_file(tmp_path):
    (tmp_path / "pb").mkdir()
    line = _one_error(*run_main("report", "--results", tmp_path / "pb", "-o", tmp_path / "r", "--no-tsne"),
                      "--results", "is a directory", "CSV")
    assert "does not exist" not in line
    (tmp_path / "afile").write_text("x")
    line = _one_error(*run_main("run", "-d", "breastmnist", "-m", "hog", "-o", tmp_path / "afile" / "x.json"),
                      "is a file, not a folder", str(tmp_path / "afile"))
    assert "does not exist" not in line


def test_grid_scalars_are_one_element_lists():
    from cbmir.grid import GridConfig

    cfg = GridConfig.from_mapping({"sizes": 28, "models": "hog", "datasets": "breastmnist",
                                   "distances": "euclidean", "backends": "torch"})
    assert (cfg.sizes, cfg.models, cfg.datasets, cfg.distances, cfg.backends) == (
        [28], ["hog"], ["breastmnist"], ["euclidean"], ["torch"])


@pytest.mark.parametrize("fname,text", [("g.yaml", ": : :\n"), ("g.toml", "a = = \n")])
def test_broken_grid_file_is_one_line_naming_it(tmp_path, fname, text):
    from cbmir.grid import load_grid_file

    p = tmp_path / fname
    p.write_text(text)
    with pytest.raises(CbmirError) as ei:
        load_grid_file(p)
    msg = str(ei.value)
    assert str(p) in msg and "does not parse" in msg and "line 1" in msg and "\n" not in msg
    _one_error(*run_main("benchmark", "--config", p), str(p), "does not parse")
