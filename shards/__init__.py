"""WebDataset shards: format, writer, reader, embedded datasets and importers."""
