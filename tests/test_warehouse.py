"""Warehouse: path resolution, migrations, the writer lock, atomic publishing."""

from __future__ import annotations

import subprocess
import sys
import threading

import duckdb
import pytest

from batchrec.errors import BatchrecError, WarehouseBusy
from batchrec.warehouse import Warehouse, migrations, publish_table, resolve_path, scalar, transaction


def test_path_resolution_order(monkeypatch, tmp_path):
    monkeypatch.delenv("BATCHREC_WAREHOUSE", raising=False)
    assert str(resolve_path()) == "warehouse/batchrec.duckdb"
    monkeypatch.setenv("BATCHREC_WAREHOUSE", str(tmp_path / "env.duckdb"))
    assert resolve_path() == tmp_path / "env.duckdb"
    assert resolve_path(tmp_path / "explicit.duckdb") == tmp_path / "explicit.duckdb"


def test_new_warehouse_is_migrated_to_latest(tmp_path):
    wh = Warehouse(tmp_path / "w.duckdb")
    with wh.connect() as con:
        versions = [r[0] for r in con.sql("SELECT version FROM schema_version ORDER BY 1").fetchall()]
        tables = {r[0] for r in con.sql("SELECT table_name FROM information_schema.tables").fetchall()}
    assert versions == [v for v, _ in migrations()]
    assert {"ratings", "items", "tags", "users", "recommendations", "evaluations", "splits"} <= tables


def test_older_warehouse_is_migrated_on_open(tmp_path, monkeypatch):
    import batchrec.warehouse as w

    path = tmp_path / "w.duckdb"
    first = migrations()[:1]
    monkeypatch.setattr(w, "migrations", lambda: first)
    with Warehouse(path).connect():
        pass
    extra = tmp_path / "schema"
    extra.mkdir()
    (extra / "999_add_probe.sql").write_text("CREATE TABLE probe (x INTEGER);")
    monkeypatch.setattr(w, "migrations", lambda: first + [(999, extra / "999_add_probe.sql")])
    with Warehouse(path).connect() as con:
        assert scalar(con, "SELECT max(version) FROM schema_version") == 999
        assert scalar(con, "SELECT count(*) FROM probe") == 0


def test_newer_warehouse_fails_clearly(tmp_path):
    path = tmp_path / "w.duckdb"
    with Warehouse(path).connect() as con:
        con.execute("INSERT INTO schema_version VALUES (9999, 'future', now()::TIMESTAMP)")
    with pytest.raises(BatchrecError, match="newer than this batchrec"), Warehouse(path).connect():
        pass


def test_read_only_open_of_missing_warehouse_says_ingest_first(tmp_path):
    with pytest.raises(BatchrecError, match="batchrec ingest"):
        with Warehouse(tmp_path / "none.duckdb").connect(read_only=True):
            pass


def test_second_writer_gets_busy_error_naming_the_holder(tmp_path):
    path = tmp_path / "w.duckdb"
    code = f"from batchrec.warehouse import Warehouse\nwith Warehouse({str(path)!r}).lock('other'): pass"
    with Warehouse(path).lock("ingest"):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "warehouse is busy (held by pid" in proc.stderr and "batchrec ingest" in proc.stderr
    # released: the same call now succeeds
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_duckdb_file_held_by_another_process_is_reported_busy(tmp_path):
    path = tmp_path / "w.duckdb"
    with Warehouse(path).connect():
        pass
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import duckdb,time; c=duckdb.connect({str(path)!r}); print('held', flush=True); time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WarehouseBusy, match="warehouse is busy"):
            with Warehouse(path).connect(read_only=True):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_publish_table_is_atomic_for_readers_and_failures(tmp_path):
    path = tmp_path / "w.duckdb"
    with Warehouse(path).connect() as con:
        publish_table(con, "t", "SELECT range AS x FROM range(1000)")
        reader = con.cursor()
        seen = []
        stop = threading.Event()

        def read():
            while not stop.is_set():
                seen.append(reader.sql("SELECT count(*), min(x) FROM t").fetchall()[0])

        thread = threading.Thread(target=read)
        thread.start()
        for i in range(20):
            publish_table(con, "t", f"SELECT range + {i + 1} AS x FROM range(1000)")
        stop.set()
        thread.join()
        assert seen and all(count == 1000 for count, _ in seen)
        with pytest.raises(duckdb.Error):
            publish_table(con, "t", "SELECT error('boom')::INTEGER AS x FROM range(10)")
        assert con.sql("SELECT count(*), min(x) FROM t").fetchall() == [(1000, 20)]


def test_transaction_rolls_back_on_error(tmp_path):
    with Warehouse(tmp_path / "w.duckdb").connect() as con:
        con.execute("CREATE TABLE t (x INTEGER)")
        with pytest.raises(RuntimeError), transaction(con):
            con.execute("INSERT INTO t VALUES (1)")
            raise RuntimeError("interrupted")
        assert scalar(con, "SELECT count(*) FROM t") == 0
