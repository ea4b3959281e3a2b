"""Pure attribution arithmetic: CPU/DRAM split, idle estimation, GPU split."""
