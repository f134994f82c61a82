"""Quality with and without early exit: task accuracy and divergence from the full model."""
