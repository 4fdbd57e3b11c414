"""Loading a local weights file into a built model; the code lives in :mod:`fmcache.weightfiles`.

It moved there so stage two's heads (``fmcache.frozen``, which must not import ``fmcache.models``) share the same
strict checks; this module keeps every existing import working.
"""

import torch  # noqa: F401  (kept as an attribute: tests patch torch.load through this module)

from fmcache.weightfiles import (
    NESTED_KEYS,
    PREFIXES,
    Convert,
    LoadReport,
    load_weights_file,
    match_layout,
    read_state_dict,
)

__all__ = ["NESTED_KEYS", "PREFIXES", "Convert", "LoadReport", "load_weights_file", "match_layout", "read_state_dict"]
