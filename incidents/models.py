"""Incidents, timelines and post-mortems live here (the app is filled in by later work)."""
