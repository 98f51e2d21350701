"""attrlab cluster package."""
