"""Connected components on Spark DataFrames: large-star / small-star (Kiveris et al., 2014,
"Connected Components in MapReduce and Beyond").

Node ids are int64 and their order matters: every component ends as a star around its
*smallest* id. The dedup engine uses survivor ranks as ids, so a component's centre is its
survivor, exactly the root the local engine's union-find picks.

* **large-star**: each node ``u`` links every larger neighbour to ``m(u)``, the smallest of
  ``u`` and its neighbours.
* **small-star**: each node ``u`` links itself and its smaller neighbours to the smallest of
  them.

Alternating the two converges in O(log^2 n) rounds (usually a handful). The loop stops when the
edges form a star forest whose centres are never children and whose children have one centre
each; that graph is a fixed point of both steps. Each round is checkpointed so the query plan
does not grow with the number of rounds (``spark.sparkContext.setCheckpointDir`` makes it a
reliable checkpoint).

GraphFrames does the same but its jar is not on PyPI, so this stays within plain PySpark.
"""

from __future__ import annotations

from collections.abc import Callable

from data_processing.dedup.spark_util import checkpoint


def _large_star(edges):
    from pyspark.sql import functions as F

    both = edges.select(F.col("v").alias("x"), F.col("m").alias("y")).unionByName(
        edges.select(F.col("m").alias("x"), F.col("v").alias("y")))
    low = both.groupBy("x").agg(F.least(F.min("y"), F.col("x")).alias("low"))
    return (both.where(F.col("y") > F.col("x")).join(low, "x")
            .select(F.col("y").alias("v"), F.col("low").alias("m")).distinct())


def _small_star(edges):
    from pyspark.sql import functions as F

    # Every edge is (v, m) with m < v, so each v's "smaller neighbours" are its m's.
    low = edges.groupBy("v").agg(F.min("m").alias("low"))
    moved = (edges.join(low, "v").where(F.col("m") != F.col("low"))
             .select(F.col("m").alias("v"), F.col("low").alias("m")))
    return moved.unionByName(low.select("v", F.col("low").alias("m"))).distinct()


def _is_star_forest(edges) -> bool:
    """One job: no node is both a child and a centre, and no child has two centres."""
    from pyspark.sql import functions as F

    roles = edges.select(F.col("v").alias("node"), F.lit(1).alias("child"), F.lit(0).alias("centre")).unionByName(
        edges.select(F.col("m").alias("node"), F.lit(0).alias("child"), F.lit(1).alias("centre")))
    per_node = roles.groupBy("node").agg(F.sum("child").alias("parents"), F.max("centre").alias("centre"))
    bad = per_node.where((F.col("parents") > 1) | ((F.col("parents") > 0) & (F.col("centre") > 0)))
    return not bad.limit(1).count()


def connected_components(edges, max_rounds: int = 64, on_round: Callable[[int], None] | None = None):
    """Components of the undirected graph ``edges`` (columns ``a``, ``b``: int64 node ids).

    Returns ``(roots, rounds)``: a DataFrame ``(node, root)`` with one row per node that has an
    edge, ``root`` the smallest id in its component (roots map to themselves), and the number
    of large-star + small-star rounds run.
    """
    from pyspark.sql import functions as F

    cur = (edges.where(F.col("a") != F.col("b"))
           .select(F.greatest("a", "b").alias("v"), F.least("a", "b").alias("m")).distinct())
    rounds = 0
    while not _is_star_forest(cur):
        if rounds >= max_rounds:
            raise RuntimeError(f"connected components did not converge in {max_rounds} rounds")
        cur = checkpoint(_small_star(_large_star(cur)))
        rounds += 1
        if on_round is not None:
            on_round(rounds)
    roots = cur.select(F.col("v").alias("node"), F.col("m").alias("root")).unionByName(
        cur.select(F.col("m").alias("node"), F.col("m").alias("root"))).distinct()
    return roots, rounds
