"""The `synthetic_fusion` TFDS builder."""
