"""The `mef_benchmark` TFDS builder."""
