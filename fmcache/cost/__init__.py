"""What a grid job costs before it runs: exact FLOP counts on the meta device (:mod:`~fmcache.cost.counting`), what
a device achieves (:mod:`~fmcache.cost.rates`, measured by :mod:`~fmcache.cost.calibrate`), dataset sizes
(:mod:`~fmcache.cost.sizes`), and the estimators that price a job from them (:mod:`~fmcache.cost.estimate`) or
from recorded runs (:mod:`~fmcache.cost.recorded`), with one API: :func:`~fmcache.cost.estimate.estimate_jobs`."""
