"""SparkSession construction for the sortline jobs."""

from __future__ import annotations

import os
import sys

from pyspark.sql import SparkSession


def create_session(master: str | None = None, app_name: str = "sortline-train") -> SparkSession:
    """Create or reuse the SparkSession of a job.

    Parameters
    ----------
    master
        Spark master URL. Defaults to ``spark.master`` from ``spark-submit`` or the
        ``SPARK_MASTER`` environment variable, and to ``local[*]`` when neither is set.
    """
    # Python workers must use this interpreter, whose environment has onnxruntime and pyvips.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    # The driver and local executors talk over loopback unless the caller says otherwise.
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    builder = SparkSession.builder.appName(app_name)
    master = master or os.environ.get("SPARK_MASTER")
    if master:
        builder = builder.master(master)
    elif not os.environ.get("SPARK_SUBMIT_OPTS") and "spark.master" not in os.environ.get("PYSPARK_SUBMIT_ARGS", ""):
        builder = builder.master("local[*]")
    session = (
        builder.config("spark.sql.execution.arrow.pyspark.enabled", "true")
        # Feature rows hold a few thousand floats each; small Arrow batches keep task memory low.
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", "64")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.ui.enabled", os.environ.get("SORTLINE_SPARK_UI", "false"))
        .config("spark.driver.bindAddress", os.environ.get("SPARK_DRIVER_BIND_ADDRESS", "127.0.0.1"))
        .config("spark.driver.host", os.environ.get("SPARK_DRIVER_HOST", "127.0.0.1"))
        .getOrCreate()
    )
    session.sparkContext.setLogLevel(os.environ.get("SORTLINE_SPARK_LOG_LEVEL", "WARN"))
    return session
