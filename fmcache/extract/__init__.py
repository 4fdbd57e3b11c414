"""Stage one: run a frozen foundation once over a dataset and write the keyed, resumable HDF5 cache.

:mod:`fmcache.extract.plan` decides everything that needs no model (the spec, the samples, the key and the cache
folder); :mod:`fmcache.extract.run` runs the model over the images and writes the shards.
"""
