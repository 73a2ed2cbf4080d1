"""``fkd-relabel``: one or several teachers label the synthetic images and write the shard set
directly, with the SRe2L family's knobs as flags. Imports ``shards``, ``batches`` (draws, crops, the
model input), ``models`` (the teachers) and ``convert`` (the image folder, the sampler replay,
SRe2L's relabel files); nothing imports it."""
