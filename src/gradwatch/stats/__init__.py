"""Statistics computed on the device in the training step path, and the buffer that holds them."""
