"""Graph passes, each one job: dependency analysis, dead-channel detection, rewrite, cleanup."""
