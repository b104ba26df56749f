"""Pictures and pages made from a run: filter grids (more to come: plots, one HTML report)."""
