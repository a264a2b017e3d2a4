"""The `mff_realmff` TFDS builder."""
