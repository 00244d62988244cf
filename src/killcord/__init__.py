"""killcord: emergency shutdown for live systems."""

__version__ = "0.1.0"
