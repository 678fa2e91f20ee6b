"""Running measurements: study files (config.py), the study runner (study.py), sample shards over torchrun
ranks (shard.py), one variant's speed and memory (bench.py) and the speed regression gate (speedgate.py)."""
