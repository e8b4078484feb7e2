"""Spark launchers: config-driven dry runs print the right commands; the --py-files zip imports;
a missing Java or PySpark is one line saying how to install it (none of these start Spark)."""

import subprocess
import sys
import zipfile

import pytest

from data_processing import dedup

CONFIG = """
DEDUP_INPUT=hdfs:///corpus/filtered
DEDUP_OUTPUT=hdfs:///corpus/dedup
SPARK_MASTER=spark://head:7077
SPARK_EXECUTOR_MEMORY=6g
SPARK_CONF="spark.sql.shuffle.partitions=64 spark.task.maxFailures=2"
DATAPROC_PROJECT=proj
DATAPROC_REGION=europe-west4
DATAPROC_CLUSTER=dd
DATAPROC_PIP="zstandard==0.25.0 tqdm==4.67.1"
DATAPROC_PROPERTIES="spark.executor.memory=6g spark.sql.shuffle.partitions=64"
"""


def dry_run(script, *args, env=None):
    proc = subprocess.run(["bash", f"run_scripts/{script}", *args], capture_output=True, text=True, env=env)
    return proc.returncode, proc.stdout.strip().splitlines(), proc.stderr.strip()


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "dedup.env"
    path.write_text(CONFIG)
    return str(path)


def test_spark_submit_dry_run_from_config_with_overrides(config):
    rc, lines, err = dry_run("dedup_spark_submit.sh", "--config", config, "--threshold", "0.9", "--conf",
                             "spark.executor.cores=3", "--dry-run", "--", "--skip-bad")
    assert rc == 0, err
    assert len(lines) == 3 and lines[0].startswith("python3 ") and "pack_py_files.py" in lines[0]
    zip_path = lines[0].split()[-1]
    submit = lines[1].split()
    assert submit[0] == "spark-submit"
    assert submit[submit.index("--master") + 1] == "spark://head:7077"
    assert submit[submit.index("--py-files") + 1] == zip_path
    assert submit[submit.index("--executor-memory") + 1] == "6g"
    confs = [submit[i + 1] for i, tok in enumerate(submit) if tok == "--conf"]
    assert confs == ["spark.pyspark.python=python3", "spark.sql.shuffle.partitions=64", "spark.task.maxFailures=2",
                     "spark.executor.cores=3"]
    job = submit.index(next(t for t in submit if t.endswith("run_scripts/dedup_spark_job.py")))
    assert submit[job + 1 :] == ["--input", "hdfs:///corpus/filtered", "--output", "hdfs:///corpus/dedup",
                                 "--threshold", "0.9", "--skip-bad"]
    assert lines[2] == f"rm -f {zip_path}"


def test_dataproc_dry_run_creates_cluster_and_submits(config):
    rc, lines, err = dry_run("dedup_dataproc.sh", "--config", config, "--create-cluster", "--cluster", "other",
                             "--dry-run")
    assert rc == 0, err
    create, pack, submit, cleanup = lines
    assert create.startswith("gcloud dataproc clusters create other --project=proj --region=europe-west4")
    assert "--image-version=3.0" in create
    # gcloud splits --properties on commas unless another delimiter is declared with ^#^.
    assert "--properties=\\^#\\^dataproc:pip.packages=zstandard==0.25.0\\,tqdm==4.67.1" in create
    assert "pack_py_files.py" in pack
    tokens = submit.split()
    assert tokens[:4] == ["gcloud", "dataproc", "jobs", "submit"] and tokens[4] == "pyspark"
    assert tokens[5].endswith("run_scripts/dedup_spark_job.py")
    assert "--cluster=other" in tokens and f"--py-files={pack.split()[-1]}" in tokens
    assert "--properties=spark.executor.memory=6g\\,spark.sql.shuffle.partitions=64" in tokens
    assert tokens[tokens.index("--") + 1 :] == ["--input", "hdfs:///corpus/filtered", "--output",
                                                "hdfs:///corpus/dedup", "--threshold", "0.85"]
    assert cleanup.startswith("rm -f ")


@pytest.mark.parametrize("script,missing", [("dedup_spark_submit.sh", "--master"), ("dedup_dataproc.sh", "--project")])
def test_missing_setting_is_one_line_and_exit_2(script, missing):
    rc, lines, err = dry_run(script, "--input", "x", "--output", "y", "--dry-run", env={"PATH": "/usr/bin:/bin"})
    assert rc == 2 and lines == [] and err == f"{script}: {missing} is required (flag or config file)"


def test_py_files_zip_holds_the_package_and_imports_alone(tmp_path):
    out = tmp_path / "job.zip"
    subprocess.run([sys.executable, "run_scripts/pack_py_files.py", str(out)], check=True, capture_output=True)
    names = zipfile.ZipFile(out).namelist()
    assert "data_processing/dedup/spark.py" in names and "data_processing/minhash.py" in names
    assert not any("__pycache__" in n or n.startswith(("train/", "tests/")) for n in names)
    # Imported from the zip alone (as executors do), not from this checkout.
    code = "import data_processing.dedup.spark as m; print(m.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(out), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{out}/data_processing/dedup/spark.py"


def test_missing_java_is_one_line_naming_the_package(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no java on it
    rc = dedup.main(["--engine", "spark", "--input", str(tmp_path), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "Java 17 runtime" in err[0] and "apt-get install -y openjdk-17-jre-headless" in err[0]


def test_missing_pyspark_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pyspark", None)  # import pyspark -> ImportError
    rc = dedup.main(["--engine", "spark", "--input", str(tmp_path), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["error: --engine spark needs PySpark 4: pip install 'codeneo[spark]' "
                               "(or pip install 'pyspark>=4,<5' pyarrow)"]
