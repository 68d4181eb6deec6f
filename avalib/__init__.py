"""What the training scripts share, one module per concern (see README, Layout)."""
