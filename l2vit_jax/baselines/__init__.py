"""Non-network baselines: jet-substructure observables computed from the images, and boosted trees on them."""
