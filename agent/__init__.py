"""edge-agent: the station gateway program (instruments -> SQLite buffer -> MQTT / HJ 212)."""

__version__ = "0.1.0"
