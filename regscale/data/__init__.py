"""ImageNet to MDS shards (prepare) and the resumable training stream."""
