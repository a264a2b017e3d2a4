"""The `gdsr_nyuv2` TFDS builder."""
