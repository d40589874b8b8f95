"""The evaluation report in a real headless browser (Debian's chromium): rendered from a real
warehouse after two nightly-style evaluations, its DOM carries the 95% intervals, the paired
test's marks, the segment table and the shipped family's trend plot, and it screenshots."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from batchrec.evaluate import evaluate_command
from batchrec.features import build_snapshot
from batchrec.train import fit_run
from batchrec.warehouse import Warehouse

ML_SMALL = Path(__file__).resolve().parent.parent / "batchrec" / "datasets" / "ml-latest-small"
CHROMIUM = shutil.which("chromium")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian chromium is not installed (apt-get install -y chromium)"
)


class _Dom(HTMLParser):
    """What the browser's DOM holds: class -> texts of its elements, image sources by id, the
    first-column texts of each table, and the text of each element with an id."""

    def __init__(self):
        super().__init__()
        self.classes: dict[str, list[str]] = {}
        self.images: dict[str, str] = {}
        self.rows: dict[str, list[str]] = {}
        self.text_of: dict[str, str] = {}
        self._open: list[tuple[str, str | None, str | None]] = []  # (tag, class, id)
        self._table: str | None = None
        self._row_first: bool = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images[a.get("id") or a.get("src")] = a.get("src")
            return
        if tag == "table":
            self._table = a.get("id")
            self.rows[self._table] = []
        if tag == "tr":
            self._row_first = True
        self._open.append((tag, a.get("class"), a.get("id")))
        for cls in (a.get("class") or "").split():
            self.classes.setdefault(cls, []).append("")
        if a.get("id"):
            self.text_of[a["id"]] = ""

    def handle_endtag(self, tag):
        while self._open:
            t, _, _ = self._open.pop()
            if t in ("th", "td") and self._row_first:
                self._row_first = False
            if t == tag:
                break

    def handle_data(self, data):
        for _, cls, ident in self._open:
            for c in (cls or "").split():
                self.classes[c][-1] += data
            if ident:
                self.text_of[ident] += data
        if self._open and self._open[-1][0] in ("th", "td") and self._row_first and self._table:
            self.rows[self._table].append(data.strip())


def _chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={tmp / 'profile'}", *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )


def _warehouse(path: Path) -> Warehouse:
    """The first 20,000 ratings of ml-latest-small and one snapshot with the user_temporal split."""
    wh = Warehouse(path / "wh.duckdb")
    with wh.writer("test") as con:
        con.execute(f"""INSERT INTO ratings SELECT userId, movieId, rating, to_timestamp(timestamp)::TIMESTAMP, 0
                        FROM read_csv('{ML_SMALL}/ratings.csv') LIMIT 20000""")
        con.execute(f"""INSERT INTO items SELECT movieId, title, NULL,
                          CASE WHEN genres = '(no genres listed)' THEN []::VARCHAR[] ELSE string_split(genres, '|') END,
                          0 FROM read_csv('{ML_SMALL}/movies.csv')""")
    build_snapshot(wh, as_of="2030-01-01", protocols="user_temporal")
    return wh


def test_report_in_headless_chromium(tmp_path):
    wh = _warehouse(tmp_path)
    fit_run(wh, "popularity", "latest", None, {}, "cpu")  # the shipped family: popularity
    for _ in range(2):  # two nights of the nightly job's evaluate step
        out = evaluate_command(
            wh,
            models="popularity,svd",
            protocol="user_temporal",
            ks="5,10",
            report_dir=tmp_path / "reports",
            compare=True,
        )
    index = Path(out.rsplit("report: ", 1)[1].strip())

    dom = _Dom()
    dom.feed(_chromium("--dump-dom", index.as_uri(), tmp=tmp_path).stdout)
    # intervals under the values, and the paired test's marks beside the run that is not the best
    intervals = dom.classes["ci"]
    assert len(intervals) > 40 and all(t.startswith("[") and t.endswith("]") and ", " in t for t in intervals)
    assert dom.classes["sig"] and all(t[0] in "\u25bc\u2248" and " p " in t for t in dom.classes["sig"])
    assert {"ndcg@10", "recall@10", "map@10"} <= set(dom.rows["results"])
    assert "min(k, #relevant)" in dom.text_of["metric-note"]  # the MAP variant, named
    # segments: users by training interactions and NDCG by item popularity
    segments = set(dom.rows["segments"])  # (20,000 ratings: no relevant item has 100+ training ratings)
    assert {
        "ndcg_users_1-19@10",
        "ndcg_users_20-99@10",
        "recall_users_100+@10",
        "ndcg_items_20-99@10",
        "rmse_users_20-99",
        "rmse_items_1-4",
    } <= segments
    # the shipped family's trend: both evaluations, plotted
    assert dom.text_of["trend"].startswith("Trend: popularity")
    assert (
        dom.images["trend-plot"] == "trend.png"
        and (index.parent / "trend.png").read_bytes()[:4] == b"\x89PNG"
    )
    assert len(dom.rows["trend-table"]) == 1 + 2  # header and one row per evaluation

    shot = tmp_path / "report.png"
    _chromium(f"--screenshot={shot}", "--window-size=1400,2400", index.as_uri(), tmp=tmp_path)
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 50_000
