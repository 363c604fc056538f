"""Living archives (issue 16) on a folder archive built from real BreastMNIST images: sync of a changed
archive, single-item add / delete, moves and relabels, SIGKILL mid-sync, snapshot / restore, collection
management, the weights identity of hub checkpoints, and a strict run followed by a lenient one.

Every claim is checked against something computed independently: the images the extractor really
received (counted inside ``HogExtractor.extract``), the files on disk, a fresh ingest of the same archive,
and ``cbmir verify``.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import signal
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbmir.core.errors import CbmirError
from test_reliability import REPO, _cli_cmd, _env, _one_error, _wait_progress, run_main

NAME = "breast_28_hog"
HOG28 = ("-m", "hog", "-s", "28")
CLASSES = {0: "malignant", 1: "benign"}   # BreastMNIST labels 0 = malignant, 1 = normal/benign


# ============================================================================ fixtures and helpers
@pytest.fixture(scope="module")
def breast(data_dir):
    """The real BreastMNIST train / test images and labels, with the rows whose image occurs only once
    (so that searching by such an image has exactly one exact match)."""
    z = np.load(data_dir / "breastmnist.npz")
    imgs = {sp: z[f"{sp}_images"] for sp in ("train", "test")}
    labels = {sp: z[f"{sp}_labels"].ravel() for sp in ("train", "test")}
    every = np.concatenate([imgs["train"], imgs["test"]]).reshape(len(imgs["train"]) + len(imgs["test"]), -1)
    _, first, counts = np.unique(every, axis=0, return_index=True, return_counts=True)
    unique = set(first[counts == 1].tolist())
    return imgs, labels, unique


def _write(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    return path


def make_archive(root: Path, breast, n_train: int = 60, n_test: int = 20) -> Path:
    """``root/{train,test}/{malignant,benign}/<split>_<row>.png`` from the first BreastMNIST rows."""
    imgs, labels, _ = breast
    for sp, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            _write(root / sp / CLASSES[int(labels[sp][i])] / f"{sp}_{i:04d}.png", imgs[sp][i])
    return root


def spare_rows(breast, start: int, n: int) -> list[int]:
    """``n`` train rows from ``start`` on whose image is unique in BreastMNIST."""
    _, _, unique = breast
    return [i for i in range(start, 546) if i in unique][:n]


@pytest.fixture
def counted(monkeypatch):
    """The number of images each ``HogExtractor.extract`` call received (the extractor's inputs)."""
    from cbmir.ingest.extractors.hog import HogExtractor

    calls: list[int] = []
    real = HogExtractor.extract

    def extract(self, images):
        calls.append(len(images))
        return real(self, images)

    monkeypatch.setattr(HogExtractor, "extract", extract)
    return calls


def ingest(root, store, *extra):
    return run_main("ingest", "-d", root, *HOG28, "--store-path", store, "--name", "breast", *extra)


def verify(root, store):
    return run_main("verify", "-d", root, *HOG28, "--store-path", store)


def sync_line(out: str) -> str:
    (line,) = [ln for ln in out.splitlines() if ": sync: " in ln]
    return line.split(": sync: ", 1)[1]


def edge(store):
    from cbmir.search.edge_store import EdgeStore

    return EdgeStore(store)


def point_of(store, path: str):
    """``(point id, vector, payload)`` of the point whose ``source_path`` is ``path`` (None when absent)."""
    with edge(store) as s:
        for sp in ("train", "test"):
            idx, vec, pay = s.fetch(NAME, sp)
            for i, v, p in zip(idx, vec, pay):
                if p["source_path"] == path:
                    return (1 if sp == "train" else 3) << 40 | int(i), v, p
    return None


def search_file(store, path) -> list[dict]:
    code, out, err = run_main("search", "-c", NAME, "--store-path", store, "--image", path, "--json", "--k", "3")
    assert code == 0, err
    return json.loads(out)["hits"][0]


# ============================================================================ ids
def test_point_ids_are_stable_key_hashes_with_probing():
    from cbmir.search.schema import allocate_index, key_index, point_id, split_and_index

    ix = key_index("train/benign/a.png")
    assert ix == key_index("train/benign/a.png") < 1 << 40 and ix != key_index("train/benign/b.png")
    assert split_and_index(point_id("test", ix)) == ("test", ix)          # split code kept in the high bits
    taken = {ix: "another/key.png"}                                       # a 40-bit collision
    assert allocate_index("train/benign/a.png", taken) == key_index("train/benign/a.png", 1)
    assert allocate_index("train/benign/a.png", {ix: "train/benign/a.png"}) == ix   # its own: kept


# ============================================================================ add
def test_add_one_file_embeds_exactly_one_image_and_finds_it(tmp_path, breast, counted):
    root, store = make_archive(tmp_path / "breast", breast), tmp_path / "store"
    assert ingest(root, store)[0] == 0
    assert sum(counted) == 80
    imgs, _, _ = breast
    r_out, r_in = spare_rows(breast, 100, 2)
    outside = _write(tmp_path / "incoming" / "case17.png", imgs["train"][r_out])
    with edge(store) as s:
        before = s.count(NAME)
    counted.clear()
    code, out, err = run_main("add", "-c", NAME, outside, "--label", "malignant", "--meta", "site=ward3",
                              "--store-path", store)
    assert code == 0, err
    assert counted == [1]                                                # one extractor call, one image
    assert "added" in out and "1 image(s) embedded" in out
    with edge(store) as s:
        assert s.count(NAME) == before + 1
    hit = search_file(store, outside)[0]
    assert hit["rank"] == 1 and hit["payload"]["source_path"] == str(outside.resolve())
    assert hit["score"] == pytest.approx(1.0, abs=1e-6) and hit["class_name"] == "malignant"
    assert hit["payload"]["site"] == "ward3" and hit["payload"]["origin"] == "added"
    counted.clear()                                                      # the same file again: nothing to do
    code, out, _ = run_main("add", "-c", NAME, outside, "--label", "malignant", "--meta", "site=ward3",
                            "--store-path", store)
    assert code == 0 and "unchanged" in out and counted == []
    code, out, err = verify(root, store)
    assert code == 0 and "+1 point(s) added with `cbmir add`" in out, out + err

    # a new file in the archive folder: `cbmir ingest` embeds just it and keeps the added point
    inside = _write(root / "train" / "benign" / "new_0001.png", imgs["train"][r_in])
    counted.clear()
    code, out, err = ingest(root, store)
    assert code == 0, err
    assert sync_line(out).startswith("1 added, 0 updated, 0 relabelled, 0 deleted, 80 unchanged; 1 image(s)")
    assert sum(counted) == 1
    with edge(store) as s:
        assert s.count(NAME) == before + 2
    hit = search_file(store, inside)[0]
    assert hit["payload"]["source_path"] == "train/benign/new_0001.png" and hit["class_name"] == "benign"
    assert hit["score"] == pytest.approx(1.0, abs=1e-6)
    assert verify(root, store)[0] == 0
    # an archive file given to `cbmir add` is embedded as the archive says; another label is refused
    _one_error(*run_main("add", "-c", NAME, inside, "--label", "malignant", "--store-path", store),
               "is a file of the collection's archive", "its label is 'benign'")
    _one_error(*run_main("add", "-c", NAME, outside, "--label", "atypical", "--store-path", store),
               "'atypical' is not a class", "0=benign, 1=malignant")
    code, out, err = ingest(root, store, "--recreate")                   # rebuilt from the archive: said so
    assert code == 0 and "the 1 point(s) added with `cbmir add`" in err, err
    with edge(store) as s:
        assert s.count(NAME) == before + 1


def test_add_archive_file_through_the_client_updates_the_fingerprint(tmp_path, breast, counted):
    from cbmir.client import SearchClient
    from cbmir.core.settings import Settings

    root, store = make_archive(tmp_path / "breast", breast, 20, 6), tmp_path / "store"
    assert ingest(root, store)[0] == 0
    imgs, _, _ = breast
    new = _write(root / "test" / "malignant" / "late.png", imgs["train"][spare_rows(breast, 200, 1)[0]])
    counted.clear()
    with SearchClient(settings=Settings(store_path=store)) as client:
        res = client.add(NAME, new)
        assert res.embedded == 1 and counted == [1]
        assert res.points[0]["split"] == "test" and res.points[0]["status"] == "added"
        assert "fingerprint was updated" in " ".join(res.notes)
        again = client.add(NAME, new)
        assert again.embedded == 0 and again.points[0]["status"] == "unchanged"
        assert again.points[0]["point_id"] == res.points[0]["point_id"]
        hit = client.search_by_image(NAME, new, k=1, database_split="test")[0][0]
        assert hit.payload["source_path"] == "test/malignant/late.png"
    code, out, _ = run_main("evaluate", "-d", root, *HOG28, "--name", "breast", "--store-path", store)
    assert code == 0 and "ACC@1" in out                                  # the archive matches: readable


# ============================================================================ delete
def test_delete_one_file_counts_and_verify_agree(tmp_path, breast, counted):
    root, store = make_archive(tmp_path / "breast", breast), tmp_path / "store"
    assert ingest(root, store)[0] == 0
    gone = "train/benign/train_0000.png"
    assert point_of(store, gone) is not None
    (root / gone).unlink()
    code, out, _ = verify(root, store)
    assert code == 1 and "1 point(s) of files no longer in the archive (train/benign/train_0000.png)" in out
    code, out, err = run_main("delete", "-c", NAME, "--path", gone, "--store-path", store)
    assert code == 0 and "1 point(s) deleted" in out, err
    assert point_of(store, gone) is None
    code, out, err = verify(root, store)
    assert code == 0 and "train 59/59, test 20/20" in out, out + err
    with edge(store) as s:
        assert s.count(NAME, "train") == 59 == len(list((root / "train").rglob("*.png")))

    # removed from the folder: the sync deletes its point, embedding nothing
    sorted((root / "test" / "malignant").glob("*.png"))[0].unlink()
    counted.clear()
    code, out, err = ingest(root, store)
    assert code == 0 and sync_line(out).startswith("0 added, 0 updated, 0 relabelled, 1 deleted, 78 unchanged")
    assert counted == [] and "updated without embedding" in out
    assert "test 19/19" in verify(root, store)[1]

    # by point id; a file still in the archive comes back with the next sync
    pid, _, _ = point_of(store, "train/malignant/train_0004.png")
    code, out, err = run_main("delete", "-c", NAME, "--point-id", pid, "--store-path", store)
    assert code == 0 and "still in the archive" in err, err
    assert verify(root, store)[0] == 1
    code, out, _ = ingest(root, store)
    assert sync_line(out).startswith("1 added") and point_of(store, "train/malignant/train_0004.png")[0] == pid
    _one_error(*run_main("delete", "-c", NAME, "--path", "train/nope.png", "--store-path", store),
               "no point of collection", "train/nope.png")
    _one_error(*run_main("delete", "-c", NAME, "--point-id", 12345, "--store-path", store),
               "is not a point of collection")


# ============================================================================ move / relabel
def test_move_to_another_class_folder_relabels_without_embedding(tmp_path, breast, counted):
    root, store = make_archive(tmp_path / "breast", breast), tmp_path / "store"
    assert ingest(root, store)[0] == 0
    old_path, new_path = "train/benign/train_0000.png", "train/malignant/train_0000.png"
    old_id, old_vec, old_pay = point_of(store, old_path)
    assert old_pay["label_name"] == "benign" and old_pay["label"] == 0
    shutil.move(root / old_path, root / new_path)
    counted.clear()
    code, out, err = ingest(root, store)
    assert code == 0, err
    assert sync_line(out).startswith("0 added, 0 updated, 1 relabelled (1 moved: vector reused), 0 deleted, "
                                     "79 unchanged; 0 image(s) embedded")
    assert counted == []                                                 # nothing went through the extractor
    assert point_of(store, old_path) is None
    new_id, new_vec, new_pay = point_of(store, new_path)
    assert new_pay["label_name"] == "malignant" and new_pay["label"] == 1 and new_id != old_id
    np.testing.assert_allclose(new_vec, old_vec, rtol=0, atol=1e-7)     # the stored vector, carried over
    assert new_pay["content_sha256"] == old_pay["content_sha256"] and new_pay["orig_height"] == 28
    code, out, err = run_main("search", "-c", NAME, "--store-path", store, "--query-path", new_path, "--json")
    assert json.loads(out)["queries"][0]["class_name"] == "malignant"
    assert verify(root, store)[0] == 0


def test_manifest_relabel_keeps_the_vector_bit_for_bit(tmp_path, breast, counted):
    """A manifest label edited in place: the payload changes, the stored vector is not touched; columns of
    the manifest stay payload fields, and an unchanged manifest syncs to all-unchanged."""
    import pandas as pd

    imgs, labels, _ = breast
    rows = [{"path": str(_write(tmp_path / "img" / f"{i}.png", imgs["train"][i]).relative_to(tmp_path)),
             "label": CLASSES[int(labels["train"][i])], "split": "train" if i < 12 else "test", "site": f"s{i % 3}"}
            for i in range(16)]
    csv = tmp_path / "cohort.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    store = tmp_path / "store"
    args = ("ingest", "-d", csv, *HOG28, "--store-path", store)
    assert run_main(*args)[0] == 0
    name = "cohort_28_hog"
    code, out, _ = run_main(*args)
    assert sync_line(out).startswith("0 added, 0 updated, 0 relabelled, 0 deleted, 16 unchanged")
    with edge(store) as s:
        idx, vec, pay = s.fetch(name, "train")
    j = [p["source_path"] for p in pay].index("img/3.png")
    rows[3]["label"] = "malignant" if rows[3]["label"] == "benign" else "benign"
    pd.DataFrame(rows).to_csv(csv, index=False)
    counted.clear()
    code, out, _ = run_main(*args)
    assert sync_line(out).startswith("0 added, 0 updated, 1 relabelled, 0 deleted, 15 unchanged") and counted == []
    with edge(store) as s:
        idx2, vec2, pay2 = s.fetch(name, "train")
    np.testing.assert_array_equal(idx2, idx)
    np.testing.assert_array_equal(vec2, vec)                             # bit for bit: payload-only update
    assert pay2[j]["label_name"] == rows[3]["label"] and pay2[j]["site"] == "s0"
    assert run_main("verify", "-d", csv, *HOG28, "--store-path", store)[0] == 0


# ============================================================================ SIGKILL mid-sync
def test_sigkill_mid_sync_then_rerun_completes_without_duplicates(tmp_path, breast):
    """REALLY kills `cbmir ingest` (SIGKILL) while it embeds 150 new files; the re-run embeds only the files
    still missing; verify is OK, every file has one point, and ids and vectors equal a fresh ingest."""
    imgs, labels, _ = breast
    root, store = make_archive(tmp_path / "breast", breast, 40, 10), tmp_path / "store"
    assert ingest(root, store)[0] == 0
    with edge(store) as s:
        fingerprint = s.meta(NAME).extra["source_fingerprint"]
    n_new = 150
    for i in range(100, 100 + n_new):
        _write(root / "train" / CLASSES[int(labels["train"][i])] / f"new_{i:04d}.png", imgs["train"][i])
    args = _cli_cmd("ingest", "-d", root, *HOG28, "--name", "breast", "--store-path", store, "--batch-size", 2)
    p = subprocess.Popen(args, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_progress(p, "train", n_new, at_least=30, timeout=240)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert p.returncode == -signal.SIGKILL
    with edge(store) as s:
        stored = s.count(NAME, "train")
        assert 40 + 26 <= stored < 40 + n_new
        assert s.meta(NAME).extra.get("sync_pending") is True
        assert s.meta(NAME).extra["source_fingerprint"] == fingerprint   # recorded only when a sync completes
    code, out, _ = verify(root, store)
    assert code == 1 and "sync with the archive did not finish" in out
    r = subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    missing = 40 + n_new - stored
    assert sync_line(r.stdout).startswith(f"{missing} added, 0 updated, 0 relabelled, 0 deleted, "
                                          f"{stored + 10} unchanged; {missing} image(s) embedded"), r.stdout
    code, out, err = verify(root, store)
    assert code == 0 and f"train {40 + n_new}/{40 + n_new}" in out, out + err
    fresh = tmp_path / "fresh"
    assert ingest(root, fresh)[0] == 0
    with edge(store) as s, edge(fresh) as f:
        for sp in ("train", "test"):
            idx, vec, pay = s.fetch(NAME, sp)
            fidx, fvec, fpay = f.fetch(NAME, sp)
            keys = [p_["item_key"] for p_ in pay]
            assert len(keys) == len(set(keys)) == len(list((root / sp).rglob("*.png")))  # no duplicates
            np.testing.assert_array_equal(idx, fidx)
            np.testing.assert_array_equal(vec, fvec)
        assert "sync_pending" not in s.meta(NAME).extra
        assert s.meta(NAME).extra["source_fingerprint"] != fingerprint


# ============================================================================ snapshots and collections
def _all_results(store, name):
    from cbmir.client import SearchClient
    from cbmir.core.settings import Settings

    with SearchClient(settings=Settings(store_path=store)) as c:
        n = c.info(name)["counts"]["test"]
        with edge(store) as s:
            rows = s.fetch(name, "test", with_vectors=False)[0].tolist()
        hits = c.search_by_point(name, rows, k=5)
    assert len(hits) == n
    return [[(h.point_id, h.score) for h in q] for q in hits]


def test_snapshot_delete_restore_gives_identical_results(tmp_path, breast):
    from cbmir.ingest.extractors.hog import hog_dim

    root, store = make_archive(tmp_path / "breast", breast, 40, 12), tmp_path / "store"
    assert ingest(root, store)[0] == 0
    before = _all_results(store, NAME)
    snap = tmp_path / "breast.cbmir-snapshot"
    code, out, err = run_main("snapshot", NAME, "-o", snap, "--store-path", store)
    assert code == 0 and "sha256" in out, err
    code, out, _ = run_main("collections", "delete", NAME, "--store-path", store)   # asks; no answer: kept
    assert code == 1 and "not deleted" in out
    code, out, err = run_main("collections", "delete", NAME, "--yes", "--store-path", store)
    assert code == 0 and f"deleted collection {NAME} (52 points)" in out, err
    code, out, _ = run_main("collections", "--store-path", store)
    assert NAME not in out and "(no collections)" in out
    code, out, err = run_main("restore", snap, "--store-path", store)
    assert code == 0 and f"restored collection {NAME} (train 40, test 12)" in out, err
    code, out, err = verify(root, store)
    assert code == 0 and "train 40/40, test 12/12" in out, out + err
    assert _all_results(store, NAME) == before                           # ids and scores identical
    _one_error(*run_main("restore", snap, "--store-path", store), "already exists", "--name")
    assert run_main("restore", snap, "--name", "breast_copy", "--store-path", store)[0] == 0
    code, out, _ = run_main("collections", "--store-path", store)
    rows = {ln.split()[0]: ln for ln in out.splitlines()[1:]}
    assert set(rows) == {NAME, "breast_copy"}
    assert "40/0/12" in rows[NAME] and " hog " in rows[NAME] and rows[NAME].endswith("baseline")
    assert re.search(r" \d+\.\d [KM]B ", rows[NAME])                       # disk size
    code, out, _ = run_main("collections", "info", "breast_copy", "--json", "--store-path", store)
    info = json.loads(out)
    assert info["point_ids"] == "key-sha256" and info["archive"]["root"] == str(root.resolve())
    assert info["counts"] == {"train": 40, "test": 12} and info["dim"] == hog_dim(28)

    # into the server code path (qdrant-client local mode has no snapshot API: the points are copied)
    from cbmir.search.server_store import ServerStore
    from cbmir.search.snapshot import restore_snapshot

    with ServerStore(location=":memory:") as srv:
        restore_snapshot(srv, snap)
        with edge(store) as s:
            for sp in ("train", "test"):
                a, b = s.fetch(NAME, sp), srv.fetch(NAME, sp)
                np.testing.assert_array_equal(a[0], b[0])
                np.testing.assert_allclose(a[1], b[1], atol=1e-6)
                assert a[2] == b[2]


def test_damaged_or_unsafe_snapshots_are_refused(tmp_path, breast):
    root, store = make_archive(tmp_path / "breast", breast, 10, 4), tmp_path / "store"
    assert ingest(root, store)[0] == 0
    snap = tmp_path / "s.tar.gz"
    assert run_main("snapshot", NAME, "-o", snap, "--store-path", store)[0] == 0
    other = tmp_path / "other_store"
    data = snap.read_bytes()
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(data[: len(data) // 2])
    _one_error(*run_main("restore", truncated, "--store-path", other), "is damaged", "nothing was restored")
    # a member altered (a valid tar, other bytes): the manifest's checksum catches it
    altered = tmp_path / "altered.tar.gz"
    with tarfile.open(snap) as src, tarfile.open(altered, "w:gz") as dst:
        for m in src:
            data = src.extractfile(m).read() if m.isreg() else b""
            if m.name == "collection/meta.json":
                data = data.replace(b'"size": 28', b'"size": 29')
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data) if m.isreg() else None)
    _one_error(*run_main("restore", altered, "--store-path", other), "is damaged",
               "collection/meta.json (checksum)")
    for evil, member in (("up.tar", "../escaped.txt"), ("abs.tar", "/tmp/cbmir-escaped.txt"),
                         ("link.tar", "collection/link")):
        path = tmp_path / evil
        with tarfile.open(path, "w") as t:
            info = tarfile.TarInfo(member)
            if member.endswith("link"):
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                t.addfile(info)
            else:
                info.size = 1
                t.addfile(info, io.BytesIO(b"x"))
        line = _one_error(*run_main("restore", path, "--store-path", other), "nothing was restored")
        assert "outside the collection folder" in line or "not a regular file" in line
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/cbmir-escaped.txt").exists()
    with edge(other) as s:
        assert s.list_collections() == []
    assert not [p for p in other.iterdir() if p.name.startswith(".restore-")]   # temporary folders removed


# ============================================================================ weights identity
def _hub_revision(cache: Path, rev: str, seed: int) -> None:
    """A local HF cache entry of timm/densenet121.tv_in1k at revision ``rev`` (weights from ``seed``), made
    the cache's ``main``."""
    import timm
    import torch
    from safetensors.torch import save_file

    repo = cache / "models--timm--densenet121.tv_in1k"
    snap = repo / "snapshots" / rev
    if not (snap / "model.safetensors").exists():
        torch.manual_seed(seed)
        model = timm.create_model("densenet121.tv_in1k", pretrained=False)
        snap.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(snap / "model.safetensors"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(rev)


def test_weights_of_a_new_hub_revision_are_refused(tmp_path, breast, monkeypatch):
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    rev1, rev2 = "1" * 40, "2" * 40
    _hub_revision(cache, rev1, seed=1)
    root, store = make_archive(tmp_path / "breast", breast, 8, 4), tmp_path / "store"
    args = ("run", "-d", root, "-m", "densenet121", "-s", "28", "--name", "breast", "--store-path", store)
    code, out, err = run_main(*args)
    assert code == 0 and "ACC@1" in out, err
    name = "breast_28_densenet121"
    with edge(store) as s:
        assert s.meta(name).weights == f"hf-hub:timm/densenet121.tv_in1k@{rev1}"
    code, out, _ = run_main(*args)
    assert code == 0 and "complete, reused" in out                      # same revision: reused
    query = sorted((root / "test").rglob("*.png"))[0]
    search = ("search", "-c", name, "--image", query, "--store-path", store)
    assert run_main(*search)[0] == 0
    _hub_revision(cache, rev2, seed=2)                                  # the cache now points at new weights
    code, out, err = run_main(*args)
    _one_error(code, out, err, name, "another configuration", f"@{rev1}", f"@{rev2}")
    assert "--recreate" in err and "complete, reused" not in out
    _one_error(*run_main(*search), f"now loads weights hf-hub:timm/densenet121.tv_in1k@{rev2}", f"@{rev1}")
    _one_error(*run_main("add", "-c", name, query, "--store-path", store), "now loads weights")
    (cache / "models--timm--densenet121.tv_in1k" / "refs" / "main").write_text(rev1)   # back: accepted
    assert run_main(*search)[0] == 0


# ============================================================================ strict, then lenient
def test_failed_strict_run_then_lenient_run_completes(tmp_path, breast):
    root, store = make_archive(tmp_path / "breast", breast, 30, 10), tmp_path / "store"
    broken = root / "train" / "malignant" / "zz_broken.png"                # sorted last: batches before it land
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    args = ("run", "-d", root, *HOG28, "--name", "breast", "--store-path", store, "--batch-size", "4")
    line = _one_error(*run_main(*args, "--strict"), "cannot read", "zz_broken.png")
    assert "--strict" in line
    with edge(store) as s:
        assert 0 < s.count(NAME, "train") < 30
    out_json = tmp_path / "r.json"
    code, out, err = run_main(*args, "-o", out_json)
    assert code == 0 and "ACC@1" in out and "incomplete" not in out + err, out + err
    assert "skipped 1 unreadable" in out
    code, out, _ = verify(root, store)
    assert code == 0 and "train 30/31" in out and "1 unreadable" in out
    # the metrics equal a numpy brute force over the stored vectors (rows are key hashes, not positions)
    res = json.loads(out_json.read_text())
    with edge(store) as s:
        db_i, db_v, db_p = s.fetch(NAME, "train")
        q_i, q_v, q_p = s.fetch(NAME, "test")
    sims = q_v.astype(np.float64) @ db_v.astype(np.float64).T
    order = np.lexsort((np.broadcast_to(db_i, sims.shape), -sims), axis=1)[:, :5]
    db_labels = np.asarray([p["label"] for p in db_p])
    hit1 = db_labels[order[:, 0]] == np.asarray([p["label"] for p in q_p])
    assert res["metrics"]["ACC@1"] == pytest.approx(hit1.mean())
    np.testing.assert_array_equal(np.asarray(res["per_query"]["topk_indices"]), db_i[order])


# ============================================================================ guards
def test_single_items_refused_for_row_id_collections(tmp_path):
    from cbmir.app import App
    from cbmir.app.items import NewPoint, add_points, delete_points
    from cbmir.core.settings import Settings
    from cbmir.search.schema import CollectionMeta

    with App(Settings(store_path=tmp_path / "store")) as app:
        app.store.ensure_collection("breastmnist_28_hog", CollectionMeta("breastmnist", 28, "hog", "numpy", 144))
        for call in (lambda: add_points(app, "breastmnist_28_hog", [NewPoint(file=__file__)]),
                     lambda: delete_points(app, "breastmnist_28_hog", point_ids=[1 << 40])):
            with pytest.raises(CbmirError, match="row-position point ids"):
                call()


def test_sync_on_the_server_code_path(tmp_path, breast, counted):
    """The same sync through qdrant-client (local mode): moves, relabels (payload-only updates) and deletes."""
    from cbmir.ingest.embedder import make_embedder
    from cbmir.ingest.extractors import create_extractor
    from cbmir.ingest.job import ingest as ingest_job
    from cbmir.ingest.sources import open_source
    from cbmir.search.server_store import ServerStore

    root = make_archive(tmp_path / "breast", breast, 12, 4)
    emb = make_embedder(create_extractor("hog"), size=28, is_3d=False)
    with ServerStore(location=":memory:") as srv:
        ingest_job(open_source(root, 28, name="breast"), emb, srv, progress=False)
        shutil.move(root / "train" / "benign" / "train_0000.png", root / "train" / "malignant" / "m.png")
        sorted((root / "test").rglob("*.png"))[0].unlink()
        counted.clear()
        rep = ingest_job(open_source(root, 28, name="breast"), emb, srv, progress=False)
        assert rep.extra["sync"]["relabelled"] == 1 and rep.extra["sync"]["moved"] == 1 and counted == []
        assert rep.extra["sync"]["deleted"] == 1
        _, _, pays = srv.fetch(NAME, "train")
        moved = [p for p in pays if p["source_path"] == "train/malignant/m.png"]
        assert len(moved) == 1 and moved[0]["label_name"] == "malignant" and srv.count(NAME, "test") == 3


# ============================================================================ other archive kinds
from test_sources import dicom_archive, nifti_file  # noqa: E402,F401 - fixtures


def test_dicom_and_nifti_resync_is_all_unchanged(dicom_archive, nifti_file, tmp_path, counted):  # noqa: F811
    """Payloads with DICOM tags and decoding facts compare equal after a round trip through the store: a
    second ingest of an unchanged archive embeds nothing and relabels nothing."""
    for archive in (dicom_archive, nifti_file[0]):
        args = ("ingest", "-d", archive, "-m", "hog", "-s", "16", "--store-path", tmp_path / "store")
        assert run_main(*args)[0] == 0
        counted.clear()
        code, out, err = run_main(*args)
        assert code == 0, err
        assert sync_line(out).startswith("0 added, 0 updated, 0 relabelled, 0 deleted,"), out
        assert counted == []
