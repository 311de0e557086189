"""regscale: cluster-scale training of SiT diffusion transformers with REG."""

__version__ = "0.1.0"
