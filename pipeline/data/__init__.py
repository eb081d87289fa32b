"""Data jobs: raw media -> Parquet shards (listing, decoding, the shard codec, writer and
reader, the preprocess job, the sample data)."""
