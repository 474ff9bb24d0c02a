"""pilotlab: an event-driven telemetry pipeline for city-scale technology pilots."""

__version__ = "0.1.0"
