"""Networks only (no training code): autoencoders, quantizer, discriminators, UNet."""
