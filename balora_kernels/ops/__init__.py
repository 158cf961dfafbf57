"""One file per kernel family: Triton kernels, their launchers, and the ops built on them."""
