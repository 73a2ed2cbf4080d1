"""``fkd-relabel``: one or several teachers label the synthetic images and write the shard set
directly, with the SRe2L family's knobs as flags. Imports ``shards``, ``convert`` (the image folder,
the sampler replay, SRe2L's relabel files) and ``train``'s crop and mix code; nothing imports it."""
