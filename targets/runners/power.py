"""Power sensors on the device (placeholder: being written)."""
