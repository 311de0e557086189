"""The REG SiT model, its frozen encoders (DINOv2, SD-VAE) and official checkpoint import."""
