"""Results -> the paper's tables, figures and one HTML page (``fmcache report``).

The report reads only what :mod:`fmcache.results` writes (``result.json`` + ``predictions.npz`` per evaluation), so
it never imports a model backend, the cache, a runner or the grid.
"""
