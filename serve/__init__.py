"""attrlab serve package."""
