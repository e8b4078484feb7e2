"""Spark plumbing for the cluster dedup engine: requirements, the session, and file operations
through Hadoop's ``FileSystem`` (so ``gs://``, ``s3a://``, ``hdfs://`` and local paths all work
with whatever connectors the cluster has).

PySpark is imported lazily: the rest of ``data_processing`` works without the ``spark`` extra.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

# An empty zstd *skippable frame* (RFC 8878 section 3.1.2: magic 0x184D2A50, little-endian, then a
# 4-byte content size of 0). Spark has no zstd writer without native Hadoop libraries, so the
# Spark engine compresses each output shard in Python and writes the bytes with Spark's text
# writer, which appends its line separator after every row. Using these 8 bytes as the separator
# keeps the file a valid zstd stream: every decoder skips the frame. All 8 bytes are ASCII, so
# the text writer accepts them as a separator string.
ZSTD_SKIPPABLE_SEPARATOR = "\x50\x2a\x4d\x18\x00\x00\x00\x00"

INSTALL_PYSPARK = "pip install 'codeneo[spark]' (or pip install 'pyspark>=4,<5' pyarrow)"
INSTALL_JAVA = "apt-get install -y openjdk-17-jre-headless (or set JAVA_HOME to a Java 17 runtime)"


class SparkUnavailableError(RuntimeError):
    """PySpark or a Java runtime is missing; the message says how to install it."""


def java_executable() -> str | None:
    """The ``java`` Spark will start: ``$JAVA_HOME/bin/java`` when JAVA_HOME is set, else PATH's."""
    home = os.environ.get("JAVA_HOME")
    if home:
        exe = Path(home) / "bin" / "java"
        return str(exe) if exe.is_file() else None
    return shutil.which("java")


def require_spark() -> None:
    """Raise ``SparkUnavailableError`` (one line naming the install command) unless PySpark 4 and a
    Java runtime are present. Checked before starting a JVM, whose own errors are pages long."""
    try:
        import pyspark
    except ImportError as err:
        raise SparkUnavailableError(f"--engine spark needs PySpark 4: {INSTALL_PYSPARK}") from err
    if int(pyspark.__version__.split(".")[0]) != 4:
        raise SparkUnavailableError(f"--engine spark needs PySpark 4, found {pyspark.__version__}: {INSTALL_PYSPARK}")
    if java_executable() is None:
        raise SparkUnavailableError(f"--engine spark needs a Java 17 runtime and found none: {INSTALL_JAVA}")


def get_session(master: str | None = None, conf: dict[str, str] | None = None, app_name: str = "codeneo-dedup"):
    """The active SparkSession, or a new one on ``master`` with ``conf``.

    ``master=None`` leaves the choice to ``spark-submit`` / the cluster (plain ``python`` gets
    ``local[*]``). For local masters the Python workers run this interpreter with this checkout
    importable, as on a cluster the job's ``--py-files`` zip makes it.
    """
    require_spark()
    from pyspark.sql import SparkSession

    launching = "PYSPARK_GATEWAY_PORT" not in os.environ  # not under spark-submit: we start the JVM
    if launching and (master is None or master.startswith("local")):
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        root = str(Path(__file__).resolve().parents[1])
        paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
        if root not in paths:
            os.environ["PYTHONPATH"] = os.pathsep.join([root, *filter(None, paths)])
    builder = SparkSession.builder.appName(app_name)
    if master:
        builder = builder.master(master)
    # Arrow batches into mapInArrow: a row can be a whole shard, so keep batches to a few dozen rows.
    settings = {"spark.sql.execution.arrow.maxRecordsPerBatch": "64",
                # The status store keeps every query's plan and metrics; a long job runs hundreds.
                "spark.sql.ui.retainedExecutions": "50", "spark.ui.retainedJobs": "100",
                "spark.ui.retainedStages": "100"}
    if master and master.startswith("local"):
        # A few shuffle partitions per core: the default 200 costs more than it saves on a laptop.
        settings["spark.sql.shuffle.partitions"] = "4"
    settings.update(conf or {})
    for key, value in settings.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("CODENEO_SPARK_LOG_LEVEL", "ERROR"))
    return spark


def glob_escape(path: str) -> str:
    """``path`` with Hadoop glob characters escaped: Spark's readers glob every path they get."""
    return "".join("\\" + c if c in "\\*?[]{}" else c for c in path)


def hidden_to_spark(name: str) -> bool:
    """True for file names Spark's file sources never read (``.x`` and ``_x``, Hadoop's hidden files)."""
    return name.startswith((".", "_"))


class HadoopFS:
    """The few file operations the driver needs, through the JVM's Hadoop ``FileSystem``.

    Only the driver touches it, and only for listings, renames, deletes and the small report.
    """

    def __init__(self, spark):
        self._jvm = spark.sparkContext._jvm
        self._conf = spark.sparkContext._jsc.hadoopConfiguration()

    def _path(self, uri: str):
        return self._jvm.org.apache.hadoop.fs.Path(uri)

    def _fs(self, uri: str):
        return self._path(uri).getFileSystem(self._conf)

    def qualify(self, uri: str) -> str:
        """Fully qualified form (``/x`` -> ``file:/x``), as Spark's readers report paths."""
        return self._fs(uri).makeQualified(self._path(uri)).toString()

    def parent_and_name(self, uri: str) -> tuple[str, str]:
        """``(parent folder, last name)`` of a path; ``ValueError`` for a filesystem root."""
        path = self._path(uri)
        parent = path.getParent()
        if parent is None or not path.getName():
            raise ValueError(f"{uri}: the output must be a folder below the filesystem (or bucket) root")
        return parent.toString(), path.getName()

    def exists(self, uri: str) -> bool:
        return bool(self._fs(uri).exists(self._path(uri)))

    def is_dir(self, uri: str) -> bool:
        return bool(self._fs(uri).isDirectory(self._path(uri)))

    def list(self, uri: str) -> list[tuple[str, bool]]:
        """``(qualified path, is_dir)`` of the direct children of a directory."""
        return [(st.getPath().toString(), bool(st.isDirectory())) for st in self._fs(uri).listStatus(self._path(uri))]

    def mkdirs(self, uri: str) -> None:
        self._fs(uri).mkdirs(self._path(uri))

    def delete(self, uri: str, recursive: bool = True) -> None:
        self._fs(uri).delete(self._path(uri), recursive)

    def rename(self, src: str, dst: str) -> None:
        """Rename; raises if the filesystem refuses (Hadoop returns ``false`` instead of raising)."""
        if not self._fs(src).rename(self._path(src), self._path(dst)):
            raise OSError(f"{dst}: cannot move {src} here")

    def write_bytes(self, uri: str, data: bytes) -> None:
        out = self._fs(uri).create(self._path(uri), True)
        try:
            out.write(bytearray(data))
        finally:
            out.close()

    def set_write_checksum(self, uri: str, enabled: bool) -> None:
        """Local filesystems write a hidden ``.NAME.crc`` beside every file unless told not to."""
        fs = self._fs(uri)
        if hasattr(fs, "setWriteChecksum"):
            fs.setWriteChecksum(enabled)


def checkpoint(df):
    """``df`` computed now and cut from its lineage: a reliable checkpoint when the job has a
    checkpoint folder (survives lost executors, e.g. under dynamic allocation), else a local one
    (executor storage, cheaper). Later stages then plan against a leaf instead of the whole
    history; self-joins over a long lineage (components, buckets) otherwise spend most of their
    time in the planner (measured: 60 s instead of 5 s for one small-star round on 13 files)."""
    if df.sparkSession.sparkContext.getCheckpointDir():
        return df.checkpoint()
    return df.localCheckpoint()


def spark_info(spark) -> dict[str, Any]:
    """Master, version and default parallelism, for reports."""
    sc = spark.sparkContext
    return {"master": sc.master, "version": spark.version, "default_parallelism": sc.defaultParallelism}
