"""Block layout and fixed-point format of the exact accumulator, without numba.

Kept apart from `kernels` so that importing the aggregation package (the coordinator's
CLI does, for its types and limits) does not import numba; the compiled loops load on
first use.
"""

from __future__ import annotations

# Values per block. 4096 keeps two update blocks (16 KiB each of float32) plus the
# block's state and scratch (4 x 32 KiB) in the L1 and L2 caches while every update of a
# batch is added; smaller blocks measured slower (more per-block work), not faster.
BLOCK = 1 << 12
# Blocks per superblock: the norm's block sums are tree-summed per superblock inside the
# kernel, so only one float per update and superblock (of 512K values) leaves it.
SUPER = 128
SUPERBLOCK = SUPER * BLOCK

VALUE_EXP = 16  # accepted values satisfy |x| < 2**VALUE_EXP
HI_BITS = 11  # the high limb counts units of 2**-HI_BITS
LO_BITS = 43  # the low limb counts units of 2**-LO_BITS
LO_PER_HI = 1 << (LO_BITS - HI_BITS)  # 2**32 low units make one high unit

VALUE_LIMIT = float(2**VALUE_EXP)
