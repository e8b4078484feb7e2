"""Exact and near-duplicate removal over shards, written as map / shuffle stages.

Stages (each a pure function of its inputs, so a cluster engine can run the same steps; see
``docs/data.md``):

1. **map signatures** - per record: key ``(repo_name, file_name, shard, index)``, size, a
   64-bit hash of the whitespace-normalised text, and a MinHash signature. Only these leave the
   map: memory is bounded by signatures, never by texts.
2. **shuffle exact** - group by the exact hash; one survivor per group.
3. **map band keys -> shuffle buckets** - LSH band hashes of the exact survivors; records
   sharing a bucket become candidate pairs.
4. **verify** - the candidates' shingle sets are recomputed from the shards (only for records
   in some candidate pair) and pairs with exact Jaccard >= threshold are kept.
5. **clusters** - union-find over verified pairs; connected components are clusters.
6. **map filter** - every shard is re-read and its kept records written unchanged.

Survivor rule (exact groups and near clusters alike): the member with the lowest
``(repo_name, file_name)``, ties broken by input position ``(shard path, record index)``.
It depends only on the records, never on timing or worker count, so any engine reproduces the
same kept set.

    python -m data_processing.dedup --input DIR --output DIR [--threshold 0.85] [--workers N]
    python -m data_processing.dedup --engine spark [--master local[2]|spark://HOST:7077|yarn] \\
        --input URI --output URI [--threshold 0.85]       # the same stages on Spark, the same output
"""

from data_processing.dedup.cli import main
from data_processing.dedup.local import DedupResult, Workers, plan_dedup, write_kept
from data_processing.dedup.params import (
    BATCH_BYTES,
    BATCH_RECORDS,
    DedupParams,
    exact_hash,
    map_signatures,
    normalise_whitespace,
)
from data_processing.dedup.stages import UnionFind, candidate_stage, cluster_stage, exact_stage, survivor_ranks

__all__ = ["BATCH_BYTES", "BATCH_RECORDS", "DedupParams", "DedupResult", "UnionFind", "Workers", "candidate_stage",
           "exact_hash",
           "cluster_stage", "exact_stage", "main", "map_signatures", "normalise_whitespace", "plan_dedup",
           "survivor_ranks", "write_kept"]
