"""Studies: grids of simulated runs that answer one question each, with a written report (``downpour study``)."""
