"""Data: registry, file readers, formats, templates, encoding, caching, packing and collation."""
