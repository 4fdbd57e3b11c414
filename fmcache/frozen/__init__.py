"""Stage two, from the cache only: feature selection, k-NN, the linear grid, CKA, transfer of a result's heads to
another cache, and the runners that write results.

Nothing here imports :mod:`fmcache.models`: stage two reads what ``fmcache extract`` wrote.
"""
