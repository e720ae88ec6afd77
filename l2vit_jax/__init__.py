"""l2vit_jax: L2ViT (linear-attention ViT) for CMS end-to-end jet images, in JAX/Flax NNX."""
