"""Scripts that make the embedded data, pretrain the tiny backbone and download real data sets."""
