"""Results → the paper's tables, figures and one HTML page (``fmcache report``); the grid runner (``fmcache grid``).

The report reads only what :mod:`fmcache.results` writes (``result.json`` + ``predictions.npz`` per evaluation), so
it never imports a model backend or the cache.
"""
