"""DVT, Denoising Vision Transformers (Yang et al., ECCV 2024): stage 1, the per-image
neural-field decomposition; stage 2, the distilled one-block denoiser."""
