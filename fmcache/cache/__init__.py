"""The HDF5 feature cache: key, lock, shards, manifest and the reader API of stage two."""
