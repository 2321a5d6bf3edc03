"""Images and encoders to shards, and shards to training batches: the token layout, image
inputs, the frozen EVA-CLIP / CLIP towers, the shard format, extraction, synthetic shards and
the training data loader (`loader`)."""
