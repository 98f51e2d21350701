"""attrlab tests."""
