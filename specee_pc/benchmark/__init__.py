"""The benchmark harness behind `specee-pc bench`: configurations, timed runs, the report."""
