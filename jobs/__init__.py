"""attrlab jobs package."""
