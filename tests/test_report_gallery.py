"""The report's query galleries (``cbmir report --gallery``): the best / worst picks, the images drawn (the source
rows of the raw MedMNIST npz; the files of a user archive), the note when the source is missing, and the CLI flags.

One tiny grid on the real BreastMNIST 28 px file: HOG and EfficientNet-Lite0 with random weights, cosine,
per-query files saved.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cbmir.cli import app as cli
from cbmir.evaluation.report import build_report, prepare_results
from cbmir.evaluation.report.galleries import GALLERY_TILE, PICK_RULE, gallery_rows, pick_queries
from cbmir.evaluation.results import load_per_query, read_results

COLLECTIONS = ("breastmnist_28_hog", "breastmnist_28_efficientnet_lite0_randinit")


@pytest.fixture(scope="module")
def grid(tmp_path_factory, data_dir):
    """``(results csv, rows by collection)`` of the tiny grid."""
    root = tmp_path_factory.mktemp("gallery_grid")
    results = root / "results" / "results.csv"
    r = CliRunner().invoke(cli, ["benchmark", "--datasets", "breastmnist", "--models", "hog,efficientnet_lite0",
                                 "--sizes", "28", "--random-init", "--save-per-query", "--no-progress",
                                 "--results", str(results), "--store-path", str(root / "store"),
                                 "--data-dir", str(data_dir)], env={"HF_HUB_OFFLINE": "1"})
    assert r.exit_code == 0, r.output
    df = prepare_results(read_results(results))
    rows = {rec["collection"]: rec for rec in df.to_dict("records")}
    assert set(rows) == set(COLLECTIONS) and all(rec["status"] == "ok" for rec in rows.values())
    return results, rows


def _per_query(results, row) -> dict:
    return load_per_query(results.parent / row["per_query_file"])


def _ap(y: int, hits: list[int]) -> float:
    """AP@k by its definition (DESIGN.md §2): mean over the relevant ranks of (relevant so far) / rank."""
    found, total = 0, 0.0
    for i, r in enumerate(hits, start=1):
        if r == y:
            found += 1
            total += found / i
    return total / found if found else 0.0


def test_picks_match_an_independent_computation(grid):
    results, rows = grid
    for name, row in rows.items():
        with np.load(results.parent / row["per_query_file"]) as z:
            q_rows, q_labels, topk = z["query_indices"], z["query_labels"], z["topk_labels"]
        ap = [round(_ap(int(y), [int(v) for v in t]), 12) for y, t in zip(q_labels, topk)]
        rel = [int((t == y).sum()) for y, t in zip(q_labels, topk)]
        by_best = sorted(range(len(ap)), key=lambda i: (-ap[i], -rel[i], int(q_rows[i])))
        by_worst = sorted(range(len(ap)), key=lambda i: (ap[i], rel[i], int(q_rows[i])))
        pq = _per_query(results, row)
        for n in (1, 3):
            best, worst = pick_queries(pq, n)
            assert best.tolist() == by_best[:n], name
            assert worst.tolist() == [i for i in by_worst if i not in by_best[:n]][:n], name
        assert ap[by_best[0]] > ap[by_worst[0]]  # BreastMNIST has both perfect and failed queries
        best, worst = pick_queries(pq, len(ap))  # every query is best: none is left to be worst
        assert len(best) == len(ap) and len(worst) == 0


def test_gallery_images_are_the_source_rows(grid, data_dir, tmp_path):
    from skimage.feature import hog

    from cbmir.app import load_settings
    from cbmir.app.report_images import ReportImages
    from cbmir.evaluation.pictures import fit_picture, tile_box

    results, rows = grid
    out = tmp_path / "rep"
    r = CliRunner().invoke(cli, ["report", "--results", str(results), "-o", str(out), "--no-tsne", "--n-boot", "20"],
                           env={"CBMIR_DATA_DIR": str(data_dir)})
    assert r.exit_code == 0, r.output
    assert "2 galleries" in r.output
    md = (out / "report.md").read_text()
    assert "## Query galleries" in md and PICK_RULE in md
    assert md.index("## Query galleries") < md.index("## Appendix")
    raw = np.load(data_dir / "breastmnist.npz")
    test_x, train_x = raw["test_images"], raw["train_images"]
    test_y, train_y = raw["test_labels"].ravel(), raw["train_labels"].ravel()

    def hog_of(img):  # DESIGN.md §3 HOG, independently of cbmir's extractor
        v = hog(img / 255.0, orientations=9, pixels_per_cell=(4, 4), cells_per_block=(2, 2), block_norm="L2-Hys")
        return v / np.linalg.norm(v)

    for name, row in rows.items():
        png = out / "figures" / f"gallery_{name}.png"
        assert f"](figures/{png.name})" in md and png.is_file()
        pq = _per_query(results, row)
        # the per-query rows index the raw splits: query_indices -> test rows, topk_indices -> train rows
        assert np.array_equal(pq["query_labels"], test_y[pq["query_indices"]])
        assert np.array_equal(pq["topk_labels"], train_y[pq["topk_indices"]])
        best, worst = pick_queries(pq, 3)
        picks = np.concatenate([best, worst])
        if "hog" in name:  # and the scores are the cosine of those raw rows' HOG vectors
            for p in picks:
                q = hog_of(test_x[pq["query_indices"][p]])
                want = [q @ hog_of(train_x[i]) for i in pq["topk_indices"][p]]
                np.testing.assert_allclose(pq["topk_scores"][p], want, atol=1e-4)
        with ReportImages(load_settings(data_dir=data_dir)) as images:
            pixels = {"test": images(row, "test", pq["query_indices"][picks]),
                      "train": images(row, "train", pq["topk_indices"][picks].ravel())}
        grows = gallery_rows(row, pq, best, worst, pixels)
        assert len(grows) == 6 and all(len(g) == 1 + pq["k"] for g in grows)
        with Image.open(png) as im:
            drawn = np.asarray(im.convert("RGB"))
        for g, p in zip(grows, picks):
            want = [test_x[pq["query_indices"][p]]] + [train_x[i] for i in pq["topk_indices"][p]]
            for c, (tile, src) in enumerate(zip(g, want)):
                assert np.array_equal(tile.picture, np.repeat(src[..., None], 3, axis=-1))  # grey replicated
            assert f"test row {pq['query_indices'][p]}" in g[0].caption
            assert g[1].caption.startswith(f"#1 train row {pq['topk_indices'][p, 0]}")
            assert ("✓" in g[1].caption) == (pq["topk_labels"][p, 0] == pq["query_labels"][p])
        # the PNG shows exactly those pictures: the query and the first hit of every row, pixel for pixel
        for i in range(len(grows)):
            for c in (0, 1):
                x0, y0, x1, y1 = tile_box(grows, i, c, tile=GALLERY_TILE)
                want = np.asarray(fit_picture(grows[i][c].picture, GALLERY_TILE).convert("RGB"))
                assert np.array_equal(drawn[y0:y1, x0:x1], want), (name, i, c)


def test_missing_source_says_why_and_the_report_still_builds(grid, tmp_path):
    from cbmir.app import load_settings
    from cbmir.app.report_images import ReportImages

    results, _ = grid
    empty = tmp_path / "no_data"
    empty.mkdir()
    with ReportImages(load_settings(data_dir=empty)) as images:
        out = build_report(results, tmp_path / "rep", tsne=False, n_boot=20, images=images)
    md = out.markdown.read_text()
    assert out.galleries == [] and not list((tmp_path / "rep" / "figures").glob("gallery_*"))
    section = md.split("## Query galleries")[1].split("\n## ")[0]
    assert "**Galleries missing** (2 of 2)" in section
    assert "MedMNIST file not found" in section and str(empty) in section and "breastmnist.npz" in section
    out = build_report(results, tmp_path / "rep2", tsne=False, n_boot=20)  # no image source at all
    assert "no image source was given" in out.markdown.read_text() and out.galleries == []


def test_cli_gallery_flags(grid, data_dir, tmp_path):
    results, _ = grid
    env = {"CBMIR_DATA_DIR": str(data_dir)}
    base = ["report", "--results", str(results), "--no-tsne", "--n-boot", "20"]
    r = CliRunner().invoke(cli, [*base, "-o", str(tmp_path / "off"), "--no-gallery"], env=env)
    assert r.exit_code == 0, r.output
    assert "Query galleries" not in (tmp_path / "off" / "report.md").read_text()
    assert not list((tmp_path / "off" / "figures").glob("gallery_*"))
    heights = {}
    for n in (1, 2):
        r = CliRunner().invoke(cli, [*base, "-o", str(tmp_path / f"n{n}"), "--gallery-n", str(n)], env=env)
        assert r.exit_code == 0, r.output
        md = (tmp_path / f"n{n}" / "report.md").read_text()
        assert f"its {n} best and {n} worst queries" in md
        with Image.open(tmp_path / f"n{n}" / "figures" / f"gallery_{COLLECTIONS[0]}.png") as im:
            heights[n] = im.size[1]
    assert heights[2] > heights[1]  # two more rows
    r = CliRunner().invoke(cli, [*base, "-o", str(tmp_path / "bad"), "--gallery-n", "0"], env=env)
    assert r.exit_code != 0 and "--gallery-n 0" in str(r.exception)


def test_archive_collection_gallery_shows_the_archive_files(data_dir, tmp_path):
    """A user folder archive: the gallery's pictures are read back from the archive recorded at ingest (its rows
    are key hashes, not positions), one PNG file per point."""
    from cbmir.app import load_settings
    from cbmir.app.report_images import ReportImages
    from cbmir.search.edge_store import EdgeStore

    raw = np.load(data_dir / "breastmnist.npz")
    root = tmp_path / "breastfolder"
    for split, n in (("train", 60), ("test", 12)):
        for i in range(n):
            d = root / split / f"class{int(raw[f'{split}_labels'][i, 0])}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(raw[f"{split}_images"][i]).save(d / f"{i:04d}.png")
    results, store = tmp_path / "grid" / "results.csv", tmp_path / "store"
    r = CliRunner().invoke(cli, ["benchmark", "--datasets", str(root), "--models", "hog", "--sizes", "28",
                                 "--save-per-query", "--no-progress", "--results", str(results),
                                 "--store-path", str(store)])
    assert r.exit_code == 0, r.output
    (row,) = prepare_results(read_results(results)).to_dict("records")
    pq = _per_query(results, row)
    best, worst = pick_queries(pq, 2)
    picks = np.concatenate([best, worst])
    with ReportImages(load_settings(data_dir=tmp_path / "none")) as images:  # no MedMNIST file needed
        pixels = {"test": images(row, "test", pq["query_indices"][picks]),
                  "train": images(row, "train", pq["topk_indices"][picks].ravel())}
        names = images.class_names(row)
    assert names == {0: "class0", 1: "class1"}  # the archive's folder names, from its metadata
    grows = gallery_rows(row, pq, best, worst, pixels, names)
    assert all(names[int(pq["query_labels"][p])] in g[0].caption for g, p in zip(grows, picks))
    assert all(names[int(pq["topk_labels"][p, 0])] in g[1].caption for g, p in zip(grows, picks))
    with EdgeStore(store) as s:
        for g, p in zip(grows, picks):
            for tile, (split, idx) in zip(g, [("test", pq["query_indices"][p])]
                                          + [("train", i) for i in pq["topk_indices"][p]]):
                _, (pay,) = s.get_points(row["collection"], split, [int(idx)], with_vectors=False)
                src = np.asarray(Image.open(root / pay["source_path"]))
                assert np.array_equal(tile.picture, np.repeat(src[..., None], 3, axis=-1)), (split, idx)
    with ReportImages(load_settings(data_dir=tmp_path / "none")) as images:
        out = build_report(results, tmp_path / "rep", tsne=False, n_boot=20, images=images)
    assert [p.name for p in out.galleries] == ["gallery_breastfolder_28_hog.png"]
