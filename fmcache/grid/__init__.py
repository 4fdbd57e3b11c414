"""``fmcache grid``: a YAML experiment expanded into extract and protocol jobs, run locally or on Slurm."""
