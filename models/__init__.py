"""attrlab models package."""
