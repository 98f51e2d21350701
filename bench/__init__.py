"""attrlab bench package."""
