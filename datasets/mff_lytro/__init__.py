"""The `mff_lytro` TFDS builder."""
