"""The named values options accept, shared by the specs that check them and the code that acts on them.

They live here, below both, so that a spec module stays light (the CLI reads its defaults for ``--help`` without
importing torch) and a value is spelled in one place.
"""

from __future__ import annotations

SCHEDULES = ("constant", "cosine")  # after the warmup: the seed's constant LR, or cosine (a documented option)
AMP_MODES = ("auto", "bf16", "fp16", "off")  # fine-tuning's mixed precision; auto: bf16 on a GPU, off on a CPU
# a forward's precision (extraction; fine-tuning's evaluation): auto is bf16 autocast on a GPU and fp32 on a CPU (for
# evaluation: the training --amp); the seed extracts under fp16 autocast and tests in fp32
PRECISIONS = ("auto", "fp16", "bf16", "fp32")
LORA_METHODS = ("full", "lora")  # full: every weight of the trainable parts (the paper's); lora: peft adapters
VIEW_MODES = ("on", "off")  # train on a cache's augmented views, or on the center crops only
CKA_ESTIMATORS = ("exact", "minibatch")
CKA_SPLITS = ("test", "val", "train", "all")
TOKEN_HEADS = ("deit", "attentive")
TOKEN_NORMS = ("seed", "none", "final")
PRELOAD = ("auto", "yes", "no")
# which epoch is the best: "seed" compares the val metric rounded to 3 decimals, strictly (the earlier epoch wins a
# 3-decimal tie), as the seed does; "exact" compares unrounded values
BEST_EPOCH_RULES = {"seed": 3, "exact": None}
DEIT_DEPTH = 12  # DeiT-B's blocks: the stacked head's depth in the seed (tests use fewer)
# extraction
GRAY_MODES = ("repeat", "seed")  # how a grayscale scan meets an RGB model (fmcache.data.transforms)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
DTYPES = ("fp16", "fp32")
ON_BAD_IMAGE = ("error", "skip")
NORMS = ("dataset", "model")
COMPRESSIONS = (None, "gzip", "lzf")
FINGERPRINTS = ("stat", "content")  # path + size + mtime (cheap), or the bytes of every image
PAPER_TOKENS = "paper"  # the token "layer" holding what the paper's DeiT head reads (``--tokens paper``)
# pixel caches (fmcache pixels) and fine-tuning's data path
PIXEL_SOURCES = ("auto", "on", "off")  # read a matching pixel cache: when one exists, always (or refuse), never
PIXEL_CHANNELS = ("auto", "1", "3")  # auto: one channel for a grayscale dataset (its channels are equal), else three
AUGMENT_PLACES = ("cpu", "device")  # the random train augmentation: PIL per image in the loader, or on the batch
