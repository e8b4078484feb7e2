"""Entry point that ``spark-submit`` / ``gcloud dataproc jobs submit pyspark`` run on the driver:
``python -m data_processing.dedup --engine spark`` with the job's arguments, the package coming
from the ``--py-files`` zip (``run_scripts/pack_py_files.py``)."""

import sys

from data_processing.dedup import main

if __name__ == "__main__":
    sys.exit(main(["--engine", "spark", *sys.argv[1:]]))
