"""The `hdr_kalantari` TFDS builder."""
