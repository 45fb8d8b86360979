"""The packed checkpoint format: layout (bit packing, outliers) and the checkpoint reader/writer."""
