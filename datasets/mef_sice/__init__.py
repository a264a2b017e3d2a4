"""The `mef_sice` TFDS builder."""
